"""network3's ONNX file behind KServe's Python model server, written as a KServe user would:
a `kserve.Model` whose `load` opens an onnxruntime session (onnxruntime's default options) and
whose `predict` decodes the v2 InferRequest and returns `logits` and `probabilities` as v2
outputs.  Runs in its own environment (`.venv-peers/kserve`: kserve, onnxruntime, numpy).

    python benchmarks/peers/kserve_onnx.py --model_path models/default.onnx --grpc_port 8081 --http_port 8080

Every other flag of kserve.model_server.parser works too (--max_threads, --enable_latency_logging...).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import kserve
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, model_server

# The model's name and tensor names, from the contract every server here shares (plain Python).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from serving.contract import INPUT_NAME, MODEL_NAME, OUTPUT_NAMES  # noqa: E402


class OnnxDigits(kserve.Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.session: ort.InferenceSession | None = None

    def load(self) -> bool:
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        x = payload.inputs[0].as_numpy()
        outputs = []
        for name, value in zip(OUTPUT_NAMES, self.session.run(None, {INPUT_NAME: x})):
            out = InferOutput(name=name, shape=list(value.shape), datatype="FP32")
            out.set_data_from_numpy(value)
            outputs.append(out)
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=outputs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_path", required=True, help="the ONNX file")
    args, _ = parser.parse_known_args()
    model = OnnxDigits(MODEL_NAME, args.model_path)
    model.load()
    kserve.ModelServer(grpc_port=args.grpc_port, http_port=args.http_port).start([model])
