"""Soak and overload: `network3 serve` under a mix of clients on loopback, then past its queue.

1. Soak (--seconds, default 600): paced clients in their own processes, both APIs: 1-image and
   64-image unary requests, PNG files decoded by the server, and long-lived streams of 16-image
   requests (reopened every 30 s).  Every answer is checked against the digits' known
   predictions.  Reported: requests and images served, errors by status code (none expected),
   p50/p99 latency per kind and per interval (default a minute), the server's resident memory
   (RSS) after warm-up (the first minute; a third of shorter runs) and at the end (goal: growth
   under 10%), and the server's own request counts beside the clients'.
2. Overload (--overload-seconds, default 30): 160 concurrent 64-image requests (10,240 images
   wanted, twice the default 4,096-image queue).  Goals: the excess is refused with
   RESOURCE_EXHAUSTED at once (p99 of refusals far below the accepted p99), accepted requests
   keep a bounded latency, nothing else fails.
3. Recovery (--recovery-seconds, default 30): the soak mix again; no refusals, latency as before.

Load generators are bounded: a fixed set of processes, each with an end time, a deadline on
every call, and only 127.0.0.1 as a target.  Exit status 1 when a goal is missed.

    python benchmarks/soak.py --model models/default.onnx [--seconds 600] [--json soak.json]
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from serving.contract import INPUT_NAME, INPUT_SHAPE, MODEL_NAME  # noqa: E402
from serving.launch import ServerProcess  # noqa: E402

HOST = "127.0.0.1"  # the only address any load goes to
DEADLINE_S = 30.0  # per call

# name: (requests per second, images per request, how it is sent)
MIX = {
    "classify-1": (120, 1, "classify"),
    "classify-64": (6, 64, "classify"),
    "classify-png-8": (10, 8, "png"),
    "infer-1": (120, 1, "infer"),
    "infer-64": (6, 64, "infer"),
    "stream-16": (15, 16, "stream"),
    "infer-stream-16": (15, 16, "infer_stream"),
}


# --------------------------------------------------------------------------- requests --

def make_requests(kind: str, n: int, pixels: np.ndarray, pngs: list[bytes]):
    from protos.inference import grpc_service_pb2 as v2
    from protos.network3.v1 import classifier_pb2 as pb

    if kind in ("classify", "stream"):
        return pb.ClassifyRequest(images=[pb.Image(pixels=p.tobytes()) for p in pixels[:n]])
    if kind == "png":
        return pb.ClassifyRequest(images=[pb.Image(encoded=b) for b in pngs[:n]])
    x = pixels[:n].reshape(n, *INPUT_SHAPE)
    return v2.ModelInferRequest(model_name=MODEL_NAME, inputs=[v2.ModelInferRequest.InferInputTensor(
        name=INPUT_NAME, datatype="UINT8", shape=list(x.shape))], raw_input_contents=[x.tobytes()])


def digits_of(response) -> list[int]:
    if hasattr(response, "predictions"):
        return [p.digit for p in response.predictions]
    if hasattr(response, "infer_response"):
        response = response.infer_response
    return np.frombuffer(response.raw_output_contents[1], np.float32).reshape(-1, 10).argmax(1).tolist()


# ------------------------------------------------------------------ paced load (soak) --

def paced_worker(name: str, address: str, t0: float, seconds: float, scale: float, data: dict) -> list:
    """One client process: requests of one kind at a steady rate until t0 + seconds.
    Returns [(end time - t0, latency s, code, images, wrong answers, kind)]."""
    import grpc

    from protos.inference import grpc_service_pb2_grpc as v2_grpc
    from protos.network3.v1 import classifier_pb2_grpc as pb_grpc

    rate, n, kind = MIX[name]
    rate *= scale
    pixels, pngs, expected = data["pixels"], data["pngs"], data["expected"][:n]
    request = make_requests(kind, n, pixels, pngs)
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
    classify, infer = pb_grpc.DigitClassifierStub(channel), v2_grpc.GRPCInferenceServiceStub(channel)
    end = t0 + seconds
    out = []
    time.sleep(max(0.0, t0 - time.time()))  # every client starts on the same clock
    if kind in ("stream", "infer_stream"):
        while time.time() < end:
            out += _one_stream(classify.ClassifyStream if kind == "stream" else infer.ModelStreamInfer,
                               request, n, expected, rate, t0, min(end, time.time() + 30))
        return [(*r, name) for r in out]
    call = classify.Classify if kind in ("classify", "png") else infer.ModelInfer
    next_at = time.time()
    while True:
        now = time.time()
        if now >= end:
            break
        if next_at > now:
            time.sleep(next_at - now)
        next_at = max(next_at + 1 / rate, time.time() - 1 / rate)  # no catch-up bursts
        start = time.perf_counter()
        try:
            got = digits_of(call(request, timeout=DEADLINE_S))
            code, wrong = "OK", sum(a != b for a, b in zip(got, expected)) + abs(len(got) - n)
        except grpc.RpcError as e:
            code, wrong = e.code().name, 0
        out.append((time.time() - t0, time.perf_counter() - start, code, n, wrong, name))
    channel.close()
    return out


def _one_stream(method, request, n, expected, rate, t0, until) -> list:
    """A stream that sends `rate` requests/s until `until`; latency from each send to its answer."""
    import grpc

    sent: list[float] = []

    def requests():
        next_at = time.time()
        while time.time() < until:
            now = time.time()
            if next_at > now:
                time.sleep(next_at - now)
            next_at = max(next_at + 1 / rate, time.time() - 1 / rate)
            sent.append(time.perf_counter())
            yield request

    out, i = [], 0
    try:
        for response in method(requests(), timeout=(until - time.time()) + DEADLINE_S):
            if getattr(response, "error_message", "") or (hasattr(response, "error") and response.HasField("error")):
                code, wrong = "STREAM_ERROR", 0
            else:
                got = digits_of(response)
                code, wrong = "OK", sum(a != b for a, b in zip(got, expected)) + abs(len(got) - n)
            out.append((time.time() - t0, time.perf_counter() - sent[i], code, n, wrong))
            i += 1
    except grpc.RpcError as e:
        for _ in range(len(sent) - i):  # every request not answered counts as failed
            out.append((time.time() - t0, 0.0, e.code().name, n, 0))
    return out


# --------------------------------------------------------------------- overload phase --

def overload_worker(address: str, t0: float, seconds: float, concurrency: int, data: dict) -> list:
    """`concurrency` 64-image requests kept in flight (grpc.aio), half on each API."""
    import grpc

    from protos.inference import grpc_service_pb2_grpc as v2_grpc
    from protos.network3.v1 import classifier_pb2_grpc as pb_grpc

    out = []

    async def main():
        async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
            calls = [(pb_grpc.DigitClassifierStub(ch).Classify, make_requests("classify", 64, data["pixels"], []), "classify-64"),
                     (v2_grpc.GRPCInferenceServiceStub(ch).ModelInfer, make_requests("infer", 64, data["pixels"], []), "infer-64")]
            end = t0 + seconds
            await asyncio.sleep(max(0.0, t0 - time.time()))

            async def loop(k):
                call, request, kind = calls[k % 2]
                while time.time() < end:
                    start = time.perf_counter()
                    try:
                        response = await call(request, timeout=DEADLINE_S)
                        got = digits_of(response)
                        code, wrong = "OK", sum(a != b for a, b in zip(got, data["expected"][:64]))
                    except grpc.RpcError as e:
                        code, wrong = e.code().name, 0
                    out.append((time.time() - t0, time.perf_counter() - start, code, 64, wrong, kind))
                    if code == "RESOURCE_EXHAUSTED":
                        await asyncio.sleep(0.002)  # a refused client comes back almost at once

            await asyncio.gather(*(loop(k) for k in range(concurrency)))

    asyncio.run(main())
    return out


# ----------------------------------------------------------------------------- server --

class Server(ServerProcess):
    """`network3 serve` on loopback with metrics on (serving.launch), and what the soak reads of it."""

    def __init__(self, model: str, args: list[str], log: Path) -> None:
        super().__init__(model, "--host", HOST, "--metrics-port", "0", "--no-access-log", *args, log=log)

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024

    def requests_by_code(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}/metrics", timeout=10).read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "network3_requests_total":
                    key = f"{s.labels['method']} {s.labels['code']}"
                    out[key] = out.get(key, 0) + s.value
        return out


# ---------------------------------------------------------------------------- analysis --

def summarize(records: list, interval: float, seconds: float) -> dict:
    """Counts, codes and latency of one phase; p50/p99 per interval (a request that ends after
    the phase counts in its last interval)."""
    codes: dict[str, int] = {}
    for r in records:
        codes[r[2]] = codes.get(r[2], 0) + 1

    def pct(lat, q):
        return round(float(np.percentile(np.array(lat) * 1000, q)), 2) if len(lat) else None

    ok = [r[1] for r in records if r[2] == "OK"]
    by_kind = {}
    for kind in sorted({r[5] for r in records}):
        lat = [r[1] for r in records if r[5] == kind and r[2] == "OK"]
        by_kind[kind] = {"requests": sum(r[5] == kind for r in records), "ok": len(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
    last = max(0, int(np.ceil(seconds / interval)) - 1)
    buckets: list[list] = [[] for _ in range(last + 1)]
    for r in records:
        buckets[min(max(0, int(r[0] // interval)), last)].append(r)
    rows = [{"from_s": round(i * interval), "requests": len(b), "errors": sum(r[2] != "OK" for r in b),
             "p50_ms": pct([r[1] for r in b if r[2] == "OK"], 50), "p99_ms": pct([r[1] for r in b if r[2] == "OK"], 99)}
            for i, b in enumerate(buckets)]
    return {"requests": len(records), "images_ok": int(sum(r[3] for r in records if r[2] == "OK")),
            "codes": codes, "wrong_answers": int(sum(r[4] for r in records)),
            "p50_ms": pct(ok, 50), "p99_ms": pct(ok, 99), "by_kind": by_kind, "intervals": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the ONNX file to serve")
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 600)), help="soak duration ($SOAK_SECONDS)")
    ap.add_argument("--overload-seconds", type=float, default=30)
    ap.add_argument("--recovery-seconds", type=float, default=30)
    ap.add_argument("--overload-concurrency", type=int, default=160, help="64-image requests in flight while overloading")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every soak client's request rate")
    ap.add_argument("--interval", type=float, default=None, help="latency table interval (default 60 s; 10 s under 5 minutes)")
    ap.add_argument("--server-args", default="", help="extra `network3 serve` options, e.g. '--max-queue-size 2048'")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--data-dir", help="MNIST folder (as for network3-train data)")
    args = ap.parse_args()
    interval = args.interval or (60.0 if args.seconds >= 300 else 10.0)

    from PIL import Image

    from serving.model import ModelOptions, load_model
    from serving.preprocess import pixels_to_input
    from training.data import load

    mnist = load(args.data_dir, verbose=False)
    pixels = mnist.test_x[:64]
    pngs = []
    for p in pixels[:8]:
        buf = io.BytesIO()
        Image.fromarray(255 - np.kron(p, np.ones((4, 4), np.uint8))).save(buf, format="PNG")  # a 112x112 scan
        pngs.append(buf.getvalue())
    reference = load_model(args.model, ModelOptions(intra_op_threads=1))
    expected = reference.predict(pixels_to_input(pixels))[1].argmax(1).tolist()
    data = {"pixels": pixels, "pngs": pngs, "expected": expected}
    data_png = dict(data)

    log = Path(tempfile.mkdtemp(prefix="soak-")) / "server.log"
    server = Server(args.model, args.server_args.split(), log)
    result: dict = {"model": args.model, "seconds": args.seconds, "interval_s": interval, "server_log": str(log),
                    "mix": {k: {"rate": v[0] * args.scale, "images": v[1]} for k, v in MIX.items()}}
    ctx = mp.get_context("spawn")  # grpc is not fork-safe
    try:
        result["rss_idle_mib"] = round(server.rss_mib(), 1)
        rss: list[tuple[float, float]] = []
        with ctx.Pool(len(MIX)) as pool:
            # PNGs decoded by the server: check them against what the server answers for them.
            import grpc

            from protos.network3.v1 import classifier_pb2_grpc as pb_grpc

            with grpc.insecure_channel(server.address) as ch:
                answer = pb_grpc.DigitClassifierStub(ch).Classify(make_requests("png", 8, pixels, pngs), timeout=DEADLINE_S)
            data_png["expected"] = [p.digit for p in answer.predictions] + expected[8:]
            print(f"soak: {args.seconds:.0f} s, {len(MIX)} client processes, server {server.address}", file=sys.stderr)
            counted = server.requests_by_code()
            t0 = time.time() + 1.0
            jobs = [pool.apply_async(paced_worker, (name, server.address, t0, args.seconds, args.scale,
                                                    data_png if MIX[name][2] == "png" else data)) for name in MIX]
            give_up = t0 + args.seconds + DEADLINE_S + 120
            while not all(j.ready() for j in jobs) and time.time() < give_up:
                rss.append((time.time() - t0, server.rss_mib()))
                time.sleep(1.0)
            soak = [r for j in jobs for r in j.get(DEADLINE_S)]
        warm = min(60.0, args.seconds / 3)  # allocator arenas, gRPC buffers and caches fill first
        after_warmup = next((m for t, m in rss if t >= warm), rss[0][1])
        end = rss[-1][1]
        result["soak"] = summarize(soak, interval, args.seconds)
        for row in result["soak"]["intervals"]:  # the server's RSS at the end of each interval
            row["rss_mib"] = round(([rss[0][1]] + [m for t, m in rss if t <= row["from_s"] + interval])[-1], 1)
        result["soak"]["server_counted"], counted = delta(server.requests_by_code(), counted)
        result["rss_mib"] = {"after_warmup": round(after_warmup, 1), "end": round(end, 1),
                             "max": round(max(m for _, m in rss), 1), "growth_pct": round(100 * (end / after_warmup - 1), 2),
                             "warmup_s": warm}

        print(f"overload: {args.overload_concurrency} concurrent 64-image requests for {args.overload_seconds:.0f} s",
              file=sys.stderr)
        with ctx.Pool(1) as pool:
            t1 = time.time() + 1.0
            over = pool.apply_async(overload_worker, (server.address, t1, args.overload_seconds,
                                                      args.overload_concurrency, data)).get(args.overload_seconds + 180)
        result["overload"] = summarize(over, max(5.0, args.overload_seconds / 6), args.overload_seconds)
        result["overload"]["server_counted"], counted = delta(server.requests_by_code(), counted)
        refused = np.array([r[1] for r in over if r[2] == "RESOURCE_EXHAUSTED"]) * 1000
        result["overload"]["refused_p50_ms"] = round(float(np.percentile(refused, 50)), 2) if len(refused) else None
        result["overload"]["refused_p99_ms"] = round(float(np.percentile(refused, 99)), 2) if len(refused) else None

        print(f"recovery: the soak mix for {args.recovery_seconds:.0f} s", file=sys.stderr)
        with ctx.Pool(len(MIX)) as pool:
            t2 = time.time() + 1.0
            jobs = [pool.apply_async(paced_worker, (name, server.address, t2, args.recovery_seconds, args.scale,
                                                    data_png if MIX[name][2] == "png" else data)) for name in MIX]
            recovery = [r for j in jobs for r in j.get(args.recovery_seconds + DEADLINE_S + 120)]
        result["recovery"] = summarize(recovery, max(5.0, args.recovery_seconds / 3), args.recovery_seconds)
        result["recovery"]["server_counted"], counted = delta(server.requests_by_code(), counted)
        result["rss_mib"]["after_overload_and_recovery"] = round(server.rss_mib(), 1)
    finally:
        result["server_exit"] = server.stop()

    goals = check(result)
    result["goals"] = goals
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(ok for ok, _ in goals.values()) else 1


def delta(now: dict, before: dict) -> tuple[dict, dict]:
    """RPCs the server counted since `before`, by method and code (a stream counts once), and
    `now` for the next phase: the unary counts must equal the clients'."""
    return {k: int(v - before.get(k, 0)) for k, v in now.items() if v != before.get(k, 0)}, now


def unary_counts_match(phase: dict) -> tuple[bool, str]:
    """Every unary request a client made, the server counted with the same code (nothing lost
    or invented); streams are checked message by message on the client side."""
    client: dict[str, int] = {}
    for kind, k in phase["by_kind"].items():
        if "stream" not in kind:
            method = "Classify" if kind.startswith("classify") else "ModelInfer"
            client[method] = client.get(method, 0) + k["requests"]
    server: dict[str, int] = {}
    for key, n in phase["server_counted"].items():
        method = key.split()[0]
        if method in ("Classify", "ModelInfer"):
            server[method] = server.get(method, 0) + n
    return client == server, f"clients {client}, server {server}"


def check(r: dict) -> dict[str, tuple[bool, str]]:
    soak, over, rec, rss = r["soak"], r["overload"], r["recovery"], r["rss_mib"]
    soak_errors = {k: v for k, v in soak["codes"].items() if k != "OK"}
    over_other = {k: v for k, v in over["codes"].items() if k not in ("OK", "RESOURCE_EXHAUSTED")}
    rec_errors = {k: v for k, v in rec["codes"].items() if k != "OK"}
    refused = over["codes"].get("RESOURCE_EXHAUSTED", 0)
    return {
        "soak: no errors, no wrong answer": (not soak_errors and soak["wrong_answers"] == 0,
                                             f"errors {soak_errors or 0}, wrong answers {soak['wrong_answers']}"),
        "soak: RSS growth under 10%": (rss["growth_pct"] < 10, f"{rss['after_warmup']} -> {rss['end']} MiB ({rss['growth_pct']:+.1f}%)"),
        "overload: sheds with RESOURCE_EXHAUSTED": (refused > 0, f"{refused:,} of {over['requests']:,} refused"),
        "overload: nothing else fails": (not over_other and over["wrong_answers"] == 0, f"other codes {over_other or 0}"),
        "overload: refused at once": (refused > 0 and over["refused_p99_ms"] is not None and over["p99_ms"] is not None
                                      and over["refused_p99_ms"] < over["p99_ms"] / 2,
                                      f"refused p99 {over['refused_p99_ms']} ms vs accepted p99 {over['p99_ms']} ms"),
        "overload: accepted latency bounded": (over["p99_ms"] is not None and over["p99_ms"] < DEADLINE_S * 1000 / 3,
                                               f"accepted p50 {over['p50_ms']} ms, p99 {over['p99_ms']} ms"),
        "recovery: no refusals, latency as in the soak": (not rec_errors and rec["wrong_answers"] == 0 and rec["p99_ms"] is not None
                                                          and soak["p99_ms"] is not None and rec["p99_ms"] < 3 * soak["p99_ms"] + 5,
                                                          f"errors {rec_errors or 0}, p99 {rec['p99_ms']} ms (soak {soak['p99_ms']} ms)"),
        "soak: every unary request counted by the server": unary_counts_match(soak),
        "overload: every unary request counted by the server": unary_counts_match(over),
        "server exits 0 on SIGTERM": (r["server_exit"] == 0, f"exit {r['server_exit']}"),
    }


def report(r: dict) -> None:
    s = r["soak"]
    print(f"\nsoak, {r['seconds']:.0f} s: {s['requests']:,} requests, {s['images_ok']:,} images answered, codes {s['codes']}, "
          f"wrong answers {s['wrong_answers']}; latency p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms")
    print(f"  {'kind':<16} {'requests':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for kind, k in s["by_kind"].items():
        print(f"  {kind:<16} {k['requests']:>9,} {k['p50_ms']:>8} {k['p99_ms']:>8}")
    print(f"  {'from':>6} {'requests':>9} {'errors':>7} {'p50 ms':>8} {'p99 ms':>8} {'RSS MiB':>8}")
    for row in s["intervals"]:
        print(f"  {row['from_s']:>5}s {row['requests']:>9,} {row['errors']:>7} {row['p50_ms']:>8} {row['p99_ms']:>8} "
              f"{row['rss_mib']:>8}")
    print(f"  the server counted (RPCs; a stream once): {s['server_counted']}")
    m = r["rss_mib"]
    print(f"server RSS: idle {r['rss_idle_mib']} MiB, after {m['warmup_s']:.0f} s {m['after_warmup']} MiB, "
          f"end {m['end']} MiB ({m['growth_pct']:+.2f}%), max {m['max']} MiB; after overload and recovery "
          f"{m['after_overload_and_recovery']} MiB")
    o = r["overload"]
    print(f"overload: {o['requests']:,} requests, codes {o['codes']}; accepted p50 {o['p50_ms']} ms, p99 {o['p99_ms']} ms; "
          f"refused p50 {o['refused_p50_ms']} ms, p99 {o['refused_p99_ms']} ms; the server counted {o['server_counted']}")
    c = r["recovery"]
    print(f"recovery: {c['requests']:,} requests, codes {c['codes']}; p50 {c['p50_ms']} ms, p99 {c['p99_ms']} ms")
    for name, (ok, detail) in r["goals"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")


if __name__ == "__main__":
    sys.exit(main())
