"""The simplest possible v2 server, the benchmark's reference: grpc.aio, onnxruntime called
inline in the handler, no batcher, no checks, no metrics, no logs.  Just enough of the
protocol (metadata, config, statistics) for perf_analyzer.

    python benchmarks/reference_server.py --model model.onnx --port 8001
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from protos.inference import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from protos.inference import model_config_pb2 as mc  # noqa: E402
from serving.contract import CLASSES, INPUT_NAME, INPUT_SHAPE, MODEL_NAME as NAME, MODEL_VERSION, OUTPUT_NAMES  # noqa: E402

LOGITS, PROBABILITIES = OUTPUT_NAMES


class Reference(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model: str, threads: int) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="reference", version="0")

    async def ModelMetadata(self, request, context):
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name=NAME, versions=[MODEL_VERSION], platform="onnxruntime_onnx",
                                        inputs=[T(name=INPUT_NAME, datatype="FP32", shape=[-1, *INPUT_SHAPE])],
                                        outputs=[T(name=name, datatype="FP32", shape=[-1, CLASSES]) for name in OUTPUT_NAMES])

    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=mc.ModelConfig(
            name=NAME, platform="onnxruntime_onnx", max_batch_size=256,
            input=[mc.ModelInput(name=INPUT_NAME, data_type=mc.TYPE_FP32, dims=list(INPUT_SHAPE))],
            output=[mc.ModelOutput(name=name, data_type=mc.TYPE_FP32, dims=[CLASSES]) for name in OUTPUT_NAMES]))

    async def ModelStatistics(self, request, context):
        return pb.ModelStatisticsResponse(model_stats=[pb.ModelStatistics(name=NAME, version=MODEL_VERSION)])

    async def ModelInfer(self, request, context):
        shape = list(request.inputs[0].shape)
        x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(shape)
        logits, probs = self.session.run(None, {INPUT_NAME: x})
        T = pb.ModelInferResponse.InferOutputTensor
        return pb.ModelInferResponse(
            model_name=NAME, model_version=MODEL_VERSION, id=request.id,
            outputs=[T(name=LOGITS, datatype="FP32", shape=logits.shape),
                     T(name=PROBABILITIES, datatype="FP32", shape=probs.shape)],
            raw_output_contents=[logits.tobytes(), probs.tobytes()])


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--intra-op-threads", type=int, default=1)
    args = ap.parse_args()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Reference(args.model, args.intra_op_threads), server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    print(f"reference serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
