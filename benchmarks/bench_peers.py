"""Peer benchmark: network3 beside KServe's and MLServer's Python model servers and the thin
reference server, side by side under one Python load generator.

Every server serves the same ONNX file with onnxruntime and answers the same request bytes:
KServe v2 `ModelInfer` over gRPC, model `network3`, input `images` FP32 [N,1,28,28]
(serving.contract).  The load generator is bench_scale.run_python (grpc.aio processes, one
connection per request in flight, a closed loop), on the same host.  Lines: 1-image requests at
concurrency 1 and 16, 64-image requests at concurrency 4.

  * network3: `python -m serving.server --model M --port 0 --http-port 0 --metrics-port 0`
    (batcher, metrics, access log, HTTP on; one onnxruntime thread, its default), through
    serving.launch.ServerProcess, as bench_serve starts it;
  * kserve: KServe's `kserve.ModelServer` with benchmarks/peers/kserve_onnx.py (a `kserve.Model`
    on an onnxruntime session with onnxruntime's default options), in .venv-peers/kserve;
  * mlserver: `mlserver start` with benchmarks/peers/mlserver_onnx.py (an `MLModel`, same
    session), settings written at run time into a temporary folder, in .venv-peers/mlserver;
  * reference: benchmarks/reference_server.py (grpc.aio, onnxruntime inline, one thread).

Each server runs alone: started on free loopback ports, waited for (v2 ServerReady and
ModelReady, with a deadline), checked (the top class of 64 MNIST test digits matches
onnxruntime in-process), timed, stopped.  A peer that is not installed or does not start gets
a line saying why; the others still run.  `make bench-peers` creates the peers' environments.

    python benchmarks/bench_peers.py --model models/default.onnx [--seconds S] [--peers kserve,mlserver]

Only numbers from a machine doing nothing else mean anything; the load generator shares the cores.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_scale import cpu_line, run_python  # noqa: E402
from bench_serve import Result, start_server, write_report  # noqa: E402
from serving.contract import INPUT_NAME, INPUT_SHAPE, MODEL_NAME, OUTPUT_NAMES, SCALE  # noqa: E402
from serving.launch import ServerProcess  # noqa: E402

PEERS = ("network3", "kserve", "mlserver", "reference")
RIVALS = ("kserve", "mlserver")  # the goal: network3 ahead of both on every line
LINES = ((1, 1), (1, 16), (64, 4))  # (images per request, requests in flight)
PEER_CODE = ROOT / "benchmarks" / "peers"
# What each peer's environment must hold (the Makefile installs these versions).
PACKAGES = {"kserve": ("kserve", "onnxruntime", "grpcio", "uvloop"), "mlserver": ("mlserver", "onnxruntime", "grpcio", "uvloop")}


# ------------------------------------------------------------------------ servers --

class NotInstalled(RuntimeError):
    """A peer's environment is missing or incomplete."""


@dataclass
class Running:
    """A server that answers on `address`, and how to stop it."""
    name: str
    address: str
    stop: Callable[[], object]
    ready_s: float  # from start to ready
    notes: list[str] = field(default_factory=list)


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on this host just now (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_ready(address: str, proc: subprocess.Popen | None, log: Path, deadline: float) -> None:
    """v2 ServerReady and ModelReady(network3) true on `address`, before `deadline` (monotonic);
    RuntimeError with the log's tail when the process exits first or the deadline passes."""
    import grpc
    from protos.inference import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"exited with {proc.returncode} before it was ready: {tail(log)}")
            try:
                if (stub.ServerReady(pb.ServerReadyRequest(), timeout=2).ready
                        and stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME), timeout=2).ready):
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready within the deadline: {tail(log)}")
            time.sleep(0.2)


def tail(log: Path, lines: int = 12) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return "\n    " + "\n    ".join(text[-lines:]) if text else "(empty log)"


def launch(name: str, argv: list[str], env: dict, cwd: Path, log: Path, address: str, timeout: float) -> Running:
    """`argv` in a session of its own (a server may start worker processes: the whole group is
    stopped), waited for with `wait_ready`."""
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def stop(grace: float = 30) -> int:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the leader's children too, e.g. MLServer's inference worker
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait(10)
        return proc.returncode

    try:
        wait_ready(address, proc, log, t0 + timeout)
    except BaseException:
        stop(grace=5)
        raise
    return Running(name, address, stop, time.monotonic() - t0)


def peer_python(venvs: Path, name: str) -> tuple[Path, dict[str, str]]:
    """The peer's interpreter and the versions of its packages; RuntimeError saying why not."""
    python = venvs / name / "bin" / "python"  # not resolved: the venv's own interpreter
    if not python.exists():
        raise NotInstalled(f"not installed: no {python} (`make bench-peers` creates it; if it did, its pip install "
                           f"failed: see make's output)")
    code = ("import importlib.metadata as m, json, sys; "
            f"print(json.dumps({{p: m.version(p) for p in {list(PACKAGES[name])!r}}}))")
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    if r.returncode:
        raise NotInstalled(f"not installed: {venvs / name} lacks a package: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return python, json.loads(r.stdout)


def start(name: str, model: Path, venvs: Path, tmp: Path, timeout: float) -> Running:
    log = tmp / f"{name}.log"
    t0 = time.monotonic()
    if name in ("network3", "reference"):
        # bench_serve's own start-up: network3 with --metrics-port 0 (and ServerProcess's --port 0
        # --http-port 0); the reference with its one thread.  Both print a line once they serve.
        server: ServerProcess = start_server(name, model, 1, log)
        try:
            wait_ready(server.address, server.proc, log, time.monotonic() + timeout)
        except BaseException:
            server.stop()
            raise
        return Running(name, server.address, server.stop, time.monotonic() - t0,
                       ["python " + " ".join(a if "/" not in a else Path(a).name for a in server.argv[1:])])
    python, versions = peer_python(venvs, name)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if name == "kserve":
        grpc_port, http_port = free_ports(2)
        argv = [str(python), str(PEER_CODE / "kserve_onnx.py"), "--model_path", str(model),
                "--grpc_port", str(grpc_port), "--http_port", str(http_port)]
        running = launch(name, argv, env, tmp, log, f"127.0.0.1:{grpc_port}", timeout)
    elif name == "mlserver":
        grpc_port, http_port, metrics_port = free_ports(3)
        folder = tmp / "mlserver"
        folder.mkdir()
        # What a user writes: the server's settings (loopback, free ports, everything else MLServer's
        # defaults) and the model's (name, the runtime class, the file), beside each other.
        (folder / "settings.json").write_text(json.dumps(
            {"host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port}, indent=2))
        (folder / "model-settings.json").write_text(json.dumps(
            {"name": MODEL_NAME, "implementation": "mlserver_onnx.OnnxDigits",
             "parameters": {"uri": str(model), "version": "1"}}, indent=2))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PEER_CODE), env.get("PYTHONPATH")) if p)
        # The `mlserver` command through the venv's python (a console script's first line names
        # the python it was installed with, which a venv moved or copied no longer has).
        argv = [str(python), "-m", "mlserver.cli.main", "start", str(folder)]
        running = launch(name, argv, env, folder, log, f"127.0.0.1:{grpc_port}", timeout)
    else:
        raise ValueError(f"unknown server {name!r}")
    running.notes.append(", ".join(f"{p} {v}" for p, v in versions.items()))
    return running


# ------------------------------------------------------------------- correctness --

def digits(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` MNIST test digits as the model takes them, and their labels."""
    npz = ROOT / "data" / "mnist.npz"
    if not npz.exists():
        sys.exit(f"{npz}: no MNIST; run `make data`")
    with np.load(npz) as d:
        x = d["test_x"][:count].astype(np.float32) * np.float32(SCALE)
        return x.reshape(count, *INPUT_SHAPE), d["test_y"][:count]


def infer(address: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """One v2 ModelInfer of `x` as the load generator sends it; the outputs by name, decoded from
    raw_output_contents or from the typed contents, whichever the server used."""
    import grpc
    from protos.inference import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[pb.ModelInferRequest.InferInputTensor(
        name=INPUT_NAME, datatype="FP32", shape=list(x.shape))], raw_input_contents=[x.tobytes()])
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    out = {}
    for i, tensor in enumerate(response.outputs):
        if response.raw_output_contents:
            value = np.frombuffer(response.raw_output_contents[i], np.float32)
        else:
            value = np.asarray(tensor.contents.fp32_contents, np.float32)
        out[tensor.name] = value.reshape(list(tensor.shape))
    return out


def check(address: str, x: np.ndarray, expected: dict[str, np.ndarray]) -> str:
    """The server's answers to `x` in one request and to its first digit alone: the same top class
    as onnxruntime in-process for every digit, and close values.  Returns a summary; raises
    RuntimeError on a wrong answer."""
    worst = 0.0
    for batch in (x[:1], x):
        got = infer(address, batch)
        missing = [n for n in OUTPUT_NAMES if n not in got]
        if missing:
            raise RuntimeError(f"answer without {missing} (outputs: {sorted(got)})")
        want = {n: v[:len(batch)] for n, v in expected.items()}
        for name in OUTPUT_NAMES:
            if got[name].shape != want[name].shape:
                raise RuntimeError(f"{name}: shape {got[name].shape}, expected {want[name].shape}")
            wrong = np.flatnonzero(got[name].argmax(1) != want[name].argmax(1))
            if len(wrong):
                raise RuntimeError(f"{name}: top class differs from onnxruntime in-process for digit(s) {wrong.tolist()}")
        worst = max(worst, float(np.abs(got["probabilities"] - want["probabilities"]).max()))
    if worst > 1e-4:
        raise RuntimeError(f"probabilities differ from onnxruntime in-process by up to {worst:.2g}")
    return f"{len(x)} MNIST digits right, max |dp| {worst:.1g}"


def ort_default_threads(model: Path) -> tuple[int, str]:
    """How many threads onnxruntime's default options compute with here (the calling thread and
    its intra-op pool, counted in /proc), and onnxruntime's version."""
    import onnxruntime as ort

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    before = threads()
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    pool = threads() - before
    del session
    return pool + 1, ort.__version__


# ------------------------------------------------------------------------- report --

def report(results: list[Result], skipped: dict[str, str], servers: dict[str, Running], args, ort_threads: int,
           ort_version: str, load_before: tuple[float, float, float], cores: int, wall_s: float) -> str:
    lines = [f"# Peer benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"- CPU: {cpu_line()}; {cores} cores this process may use ({os.cpu_count()} online); load average "
             f"before the run {' '.join(f'{v:.2f}' for v in load_before)}",
             f"- load generator: bench_scale.run_python (grpc.aio, up to {cores} processes, one connection per request "
             f"in flight, closed loop), on the same host; v2 `ModelInfer`, all-zero FP32 `{INPUT_NAME}` "
             f"[N,{','.join(map(str, INPUT_SHAPE))}], model `{MODEL_NAME}`; {args.seconds:g} s measured per line after "
             f"{min(1.0, args.seconds / 4):g} s of warm-up; the servers one at a time; {wall_s:.0f} s in all",
             f"- model: {args.model.name}; onnxruntime's default options compute with {ort_threads} thread"
             f"{'s' if ort_threads != 1 else ''} here (counted, onnxruntime {ort_version}): KServe's and MLServer's "
             f"sessions use them; the reference uses 1; network3 1 for batches under 8 images (--intra-op-threads) "
             f"and its --wide-threads auto (the cores it may use) for larger ones"]
    described = {  # {} is the server's first note: its command line or its packages' versions
        "network3": "network3: `{}` (batcher, metrics, access log, HTTP on)",
        "kserve": "KServe ({}): `kserve.ModelServer(grpc_port=, http_port=)` with benchmarks/peers/kserve_onnx.py, "
                  "every other setting KServe's default",
        "mlserver": "MLServer ({}): `mlserver start` with benchmarks/peers/mlserver_onnx.py, settings.json naming only "
                    "host and ports, the rest MLServer's defaults",
        "reference": "reference: `{}` (benchmarks/reference_server.py: grpc.aio, onnxruntime inline, nothing else)",
    }
    for name in args.peers:
        if name in servers:
            s = servers[name]
            lines.append(f"- {described[name].format(s.notes[0])}; {'; '.join(s.notes[1:])}; "
                         f"ready {s.ready_s:.1f} s after start")
        else:
            lines.append(f"- **{name}: not run**: {skipped.get(name, 'not run')}")
    how = {  # read in their sources (kserve 0.21.0, mlserver 1.7.1), with their defaults as started here
        "kserve": "KServe: one process, its ports on every interface (gRPC `[::]`, HTTP `0.0.0.0`: it has no "
                  "host setting); grpc.aio and uvicorn (REST) on one asyncio event loop; the handler turns the "
                  "protobuf into an InferRequest, and a `predict` that is not a coroutine (ours, as KServe's examples "
                  "write it) runs inline on that loop, so one request computes at a time, without batching; per call "
                  "a log line from its gRPC interceptor, a latency log line and Prometheus histograms",
        "mlserver": "MLServer: `parallel_workers` 1 (its default): the model lives in a separate worker process; the "
                    "main process (grpc.aio, uvicorn, metrics server) turns each request into a pydantic "
                    "InferenceRequest and sends it over a multiprocessing queue to the worker and the answer back; "
                    "adaptive batching off (its default); a Prometheus interceptor, no access log (debug off)",
    }
    notes = [text for name, text in how.items() if name in servers]
    if notes:
        lines += ["", "How the peers handle a request:", ""] + [f"- {text}." for text in notes]
    lines += ["", "| line | server | requests/s | images/s | p50 ms | p99 ms | images/s / network3 | |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    ours = {(r.images, r.concurrency): r for r in results if r.server == "network3"}
    for images, concurrency in LINES:
        for r in (r for name in args.peers for r in results
                  if r.server == name and (r.images, r.concurrency) == (images, concurrency)):
            base = ours.get((images, concurrency))
            ratio = f"{r.images_s / base.images_s:.2f}" if base and base.requests_s else ""
            lines.append(f"| {images}-image c={concurrency} | {r.server} | {r.requests_s:,.0f} | {r.images_s:,.0f} | "
                         f"{r.p50_ms:.2f} | {r.p99_ms:.2f} | {ratio} | {r.note} |")
    # The goal: ahead of both peers on every line.
    verdicts = []
    for images, concurrency in LINES:
        base = ours.get((images, concurrency))
        for name in RIVALS:
            peer = next((r for r in results if r.server == name and (r.images, r.concurrency) == (images, concurrency)), None)
            if base and peer:
                verdicts.append((base.images_s > peer.images_s, f"{images}-image c={concurrency} vs {name}: "
                                                                 f"{base.images_s / peer.images_s:.2f}x"))
    if verdicts:
        behind = [text for ahead, text in verdicts if not ahead]
        complete = len(verdicts) == len(LINES) * len(RIVALS)
        lines += ["", "Goal: network3 ahead of both KServe and MLServer on every line: "
                  + ("met" if not behind and complete else "NOT met" if behind else "not decided (a peer or line is missing)")
                  + (f" (behind: {'; '.join(behind)})" if behind else "")
                  + "; network3's throughput over each peer's: " + ", ".join(text for _, text in verdicts) + "."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main --

def main() -> None:
    cores = len(os.sched_getaffinity(0))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="the ONNX file every server serves")
    ap.add_argument("--seconds", type=float, default=15.0, help="measured seconds per line (the whole run: about 16 x this)")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated, in this order")
    ap.add_argument("--peers-venv", type=Path, default=ROOT / ".venv-peers",
                    help="the folder of the peers' environments (kserve/, mlserver/)")
    ap.add_argument("--start-timeout", type=float, default=180.0, help="seconds a server may take to become ready")
    ap.add_argument("--quick", action="store_true", help="2 s per line: a smoke run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "peers.md")
    args = ap.parse_args()
    args.model = args.model.resolve()  # the servers run from other folders
    if not args.model.exists():
        sys.exit(f"{args.model}: no such model; run `make train export` (or pass --model)")
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if unknown := [p for p in args.peers if p not in PEERS]:
        sys.exit(f"unknown server(s) {unknown}: choose from {', '.join(PEERS)}")
    args.peers_venv = args.peers_venv.absolute()
    if args.quick:
        args.seconds = 2.0

    load_before = os.getloadavg()
    t_start = time.monotonic()
    ort_threads, ort_version = ort_default_threads(args.model)
    x, _ = digits(64)
    import onnxruntime as ort  # the answers every server must give, in-process
    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    expected = dict(zip((o.name for o in session.get_outputs()), session.run(None, {INPUT_NAME: x})))
    del session

    results: list[Result] = []
    skipped: dict[str, str] = {}
    servers: dict[str, Running] = {}
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        for name in args.peers:
            print(f"{name}: starting ...", file=sys.stderr, flush=True)
            try:
                server = start(name, args.model, args.peers_venv, Path(tmp), args.start_timeout)
            except Exception as e:  # noqa: BLE001 - a peer that cannot start gets a line; the others run
                skipped[name] = str(e) if isinstance(e, NotInstalled) else f"did not start: {e}"
                print(f"{name}: {skipped[name]}", file=sys.stderr, flush=True)
                continue
            try:
                try:
                    server.notes.append(check(server.address, x, expected))
                except Exception as e:  # noqa: BLE001
                    skipped[name] = f"answered wrongly, not timed: {e}"
                    print(f"{name}: {skipped[name]}", file=sys.stderr, flush=True)
                    continue
                servers[name] = server
                for images, concurrency in LINES:
                    print(f"{name}: {images} image(s)/request, concurrency {concurrency} ...", file=sys.stderr, flush=True)
                    try:
                        results.append(run_python(server.address, images, concurrency, args.seconds, name, cores))
                    except Exception as e:  # noqa: BLE001 - a failed line is marked, the rest go on
                        results.append(Result(name, images, concurrency, 0.0, float("nan"), float("nan"), {},
                                              f"failed: {str(e).splitlines()[0][:200]}"))
            finally:
                server.stop()

    write_report(report(results, skipped, servers, args, ort_threads, ort_version, load_before, cores,
                        time.monotonic() - t_start), args.out)


if __name__ == "__main__":
    main()
