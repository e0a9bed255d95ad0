"""`serve --workers N` (issue 18): worker processes sharing the ports under one parent.  Real
processes, real signals, real clients; every wait has a deadline and no assertion is on time.

Which worker answered is read from the access log (`access pid=<pid>`): with SO_REUSEPORT the
kernel picks a worker per new connection, so the tests open many connections.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from fixtures_serving import ROOT, png, thread_server
from protos.inference import grpc_service_pb2 as v2
from protos.network3.v1 import classifier_pb2 as pb
from serving.client import Client

T = 30  # seconds: every call and every wait has a deadline
CLASSIFY = "/network3.v1.DigitClassifier/Classify"
INFO = "/network3.v1.DigitClassifier/GetModelInfo"
WORKERS = re.compile(r"^network3 workers (\d+): pids ([\d ]+)$", re.MULTILINE)


def wait_until(condition, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


def replace_model(onnx_model, path, marker: str) -> str:
    """Rename over `path` the model with one more metadata entry (another sha256): that sha256."""
    import onnx

    m = onnx.load(str(onnx_model))
    m.metadata_props.add(key="reload_marker", value=marker)
    aside = path.with_name(f".{path.name}.new")
    onnx.save(m, str(aside))
    os.replace(aside, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pids_of(server) -> list[int]:
    m = WORKERS.search(server.log())
    return [int(p) for p in m.group(2).split()]


def answered_by(server) -> set[int]:
    """The PIDs in the access log."""
    return {int(p) for p in re.findall(r" access pid=(\d+) ", server.log())}


def alive(pid: int) -> bool:
    """Running (a zombie, dead and not yet reaped, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def classify_once(address: str, pixels: bytes) -> int:
    """One Classify on a new connection (so the kernel picks a worker anew)."""
    with grpc.insecure_channel(address) as ch:
        request = pb.ClassifyRequest(images=[pb.Image(pixels=pixels)]).SerializeToString()
        return pb.ClassifyResponse.FromString(ch.unary_unary(CLASSIFY)(request, timeout=T)).predictions[0].digit


def http_classify_once(server, pixels) -> int:
    """One /v1/classify on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=T)
    try:
        conn.request("POST", "/v1/classify", png(pixels), {"Content-Type": "image/png"})
        response = conn.getresponse()
        body = json.loads(response.read())
        assert response.status == 200, body
        return body["predictions"][0]["digit"]
    finally:
        conn.close()


def classify_requests(port: int) -> float:
    """network3_requests_total of gRPC's Classify on /metrics, every code."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=T).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "network3_requests_total" and s.labels["api"] == "network3.v1.DigitClassifier"
               and s.labels["method"] == "Classify")


@pytest.fixture(scope="module")
def expected(mnist, predict):
    """The first 16 MNIST test digits (uint8 [16, 28, 28]) and the model's own answers."""
    pixels = mnist.test_x[:16]
    return pixels, [int(d) for d in predict(pixels)]


def test_every_worker_answers_and_metrics_count_them_all(process_server, expected):
    pixels, digits = expected
    s = process_server("--workers", "2", "--metrics-port", "0")
    pids = pids_of(s)
    assert len(pids) == 2 and all(alive(p) for p in pids)
    assert s.log().count("network3 serving on") == 1 and s.log().count("network3 http on") == 1
    with grpc.insecure_channel(s.address) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=T)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    # Many new connections, over gRPC and HTTP, until the access log shows both workers.
    calls = 0
    deadline = time.monotonic() + 60
    while answered_by(s) != set(pids):
        assert time.monotonic() < deadline, f"access log shows {answered_by(s)}, workers {pids}"
        i = calls % len(digits)
        assert classify_once(s.address, pixels[i].tobytes()) == digits[i]
        calls += 1
        if calls % 4 == 0:
            assert http_classify_once(s, pixels[i]) == digits[i]
        time.sleep(0.01)  # lets the access log (written every 0.25 s) catch up
    # The whole server's total on /metrics: every Classify of both workers.
    wait_until(lambda: classify_requests(s.metrics_port) == calls, f"{calls} Classify requests on /metrics")
    # ModelStatistics says it counts one worker.
    with grpc.insecure_channel(s.address) as ch:
        _, call = ch.unary_unary("/inference.GRPCInferenceService/ModelStatistics").with_call(
            v2.ModelStatisticsRequest().SerializeToString(), timeout=T)
        scope = dict(call.trailing_metadata())["network3-statistics-scope"]
    assert re.fullmatch(r"worker pid=(\d+) of 2", scope) and int(scope.split("=")[1].split()[0]) in pids
    with urllib.request.urlopen(f"{s.http_url}/v2/models/stats", timeout=T) as r:
        scope = r.headers["network3-statistics-scope"]
    assert re.fullmatch(r"worker pid=(\d+) of 2", scope) and int(scope.split("=")[1].split()[0]) in pids
    assert s.stop() == 0


def test_one_process_statistics_count_the_server(onnx_model):
    with thread_server(onnx_model) as s, grpc.insecure_channel(s.address) as ch:
        _, call = ch.unary_unary("/inference.GRPCInferenceService/ModelStatistics").with_call(
            v2.ModelStatisticsRequest().SerializeToString(), timeout=T)
        assert dict(call.trailing_metadata())["network3-statistics-scope"] == "server"
        with urllib.request.urlopen(f"{s.http_url}/v2/models/stats", timeout=T) as r:
            assert r.headers["network3-statistics-scope"] == "server"


def test_sigkill_of_a_worker_under_load(process_server, expected):
    """A worker SIGKILLed while clients call: it is replaced, the clients' retries absorb it, and
    the total on /metrics never goes down."""
    pixels, digits = expected
    s = process_server("--workers", "2", "--metrics-port", "0")
    pids = pids_of(s)
    stop = threading.Event()
    answers: list[tuple[int, int]] = []  # (expected, got)
    errors: list[Exception] = []

    def load(k: int) -> None:
        try:
            with Client(s.address, timeout=T) as c:
                i = k
                while not stop.is_set():
                    got = c.classify([pixels[i % 16]])[0].digit
                    answers.append((digits[i % 16], got))
                    i += 1
        except Exception as e:  # a failure the retries did not absorb
            errors.append(e)

    threads = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    try:
        # The clients' channels share one connection (grpc's subchannel pool): kill its worker.
        victim = int(s.wait_for_log(r" access pid=(\d+) \S+ method=network3.v1.DigitClassifier.Classify ").group(1))
        assert victim in pids
        before = wait_until(lambda: classify_requests(s.metrics_port), "requests on /metrics")
        os.kill(victim, signal.SIGKILL)
        m = s.wait_for_log(rf"worker pid (\d+) serves, replacing pid {victim}", timeout=60)
        new = int(m.group(1))
        assert new not in pids and alive(new) and not alive(victim)
        # The clients go on after the replacement; the total never goes down.
        seen = [before]
        done = len(answers)
        deadline = time.monotonic() + 60
        while len(answers) < done + 100:
            assert time.monotonic() < deadline and not errors, errors
            seen.append(classify_requests(s.metrics_port))
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(T)
    assert not errors, errors
    assert all(want == got for want, got in answers)
    assert seen == sorted(seen), seen
    assert "killed by SIGKILL; replacing it" in s.log()
    after = wait_until(lambda: (n := classify_requests(s.metrics_port)) >= seen[-1] and n, "the total")
    # At most every answered call, plus one per client: a call the killed worker counted but
    # whose answer it never sent is retried (and a SIGKILLed worker's last second is lost).
    assert after <= len(answers) + len(threads)
    assert s.stop() == 0


def test_sighup_reloads_every_worker_and_a_bad_file_none(process_server, onnx_model, tmp_path, expected):
    pixels, digits = expected
    path = tmp_path / "served.onnx"
    shutil.copy(onnx_model, path)
    s = process_server("--workers", "2", model=path)
    pids = pids_of(s)
    first = hashlib.sha256(path.read_bytes()).hexdigest()
    second = replace_model(onnx_model, path, "second")
    s.signal(signal.SIGHUP)
    s.wait_for_log(rf"reloaded \S+ in all 2 workers: sha256 {first[:12]} -> {second[:12]}")
    for pid in pids:  # each worker says it switched
        s.wait_for_log(rf"network3.server\[{pid}\]: reloaded \S+: sha256 {first[:12]} -> {second[:12]}")

    def model_on_new_connections(n: int = 20) -> set[str]:
        got = set()
        for _ in range(n):
            with grpc.insecure_channel(s.address) as ch:
                info = pb.ModelInfo.FromString(ch.unary_unary(INFO)(pb.GetModelInfoRequest().SerializeToString(), timeout=T))
                got.add(info.sha256)
        return got

    assert model_on_new_connections() == {second}
    # A truncated file: no worker switches.
    path.write_bytes(path.read_bytes()[:5000])
    s.signal(signal.SIGHUP)
    s.wait_for_log(rf"model reload failed, all 2 workers still serving sha256 {second[:12]}: worker pid \d+: ")
    assert model_on_new_connections() == {second}
    assert classify_once(s.address, pixels[3].tobytes()) == digits[3]
    assert len(re.findall(r" ERROR ", s.log())) == 1, s.log()[-3000:]
    assert s.stop() == 0


def test_sigterm_drains_every_worker_and_sigkill_of_the_parent_leaves_none(process_server, expected):
    pixels, digits = expected
    s = process_server("--workers", "2")
    pids = pids_of(s)
    assert classify_once(s.address, pixels[0].tobytes()) == digits[0]
    s.signal(signal.SIGTERM)
    assert s.wait(T + 20) == 0
    assert all(not alive(p) for p in pids)
    assert len(re.findall(r"network3.server\[\d+\]: stopped", s.log())) == 2
    # SIGKILL of the parent: nothing to drain them, they must still go.
    k = process_server("--workers", "2")
    pids = pids_of(k)
    k.kill()
    wait_until(lambda: not any(alive(p) for p in pids), f"workers {pids} gone after their parent's SIGKILL", timeout=T)


def serve_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "serving.server", *args]


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def run(argv: list[str], model) -> subprocess.CompletedProcess:
    return subprocess.run([*argv, "--model", str(model)], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_a_taken_port_fails_at_once_and_no_one_joins_the_workers(process_server, onnx_model, tmp_path):
    # A port another program holds: --workers 2 fails with one line (gRPC, then HTTP).
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        line = one_error_line(run(serve_argv("--workers", "2", "--port", str(port), "--http-port", "0"), onnx_model))
        assert line == f"Error: cannot listen on 127.0.0.1:{port}: Address already in use"
        line = one_error_line(run(serve_argv("--workers", "2", "--port", "0", "--http-port", str(port)), onnx_model))
        assert line == f"Error: cannot listen on http 127.0.0.1:{port}: Address already in use"
        line = one_error_line(run(serve_argv("--workers", "2", "--port", "0", "--no-http", "--metrics-port", str(port)), onnx_model))
        assert line == f"Error: cannot listen on metrics 127.0.0.1:{port}: Address already in use"
    # A running --workers server's ports: neither another --workers server nor a plain one joins them.
    s = process_server("--workers", "2")
    for args in (("--workers", "2", "--port", str(s.port), "--http-port", "0"),
                 ("--workers", "2", "--port", "0", "--http-port", str(s.http_port))):
        one_error_line(run(serve_argv(*args), onnx_model))
    for args in (("--port", str(s.port), "--http-port", "0"), ("--port", "0", "--http-port", str(s.http_port))):
        r = run(serve_argv(*args), onnx_model)
        assert r.returncode == 1 and r.stderr.splitlines()[-1].startswith("Error: cannot listen on"), r.stderr
    # A bad model: one line too (from the worker that could not load it).
    line = one_error_line(run(serve_argv("--workers", "2", "--port", "0", "--no-http"), tmp_path / "missing.onnx"))
    assert "missing.onnx" in line
    assert s.stop() == 0


class FakeConn:
    """A worker's end of the pipe as the parent sees it: answers "prepare" as told."""

    def __init__(self, worker, answer) -> None:
        self.worker, self.answer, self.sent = worker, answer, []

    def send(self, message) -> None:
        self.sent.append(message)
        if message == ("prepare",):
            self.worker.reply.set_result(self.answer)


@pytest.mark.parametrize("answers, switch", [
    ([("prepared", "a" * 64), ("prepared", "a" * 64)], True),
    ([("prepared", "a" * 64), ("prepare-failed", "bad.onnx is not a loadable ONNX model")], False),
    ([("prepared", "a" * 64), ("prepared", "b" * 64)], False),  # the file changed between the two loads
])
def test_reload_switches_all_workers_or_none(answers, switch, caplog):
    """The parent's two phases: every worker loads the file, and all switch to it (commit True)
    only if every one loaded the same file; else all keep the old model (commit False)."""
    import asyncio
    from types import SimpleNamespace

    from serving.workers import Supervisor, Worker

    async def reload():
        sup = Supervisor(SimpleNamespace(workers=len(answers), model="m.onnx"), None)
        sup.sha256 = "0" * 64
        loop = asyncio.get_running_loop()
        for slot, answer in enumerate(answers):
            w = Worker(slot, SimpleNamespace(exitcode=None), None, 0.0, 100 + slot, ready=loop.create_future())
            w.ready.set_result(None)
            w.conn = FakeConn(w, answer)
            sup.workers[slot] = w
        return sup, await sup.reload()

    sup, ok = asyncio.run(reload())
    assert ok is switch
    for w in sup.workers.values():
        assert w.conn.sent == [("prepare",), ("commit", switch)]
    assert sup.sha256 == ("a" * 64 if switch else "0" * 64)
    assert any("still serving sha256 000000000000" in r.getMessage() for r in caplog.records) is not switch


def test_watch_interval_reloads_every_worker(process_server, onnx_model, tmp_path):
    """--watch-interval with workers: the parent watches, and reloads them all as on SIGHUP."""
    path = tmp_path / "served.onnx"
    shutil.copy(onnx_model, path)
    s = process_server("--workers", "2", "--watch-interval", "0.2", model=path)
    first = hashlib.sha256(path.read_bytes()).hexdigest()
    second = replace_model(onnx_model, path, "watched")
    s.wait_for_log(rf"reloaded \S+ in all 2 workers: sha256 {first[:12]} -> {second[:12]}")
    for pid in pids_of(s):
        s.wait_for_log(rf"network3.server\[{pid}\]: reloaded \S+: sha256 {first[:12]} -> {second[:12]}")
    assert s.stop() == 0


def test_a_replacement_serves_what_the_others_serve(process_server, onnx_model, tmp_path, expected):
    """The file changed on disk and nobody reloaded: a replacement worker that loaded the new file
    does not serve beside workers on the old one; after SIGHUP all serve the new file."""
    pixels, digits = expected
    path = tmp_path / "served.onnx"
    shutil.copy(onnx_model, path)
    s = process_server("--workers", "2", model=path)
    pids = pids_of(s)
    first = hashlib.sha256(path.read_bytes()).hexdigest()
    second = replace_model(onnx_model, path, "unannounced")
    os.kill(pids[0], signal.SIGKILL)
    s.wait_for_log(rf"served.onnx is sha256 {second[:12]} where the other workers serve {first[:12]}: the file changed")
    assert "serves, replacing pid" not in s.log()
    s.signal(signal.SIGHUP)
    s.wait_for_log(rf"reloaded \S+ in all 1 workers: sha256 {first[:12]} -> {second[:12]}")
    new = int(s.wait_for_log(r"worker pid (\d+) serves, replacing pid \d+ ", timeout=60).group(1))
    assert new not in pids and alive(new)
    assert len(re.findall(r"network3.server\[\d+\]: serving ", s.log())) == 3  # the first two, and the one after SIGHUP
    assert classify_once(s.address, pixels[5].tobytes()) == digits[5]
    assert s.stop() == 0


@pytest.mark.parametrize("cpu_max, quota", [("max 100000", None), ("150000 100000", 2), ("50000 100000", 1), (None, None)])
def test_workers_auto_is_the_cpus_we_may_use(tmp_path, cpu_max, quota):
    from serving.workers import cpu_count

    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max + "\n")
    cpus = len(os.sched_getaffinity(0))
    assert cpu_count(path) == (cpus if quota is None else min(cpus, quota))


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this host")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_ipv6_host_serves_grpc_http_and_metrics(process_server, expected, workers):
    """`--host ::1`: gRPC is given [::1]:port (without brackets it read the address as a port
    of ':'), the start-up line and the HTTP URL bracket the literal, and all three listen."""
    pixels, digits = expected
    server = process_server("--host", "::1", "--workers", workers, "--metrics-port", "0")
    assert server.address == f"[::1]:{server.port}"
    assert server.http_url == f"http://[::1]:{server.http_port}"
    assert classify_once(server.address, pixels[0].tobytes()) == digits[0]
    with urllib.request.urlopen(f"{server.http_url}/v2/health/ready", timeout=T) as r:
        assert r.status == 200
    text = urllib.request.urlopen(f"http://[::1]:{server.metrics_port}/metrics", timeout=T).read().decode()
    assert "network3_requests_total" in text
