"""network3's ONNX file behind MLServer, written as an MLServer user would: an `MLModel` whose
`load` opens an onnxruntime session (onnxruntime's default options) from the model settings'
`parameters.uri`, and whose `predict` decodes the v2 request with NumpyCodec and returns
`logits` and `probabilities`.  Runs in its own environment (`.venv-peers/mlserver`: mlserver,
onnxruntime, numpy), from a folder with settings.json and model-settings.json
(benchmarks/bench_peers.py writes them), with this folder on PYTHONPATH:

    PYTHONPATH=benchmarks/peers mlserver start FOLDER

model-settings.json: {"name": "network3", "implementation": "mlserver_onnx.OnnxDigits",
"parameters": {"uri": "/abs/path/default.onnx", "version": "1"}}
"""
from __future__ import annotations

import sys
from pathlib import Path

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

# The tensor names, from the contract every server here shares (plain Python).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from serving.contract import INPUT_NAME, OUTPUT_NAMES  # noqa: E402


class OnnxDigits(MLModel):
    async def load(self) -> bool:
        self.session = ort.InferenceSession(self.settings.parameters.uri, providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = self.decode(payload.inputs[0], default_codec=NumpyCodec)
        values = self.session.run(None, {INPUT_NAME: x})
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id,
                                 outputs=[NumpyCodec.encode_output(name, value) for name, value in zip(OUTPUT_NAMES, values)])
