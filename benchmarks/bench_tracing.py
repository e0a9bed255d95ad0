"""What tracing costs one 1-image request: the whole ModelInfer handler in-process (the rpc
wrapper, metrics, access log, batcher, onnxruntime), as bench_serve.py's profile() times it,
with tracing off and on (serving.tracing with the SDK's BatchSpanProcessor and an exporter that
drops the spans, so no network is timed), every request traced or 1% of them
(OTEL_TRACES_SAMPLER=traceidratio).

    python benchmarks/bench_tracing.py --model models/default.onnx [--rounds 3]

Prints CPU and wall-clock microseconds per request, best of 5 x 3,000 per configuration, the
configurations alternating for --rounds rounds.  Run on a machine doing nothing else.  Without
serving.tracing (an older checkout on PYTHONPATH) it times only `off`.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
from bench_serve import Context  # noqa: E402  (benchmarks/ is this script's folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", type=int, default=3000, help="requests per repeat")
    args = ap.parse_args()

    import serving
    from protos.inference import grpc_service_pb2 as pb
    from serving.api.common import AccessLog, Serving
    from serving.api.inference import InferenceServicer
    from serving.batcher import DynamicBatcher
    from serving.contract import INPUT_NAME, INPUT_SHAPE, MODEL_NAME
    from serving.metrics import Stats
    from serving.model import ModelOptions, load_model

    print(f"serving from {Path(serving.__file__).parent}", file=sys.stderr)
    model = load_model(args.model, ModelOptions(intra_op_threads=1))
    stats = Stats()
    s = Serving(batcher=DynamicBatcher(model, stats=stats), stats=stats, access=AccessLog(stream=io.StringIO()))
    servicer, ctx = InferenceServicer(s), Context()
    x = np.zeros((1, *INPUT_SHAPE), np.float32)
    request = pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[pb.ModelInferRequest.InferInputTensor(
        name=INPUT_NAME, datatype="FP32", shape=list(x.shape))], raw_input_contents=[x.tobytes()])

    configs = {"off": None}
    try:
        from serving.tracing import Tracing
    except ImportError:
        pass
    else:
        from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

        class Drop(SpanExporter):
            def export(self, spans):
                return SpanExportResult.SUCCESS

        configs["on"] = Tracing(Drop())
        # The SDK reads the sampler from the environment when the provider is made.
        os.environ.update(OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG="0.01")
        configs["on, 1% sampled"] = Tracing(Drop())

    async def timed(n: int) -> tuple[float, float]:
        best_cpu = best_wall = float("inf")
        for _ in range(5):
            c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
            for _ in range(n):
                await servicer.ModelInfer(request, ctx)
            best_cpu = min(best_cpu, (time.thread_time_ns() - c0) / n / 1000)
            best_wall = min(best_wall, (time.perf_counter_ns() - w0) / n / 1000)
        return best_cpu, best_wall

    gc.collect()
    gc.freeze()  # as serving.server.serve does once the server is up

    async def run():
        results = {name: [] for name in configs}
        await timed(500)  # warm up
        for _ in range(args.rounds):
            for name, tracing in configs.items():
                s.tracing = tracing
                results[name].append(await timed(args.n))
        return results

    results = asyncio.run(run())
    print("| tracing | CPU µs per request | wall µs per request |\n|---|---:|---:|")
    for name, rs in results.items():
        cpu, wall = [r[0] for r in rs], [r[1] for r in rs]
        print(f"| {name} | {min(cpu):.1f}-{max(cpu):.1f} | {min(wall):.1f}-{max(wall):.1f} |")


if __name__ == "__main__":
    main()
