"""HTTP benchmark: perf_analyzer -i http against network3 and the thinnest aiohttp server.

  * `network3`: `network3 serve` as bench_serve runs it (batcher, access log on), over HTTP
    (the v2 REST API) and, for HTTP's cost beside gRPC's, the same requests over gRPC;
  * `reference`: benchmarks/reference_http.py, aiohttp with onnxruntime called inline.

Cases: 1-image requests with JSON tensors at concurrency 1 and 16, 64-image requests with
Triton's binary tensor data at concurrency 16 (all-zero FP32 input), each case run against
network3 over HTTP, the reference, and network3 over gRPC one after the other, who goes first
rotating from case to case (both servers run throughout, only one is loaded at a time).  Then POSTs of a real MNIST
PNG to network3's /v1/classify, one after the other on one keep-alive connection (as
`curl --data-binary @seven.png host:8000/v1/classify`), with p50 and p99.  Prints a markdown
table, the goals as ratios within this one run, and writes --out.

    python benchmarks/bench_http.py --model models/default.onnx [--quick]
    python benchmarks/bench_http.py --model models/default.onnx --compare-stacks [--quick]

--compare-stacks measures only the two thin servers' stacks, aiohttp against Starlette under
uvicorn (reference_http.py --stack starlette; `pip install uvicorn starlette` first), rounds
interleaved (aiohttp, starlette, aiohttp, starlette, ...).

Only numbers from a machine doing nothing else mean anything; perf_analyzer shares the cores.
"""
from __future__ import annotations

import argparse
import csv
import http.client
import importlib.metadata
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from serving.contract import MODEL_NAME  # noqa: E402
from bench_serve import perf_analyzer_env  # noqa: E402
from serving.launch import ServerProcess  # noqa: E402

REFERENCE_READY = re.compile(r"^reference http serving on (\S+):(\d+)$", re.MULTILINE)
REFERENCE = [sys.executable, str(ROOT / "benchmarks" / "reference_http.py")]


@dataclass(frozen=True)
class Case:
    protocol: str  # "http" or "grpc"
    images: int
    concurrency: int
    tensors: str  # "json" or "binary" (HTTP's tensor format; gRPC's are always raw bytes)

    @property
    def label(self) -> str:
        fmt = f"{self.tensors} tensors" if self.protocol == "http" else "raw tensors"
        return f"{'HTTP' if self.protocol == 'http' else 'gRPC'}, {self.images} image{'s' if self.images > 1 else ''}, {fmt}"


@dataclass
class Result:
    server: str
    case: Case
    requests_s: float
    p50_ms: float
    p99_ms: float
    note: str = ""
    row: dict = field(default_factory=dict, repr=False)

    @property
    def images_s(self) -> float:
        return self.requests_s * self.case.images


# ----------------------------------------------------------------------- perf_analyzer --

def run_perf(binary, env, address: str, case: Case, interval_ms: int, server: str, quick: bool) -> Result:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "perf.csv"
        base = [str(binary), "-m", MODEL_NAME, "-u", address, "-i", case.protocol, "--input-data", "zero",
                "-b", str(case.images), "--concurrency-range", str(case.concurrency),
                "--measurement-interval", str(interval_ms), "-f", str(out)]
        if case.protocol == "http":
            base += ["--input-tensor-format", case.tensors, "--output-tensor-format", case.tensors]
        r, note = None, "quick" if quick else ""
        if not quick:
            r = subprocess.run([*base, "-s", "15", "--max-trials", "6"], capture_output=True, text=True, env=env)
        if r is None or r.returncode != 0 or not out.exists():
            # A busy machine rarely gives three windows within 15%: take the measurement anyway, marked.
            note = note or "unstable"
            r = subprocess.run([*base, "-s", "1000", "--max-trials", "3"], capture_output=True, text=True, env=env)
        if r.returncode != 0 or not out.exists():
            raise RuntimeError(f"perf_analyzer failed for {server}, {case}:\n{r.stdout[-1500:]}{r.stderr[-1500:]}")
        row = next(csv.DictReader(out.open()))
    return Result(server, case, float(row["Inferences/Second"]) / case.images, float(row["p50 latency"]) / 1000,
                  float(row["p99 latency"]) / 1000, note, row)


# ------------------------------------------------------------------------- /v1/classify --

def mnist_png(path: Path | None) -> tuple[bytes, str]:
    """(PNG bytes, where from): --image, else demo/samples/7/0000.png, else MNIST's first test
    digit (a 7) from data/mnist.npz written as a PNG."""
    for p in ([path] if path else [ROOT / "demo" / "samples" / "7" / "0000.png"]):
        if p.exists():
            return p.read_bytes(), str(p)
    if path:
        sys.exit(f"{path}: no such image")
    from PIL import Image

    npz = ROOT / "data" / "mnist.npz"
    if not npz.exists():
        sys.exit("no MNIST PNG: pass --image, run `make demo` (demo/samples) or fetch data/mnist.npz")
    buf = io.BytesIO()
    Image.fromarray(np.load(npz)["test_x"][0]).save(buf, format="PNG")
    return buf.getvalue(), f"{npz} test_x[0] as PNG"


def classify_latency(host: str, port: int, png: bytes, n: int, warmup: int = 50) -> dict:
    """POST the PNG to /v1/classify n times, one after the other on one keep-alive connection."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    headers = {"Content-Type": "image/png"}
    answer = None
    times = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        conn.request("POST", "/v1/classify", body=png, headers=headers)
        response = conn.getresponse()
        body = response.read()
        t = time.perf_counter() - t0
        if response.status != 200:
            raise RuntimeError(f"/v1/classify answered {response.status}: {body[:300]!r}")
        if answer is None:
            answer = body
        if i >= warmup:
            times.append(t)
    conn.close()
    ms = np.array(times) * 1000
    return {"n": n, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean()), "per_s": n / sum(times), "answer": answer.decode()[:120]}


def v2_body(images: int, binary: bool) -> tuple[bytes, dict]:
    """A v2 REST infer request for `images` all-zero images, as perf_analyzer sends it."""
    outputs = [{"name": n, "parameters": {"binary_data": binary}} for n in ("logits", "probabilities")]
    t = {"name": "images", "shape": [images, 1, 28, 28], "datatype": "FP32"}
    zeros = np.zeros(images * 784, np.float32)
    if not binary:
        t["data"] = zeros.tolist()
        return json.dumps({"inputs": [t], "outputs": outputs}).encode(), {"Content-Type": "application/json"}
    t["parameters"] = {"binary_data_size": zeros.nbytes}
    head = json.dumps({"inputs": [t], "outputs": outputs}).encode()
    return head + zeros.tobytes(), {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_per_request(server: ServerProcess, port: int, images: int, binary: bool, n: int) -> tuple[float, float]:
    """(server CPU us, wall us) per request: n v2 infer requests one after the other on one
    keep-alive connection.  CPU time per request barely moves when other work shares the
    cores, unlike requests/s: the figure to compare on a busy machine."""
    body, headers = v2_body(images, binary)
    conn = http.client.HTTPConnection(server.host, port, timeout=30)
    path = f"/v2/models/{MODEL_NAME}/infer"

    def send() -> None:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"infer answered {response.status}: {data[:300]!r}")

    for _ in range(20):
        send()
    c0, t0 = process_cpu_s(server.pid), time.perf_counter()
    for _ in range(n):
        send()
    wall, cpu = time.perf_counter() - t0, process_cpu_s(server.pid) - c0
    conn.close()
    return cpu / n * 1e6, wall / n * 1e6


# ---------------------------------------------------------------------------- machine --

def machine() -> str:
    model, flags = "unknown CPU", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
        model = m.group(1).strip() if m else model
        m = re.search(r"^Flags:\s*(.+)$", out, re.MULTILINE)
        flags = set(m.group(1).split()) if m else set()
    except OSError:
        pass
    if not flags and Path("/proc/cpuinfo").exists():
        m = re.search(r"^flags\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        flags = set(m.group(1).split()) if m else set()
    isa = ("AVX-512 with VNNI (avx512_vnni)" if "avx512_vnni" in flags else "AVX-512 without VNNI" if "avx512f" in flags
           else "AVX2 (no AVX-512)" if "avx2" in flags else "no AVX2")
    return f"{model}, {os.cpu_count()} CPUs, {isa}"


def versions(*names: str) -> str:
    out = []
    for name in names:
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name} (not installed)")
    return ", ".join(out)


def header(args, title: str, packages: tuple[str, ...]) -> list[str]:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return [f"# {title} ({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC)", "",
            f"- CPU: {machine()}", f"- software: Python {sys.version.split()[0]}, {versions(*packages)}",
            f"- model: {args.model}, {args.intra_op_threads} intra-op thread(s) per server",
            f"- load average at the start (1, 5, 15 min): {load}"
            + (" -- `--quick`: short windows, a smoke run, not a measurement" if args.quick else ""), ""]


def table(results: list[Result]) -> list[str]:
    lines = ["| server | requests | concurrency | requests/s | images/s | p50 ms | p99 ms | |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r.server} | {r.case.label} | {r.case.concurrency} | {r.requests_s:,.0f} | {r.images_s:,.0f} | "
                     f"{r.p50_ms:.3f} | {r.p99_ms:.3f} | {r.note} |")
    return lines


CPU_CASES = ((1, False, "1 image, JSON tensors"), (64, True, "64 images, binary tensors"))


def cpu_table(servers: dict[str, tuple[ServerProcess, int]], n: int, rounds: int) -> list[str]:
    """Server CPU and wall time per request, sequential requests, servers interleaved."""
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for images, binary, what in CPU_CASES:
            for name, (server, port) in servers.items():
                count = n if images == 1 else max(n // 10, 20)
                print(f"{name}: {count} sequential requests, {what}, server CPU ...", file=sys.stderr, flush=True)
                rows.setdefault((what, name), []).append(cpu_per_request(server, port, images, binary, count))
    first = next(iter(servers))
    lines = [f"Server CPU per request (all the server process's threads, /proc; requests one after the other on one "
             f"keep-alive connection, {n:,} of 1 image, {max(n // 10, 20):,} of 64, median of {rounds} interleaved "
             f"rounds): the comparison that holds on a busy machine.", "",
             "| requests | server | server CPU us/request | wall us/request | CPU vs " + first + " |",
             "|---|---|---:|---:|---:|"]
    for _, _, what in CPU_CASES:
        base = statistics.median(c for c, _ in rows[(what, first)])
        for name in servers:
            cpu = statistics.median(c for c, _ in rows[(what, name)])
            wall = statistics.median(w for _, w in rows[(what, name)])
            lines.append(f"| {what} | {name} | {cpu:,.0f} | {wall:,.0f} | {cpu / base:.2f}x |")
    return lines


def start(kind: str, model: Path, threads: int, log: Path) -> ServerProcess:
    """`kind`'s server on free loopback ports, started and waited for."""
    if kind == "network3":  # as bench_serve: metrics on, access log on (the default), batcher on
        return ServerProcess(model, "--metrics-port", "0", "--intra-op-threads", str(threads), "--access-log", log=log)
    stack, _, parser = kind.partition(" ")  # "aiohttp", "starlette", "starlette httptools"
    args = ["--stack", stack] + (["--http", parser] if parser else [])
    return ServerProcess(model, "--intra-op-threads", str(threads), *args, log=log, ready=REFERENCE_READY,
                         command=REFERENCE)


# ------------------------------------------------------------------------------- runs --

def bench(args, binary, env, interval: int) -> str:
    png, png_from = mnist_png(args.image)
    json1 = [Case("http", 1, c, "json") for c in (1, 16)]
    bin64 = [Case("http", 64, 16, "binary")]
    cases = json1 + bin64
    grpc = [Case("grpc", c.images, c.concurrency, "raw") for c in cases]
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        ours = start("network3", args.model, args.intra_op_threads, Path(tmp) / "network3.log")
        try:
            ref = start("aiohttp", args.model, args.intra_op_threads, Path(tmp) / "reference.log")
            try:
                http_address = f"{ours.host}:{ours.http_port}"
                for i, (case, grpc_case) in enumerate(zip(cases, grpc)):  # who goes first rotates
                    runs = [("network3", http_address, case), ("reference", ref.address, case),
                            ("network3", ours.address, grpc_case)]
                    for server, address, c in runs[i % 3:] + runs[:i % 3]:
                        print(f"{server}: {c.label}, concurrency {c.concurrency} ...", file=sys.stderr, flush=True)
                        results.append(run_perf(binary, env, address, c, interval, server, args.quick))
                cpu = cpu_table({"reference": (ref, ref.port), "network3": (ours, ours.http_port)},
                                args.cpu_requests, args.cpu_rounds)
            finally:
                ref.stop()
            print(f"network3: {args.requests} POSTs to /v1/classify ...", file=sys.stderr, flush=True)
            lat = classify_latency(ours.host, ours.http_port, png, args.requests)
        finally:
            ours.stop()

    def find(server, protocol, images, c):
        return next(r for r in results if (r.server, r.case.protocol, r.case.images, r.case.concurrency)
                    == (server, protocol, images, c))

    lines = header(args, "HTTP benchmark", ("onnxruntime", "aiohttp", "grpcio", "tritonclient"))
    lines += table(results)
    lines += ["", f"`/v1/classify`, network3: {lat['n']:,} POSTs of one {len(png):,}-byte MNIST PNG ({png_from}) one "
                  f"after the other on one keep-alive connection (http.client, after 50 unmeasured): p50 "
                  f"{lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms, mean {lat['mean']:.3f} ms ({lat['per_s']:,.0f}/s). "
                  f"Answer: `{lat['answer']}...`", "", "Goals (ratios within this run):"]
    for case in cases:
        o, r = find("network3", "http", case.images, case.concurrency), find("reference", "http", case.images, case.concurrency)
        lines.append(f"- {case.label}, concurrency {case.concurrency}: network3 {o.requests_s:,.0f} requests/s = "
                     f"{o.requests_s / r.requests_s:.2f}x the thin aiohttp server's {r.requests_s:,.0f}/s (goal >= 0.9x; "
                     f"{'met' if o.requests_s >= 0.9 * r.requests_s else 'NOT met'}); p50 {o.p50_ms:.3f} vs "
                     f"{r.p50_ms:.3f} ms")
    lines.append(f"- `/v1/classify` p50 {lat['p50']:.3f} ms (goal < 5 ms on an idle machine: "
                 f"{'met' if lat['p50'] < 5 else 'NOT met'})")
    lines += [""] + cpu
    lines += ["", "HTTP's cost beside gRPC's, network3 (same requests, gRPC's tensors raw bytes):"]
    for case in cases:
        h, g = find("network3", "http", case.images, case.concurrency), find("network3", "grpc", case.images, case.concurrency)
        lines.append(f"- {case.images} image(s), concurrency {case.concurrency}: HTTP ({case.tensors}) "
                     f"{h.requests_s:,.0f} requests/s = {h.requests_s / g.requests_s:.2f}x gRPC's {g.requests_s:,.0f}/s; "
                     f"p50 {h.p50_ms:.3f} vs {g.p50_ms:.3f} ms")
    return "\n".join(lines) + "\n"


def compare_stacks(args, binary, env, interval: int) -> str:
    stacks = [s.strip() for s in args.stacks.split(",")]
    cases = [Case("http", 1, 1, "json"), Case("http", 1, 16, "json"), Case("http", 64, 16, "binary")]
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        try:
            for s in stacks:
                servers[s] = start(s, args.model, args.intra_op_threads, Path(tmp) / f"{s.replace(' ', '-')}.log")
            for rnd in range(args.rounds):
                for case in cases:
                    for s in stacks:  # aiohttp, starlette, ...; the next round again
                        print(f"round {rnd + 1}: {s}: {case.label}, concurrency {case.concurrency} ...",
                              file=sys.stderr, flush=True)
                        r = run_perf(binary, env, servers[s].address, case, interval, s, args.quick)
                        r.note = f"round {rnd + 1}" + (f", {r.note}" if r.note else "")
                        results.append(r)
            cpu = cpu_table({s: (servers[s], servers[s].port) for s in stacks}, args.cpu_requests, args.cpu_rounds)
        finally:
            for server in servers.values():
                server.stop()
    lines = header(args, "HTTP stacks: thin servers, aiohttp vs Starlette under uvicorn",
                   ("onnxruntime", "aiohttp", "starlette", "uvicorn", "httptools"))
    lines += [f"Each stack serves benchmarks/reference_http.py's handlers (`--stack ...`; `starlette httptools` "
              f"is uvicorn with httptools' parser, as uvicorn[standard] installs, otherwise uvicorn's h11), "
              f"{args.rounds} rounds, stacks interleaved case by case.", ""]
    lines += table(results)
    lines += ["", f"Ratios, requests/s against {stacks[0]} (median over rounds; each round's ratio in brackets):"]
    for case in cases:
        base = [r.requests_s for r in results if r.server == stacks[0] and r.case == case]
        for s in stacks[1:]:
            other = [r.requests_s for r in results if r.server == s and r.case == case]
            ratios = [o / b for o, b in zip(other, base)]
            lines.append(f"- {case.label}, concurrency {case.concurrency}: {s} = {statistics.median(ratios):.2f}x "
                         f"{stacks[0]} ({', '.join(f'{x:.2f}' for x in ratios)}); p50 {s} "
                         f"{statistics.median(r.p50_ms for r in results if r.server == s and r.case == case):.3f} ms vs "
                         f"{statistics.median(r.p50_ms for r in results if r.server == stacks[0] and r.case == case):.3f} ms")
    lines += [""] + cpu
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="the ONNX file to serve")
    ap.add_argument("--interval-ms", type=int, help="perf_analyzer's measurement window (default 3000, 500 with --quick)")
    ap.add_argument("--intra-op-threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=2000, help="sequential POSTs to /v1/classify")
    ap.add_argument("--cpu-requests", type=int, default=2000, help="sequential 1-image requests per CPU round")
    ap.add_argument("--cpu-rounds", type=int, default=3)
    ap.add_argument("--image", type=Path, help="the PNG to POST (default: an MNIST test 7)")
    ap.add_argument("--compare-stacks", action="store_true", help="only the thin servers' stacks, interleaved")
    ap.add_argument("--stacks", default="aiohttp,starlette,starlette httptools",
                    help="with --compare-stacks: the first is the baseline of the ratios")
    ap.add_argument("--rounds", type=int, default=2, help="with --compare-stacks")
    ap.add_argument("--quick", action="store_true", help="short windows, no wait for stable ones: a smoke run")
    ap.add_argument("--out", type=Path, help="default bench-results/http.md (http-stacks.md with --compare-stacks)")
    args = ap.parse_args()
    args.model = args.model.resolve()  # the servers run from the repo root
    if not args.model.exists():
        sys.exit(f"{args.model}: no such model; run `make train export` (or pass --model)")
    interval = args.interval_ms or (500 if args.quick else 3000)
    out = args.out or ROOT / "bench-results" / ("http-stacks.md" if args.compare_stacks else "http.md")
    binary, env = perf_analyzer_env()
    text = (compare_stacks if args.compare_stacks else bench)(args, binary, env, interval)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
