"""Scaling benchmark: `network3 serve --workers N` for N = 1, 2, 4, ... up to the cores.

For each N, one server (`--workers N --intra-op-threads 1 --wide-threads 1 --no-http --metrics-port 0`:
one onnxruntime thread per worker at every batch size, so that N workers use N cores) under
1-image requests at concurrency 4 x N and 64-image requests at 2 x N (--per-worker), the load generator on the
same host; beside it the in-process onnxruntime ceiling (bench_serve.ceiling, one thread) and
the ratio to N x one worker's throughput (issue 18's goal: at least 0.7 x N up to N = 8).

Load generators (`--load`):
  * perf_analyzer (Triton's, from the tritonclient wheel), with
    TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT=1: one connection per concurrent request, since
    SO_REUSEPORT spreads connections, not requests, over the workers (with perf_analyzer's
    default, 6 requests share a connection: at 2 workers one of them served every request);
  * python: processes with grpc.aio, each concurrent request on its own channel and connection
    (a local subchannel pool), unary v2 ModelInfer in a closed loop.  It needs only grpcio,
    protobuf and numpy (a host without tritonclient);
  * auto (the default): perf_analyzer where it runs, else python.

    python3 benchmarks/bench_scale.py --model models/default.onnx [--seconds S] [--max-workers N] [--quick]

The `per worker` column is each worker's share of the requests (min-max %), from the access log:
the kernel hashes each connection to a worker, so with 2 connections per worker some workers
get 3 or 4 and some none (a raised --per-worker evens it out).
Only numbers from a machine doing nothing else mean anything; the load generator shares the cores.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_serve import Result, ceiling, run_perf, write_report  # noqa: E402
from serving.contract import INPUT_NAME, INPUT_SHAPE, MODEL_NAME  # noqa: E402
from serving.launch import ServerProcess, perf_analyzer  # noqa: E402

SIZES = (1, 64)  # images per request
ACCESS_PID = re.compile(r" access pid=(\d+) ")
METHOD = "/inference.GRPCInferenceService/ModelInfer"


def worker_counts(cores: int) -> list[int]:
    """1, 2, 4, ... up to `cores`, and `cores` itself when it is not a power of two."""
    counts = [1 << i for i in range(cores.bit_length()) if 1 << i <= cores]
    return counts + ([cores] if counts[-1] != cores else [])


def cpu_line() -> str:
    """The CPU's model name and its vector flags, from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU unknown"
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
    flags = set(flags.group(1).split()) if flags else set()
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f in flags]
    return f"{model.group(1).strip() if model else 'CPU unknown'} ({', '.join(have) or 'no avx2'})"


# ------------------------------------------------------------------- python load generator --

def request_bytes(images: int) -> bytes:
    from protos.inference import grpc_service_pb2 as pb
    x = np.zeros((images, *INPUT_SHAPE), np.float32)
    return pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[pb.ModelInferRequest.InferInputTensor(
        name=INPUT_NAME, datatype="FP32", shape=list(x.shape))], raw_input_contents=[x.tobytes()]).SerializeToString()


def _load_process(address: str, wire: bytes, streams: int, warmup: float, seconds: float, barrier, queue) -> None:
    """`streams` closed loops, each on its own channel (its own connection); once every process
    is connected, `warmup` seconds unmeasured, then `seconds` measured.  Puts (latencies of the
    calls started in the window, errors, the first error) on `queue`."""
    import grpc

    options = [("grpc.use_local_subchannel_pool", 1),  # else channels in one process share one connection
               ("grpc.max_receive_message_length", 1 << 26), ("grpc.max_send_message_length", 1 << 26)]

    async def run():
        channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(streams)]
        await asyncio.gather(*(c.channel_ready() for c in channels))
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
        start = time.monotonic() + warmup
        stop = start + seconds
        latencies, errors, first = [], 0, ""

        async def loop(channel):
            nonlocal errors, first
            call = channel.unary_unary(METHOD)  # bytes in, bytes out: the load generator parses nothing
            while (t0 := time.monotonic()) < stop:
                try:
                    await call(wire)
                except grpc.aio.AioRpcError as e:
                    errors += 1
                    first = first or f"{e.code().name}: {e.details()}"
                    continue
                if t0 >= start:
                    latencies.append(time.monotonic() - t0)

        await asyncio.gather(*(loop(c) for c in channels))
        for c in channels:
            await c.close()
        return latencies, errors, first

    latencies, errors, first = asyncio.run(run())
    queue.put((np.asarray(latencies, np.float64), errors, first))


def run_python(address: str, images: int, concurrency: int, seconds: float, server: str, processes: int) -> Result:
    """`concurrency` requests in flight from up to `processes` processes, for `seconds`."""
    ctx = multiprocessing.get_context("spawn")  # no forking a process that has loaded gRPC
    n = max(1, min(processes, concurrency))
    barrier, queue, wire = ctx.Barrier(n), ctx.Queue(), request_bytes(images)
    warmup = min(1.0, seconds / 4)
    procs = [ctx.Process(target=_load_process, daemon=True,
                         args=(address, wire, concurrency // n + (i < concurrency % n), warmup, seconds, barrier, queue))
             for i in range(n)]
    for p in procs:
        p.start()
    parts = [queue.get(timeout=seconds + warmup + 120) for _ in procs]
    for p in procs:
        p.join(10)
    errors = sum(e for _, e, _ in parts)
    latencies = np.concatenate([lat for lat, _, _ in parts])
    if not len(latencies):
        raise RuntimeError(f"python load: no call succeeded against {server} ({errors} errors: "
                           f"{next((f for *_, f in parts if f), '')})")
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    return Result(server, images, concurrency, len(latencies) / seconds, float(p50), float(p99), {},
                  f"{errors} errors" if errors else "")


def report(results: list[tuple[int, Result, str]], ceil: dict[int, float], load: str, seconds: float, cores: int,
           model: str) -> str:
    """The markdown table: one row per (workers, images/request), and the goal's line."""
    lines = [f"# Scaling benchmark ({time.strftime('%Y-%m-%d %H:%M %Z')})", "",
             f"- CPU: {cpu_line()}; {cores} cores this process may use ({os.cpu_count()} online)",
             f"- load generator: {load}, on the same host; {seconds:g} s per point",
             f"- server: `--workers N --intra-op-threads 1 --wide-threads 1 --no-http --metrics-port 0`, model {model}",
             "- in-process onnxruntime ceiling, one thread: " + ", ".join(f"batch {b}: {v:,.0f} images/s" for b, v in ceil.items()),
             "", "| workers | images/request | concurrency | requests/s | images/s | p50 ms | p99 ms "
             "| / (N x 1 worker) | / (N x ceiling) | per worker (min-max, workers seen) | |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    one = {r.images: r.images_s for n, r, _ in results if n == 1}
    for n, r, share in results:
        lines.append(f"| {n} | {r.images} | {r.concurrency} | {r.requests_s:,.0f} | {r.images_s:,.0f} | {r.p50_ms:.2f} | "
                     f"{r.p99_ms:.2f} | {r.images_s / (n * one[r.images]):.2f} | {r.images_s / (n * ceil[r.images]):.0%} | "
                     f"{share} | {r.note} |")
    worst = [(r.images_s / (n * one[r.images]), n, r.images) for n, r, _ in results if 1 < n <= 8]
    if worst:
        ratio, n, images = min(worst)
        lines += ["", f"Goal: at least 0.7 x N times one worker's throughput up to N = 8: the lowest here is "
                      f"{ratio:.2f} ({n} workers, {images}-image requests): {'met' if ratio >= 0.7 else 'NOT met'}."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- main --

def main() -> None:
    cores = len(os.sched_getaffinity(0))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="the ONNX file to serve")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per point")
    ap.add_argument("--max-workers", type=int, default=cores, help=f"the most workers (default: the {cores} cores this process may use)")
    ap.add_argument("--load", choices=("auto", "python", "perf_analyzer"), default="auto")
    ap.add_argument("--per-worker", default="4,2", help="requests in flight per worker, 1-image and 64-image "
                    "(SO_REUSEPORT hashes connections to workers: with few per worker, some get more than others)")
    ap.add_argument("--quick", action="store_true", help="2 s per point, 1 s ceilings: a smoke run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "scale.md")
    args = ap.parse_args()
    args.model = args.model.resolve()  # the servers run from the repo root
    if not args.model.exists():
        sys.exit(f"{args.model}: no such model; run `make train export` (or pass --model)")
    seconds = 2.0 if args.quick else args.seconds
    per_worker = dict(zip(SIZES, (int(c) for c in args.per_worker.split(","))))
    found = perf_analyzer() if args.load != "python" else None
    if args.load == "perf_analyzer" and found is None:
        sys.exit("perf_analyzer does not run here (`make perf-analyzer-deps`; it needs tritonclient, "
                 "nvidia-cuda-runtime-cu12 and Debian's libb64-0d); --load python needs only grpcio")
    if found:
        binary, env = found
        env.setdefault("TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT", "1")  # one connection per request in flight
        load = f"perf_analyzer (TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT={env['TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT']})"
    else:
        load = f"python (grpc.aio, {cores} processes at most, one connection per request in flight)"

    print("in-process ceiling ...", file=sys.stderr, flush=True)
    ceil = {b: ceiling(args.model, b, 1.0 if args.quick else 3.0)[1] for b in SIZES}  # images/s, one thread

    results: list[tuple[int, Result, str]] = []  # (workers, result, per-worker share)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        for n in worker_counts(args.max_workers):
            print(f"{n} worker(s): starting ...", file=sys.stderr, flush=True)
            server = ServerProcess(args.model, "--workers", str(n), "--intra-op-threads", "1", "--wide-threads", "1", "--no-http",
                                   "--metrics-port", "0", log=log, timeout=300)
            try:
                for images in SIZES:
                    c = per_worker[images] * n
                    print(f"{n} worker(s): {images} image(s)/request, concurrency {c} ...", file=sys.stderr, flush=True)
                    offset = len(server.log())
                    if found:
                        r = run_perf(binary, env, server.address, images, c, int(seconds * 1000 / 3), f"{n} workers")
                    else:
                        r = run_python(server.address, images, c, seconds, f"{n} workers", cores)
                    time.sleep(0.3)  # the access log is flushed every 0.25 s
                    pids = Counter(ACCESS_PID.findall(server.log()[offset:]))
                    total = sum(pids.values())
                    least = min(pids.values()) if len(pids) == n else 0  # a worker that got nothing: 0%
                    share = f"{least / total:.0%}-{max(pids.values()) / total:.0%} ({len(pids)})" if total and n > 1 else ""
                    results.append((n, r, share))
            finally:
                server.stop()

    write_report(report(results, ceil, load, seconds, cores, args.model.name), args.out)


if __name__ == "__main__":
    main()
