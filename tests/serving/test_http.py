"""HTTP/1.1 beside gRPC (issue 16): the KServe v2 REST API against the real server on loopback,
through the real tritonclient.http and plain HTTP; the middlewares (token, request id, access
log, body limits, errors, drain); the options (--http-port, --no-http) and perf_analyzer -i http.

tritonclient.http imports no generated protos, so unlike tritonclient.grpc (test_triton.py) it
runs in this process, beside a ThreadServer.
"""
from __future__ import annotations

import csv
import gzip
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fixtures_serving import ROOT, thread_server
from serving.launch import perf_analyzer
from serving.model import ModelOptions, load_model
from serving.preprocess import pixels_to_input

th = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

T = 30
TOKEN = "s3cret-Token_0123456789"


@pytest.fixture(scope="module")
def reference(onnx_model):
    return load_model(onnx_model, ModelOptions(intra_op_threads=1, warmup_batch_sizes=(1,)))


@pytest.fixture(scope="module")
def digits(mnist, reference):
    """16 MNIST test digits, and the served model's own probabilities for them."""
    pixels = mnist.test_x[:16]
    return pixels, reference.predict(pixels_to_input(pixels))[1]


@pytest.fixture(scope="module")
def client(server):
    assert server.http_port, "the shared test server serves HTTP on a free port"
    c = th.InferenceServerClient(f"127.0.0.1:{server.http_port}", network_timeout=T, connection_timeout=T)
    yield c
    c.close()


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            context: ssl.SSLContext | None = None) -> tuple[int, dict, bytes]:
    """One plain HTTP request: (status, headers, body)."""
    conn = (http.client.HTTPSConnection("127.0.0.1", port, timeout=T, context=context) if context
            else http.client.HTTPConnection("127.0.0.1", port, timeout=T))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def infer_body(x: np.ndarray, datatype: str = "FP32", **extra) -> bytes:
    return json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": datatype,
                                   "data": x.tolist()}], **extra}).encode()


def images(pixels: np.ndarray) -> np.ndarray:
    return pixels_to_input(pixels)  # float32 [N, 1, 28, 28] in [0, 1]


def infer_input(x: np.ndarray, datatype: str = "FP32", binary: bool = True):
    i = th.InferInput("images", list(x.shape), datatype)
    i.set_data_from_numpy(x, binary_data=binary)
    return i


# ------------------------------------------------------------------- tritonclient.http --

def test_health_and_metadata(client, server):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("network3")
    assert client.is_model_ready("network3", "1") and not client.is_model_ready("lenet")
    meta = client.get_server_metadata()
    assert meta["name"] == "network3" and "classification" in meta["extensions"]
    model = client.get_model_metadata("network3")
    assert model["name"] == "network3" and model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert [o["name"] for o in model["outputs"]] == ["logits", "probabilities"]
    assert model["parameters"]["sha256"] == server.server.serving.model.sha256
    assert client.get_model_metadata("network3", "1") == model


def test_model_config_is_the_grpc_config_as_json(client, server):
    """The ModelConfig the gRPC RPC builds (api.inference.model_config), as Triton writes it."""
    from serving.api.http import proto_json
    from serving.api.inference import model_config

    config = client.get_model_config("network3")
    assert config["max_batch_size"] == server.options.batcher.max_batch_size  # numbers, as Triton's
    assert config["input"][0]["dims"] == [1, 28, 28] and config["input"][0]["data_type"] == "TYPE_FP32"
    assert [o["dims"] for o in config["output"]] == [[10], [10]]
    assert "dynamic_batching" in config
    assert config == proto_json(model_config(server.server.serving, "network3"))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
def test_infer(client, digits, datatype, binary):
    pixels, probs = digits
    x = images(pixels) if datatype == "FP32" else pixels.reshape(-1, 1, 28, 28)
    outputs = [th.InferRequestedOutput(name, binary_data=binary) for name in ("logits", "probabilities")]
    r = client.infer("network3", [infer_input(x, datatype, binary)], outputs=outputs, request_id="r1")
    assert r.get_response()["id"] == "r1" and r.get_response()["model_version"] == "1"
    np.testing.assert_allclose(r.as_numpy("probabilities"), probs, atol=1e-5)
    assert r.as_numpy("logits").shape == (16, 10)
    assert all(("parameters" in o) == binary for o in r.get_response()["outputs"])


def test_infer_with_no_outputs_named_answers_all_in_binary(client, digits):
    pixels, probs = digits
    r = client.infer("network3", [infer_input(images(pixels[:4]))])  # binary_data_output: true
    assert [o["name"] for o in r.get_response()["outputs"]] == ["logits", "probabilities"]
    np.testing.assert_allclose(r.as_numpy("probabilities"), probs[:4], atol=1e-5)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_extension(client, digits, binary):
    pixels, probs = digits
    out = th.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
    rows = client.infer("network3", [infer_input(images(pixels[:4]))], outputs=[out]).as_numpy("probabilities")
    assert rows.shape == (4, 3)
    for row, p in zip(rows, probs[:4]):
        parts = [(b if isinstance(b, str) else b.decode()).split(":") for b in row]
        assert [int(i) for _, i, _ in parts] == list(np.argsort(-p)[:3])
        assert all(label == i for _, i, label in parts)
        assert abs(float(parts[0][0]) - p.max()) < 1e-5


def test_gzip_and_deflate_bodies_and_compressed_answers(client, digits):
    pixels, probs = digits
    for algorithm in ("gzip", "deflate"):
        r = client.infer("network3", [infer_input(images(pixels[:2]))], request_compression_algorithm=algorithm,
                         response_compression_algorithm=algorithm)
        np.testing.assert_allclose(r.as_numpy("probabilities"), probs[:2], atol=1e-5)


def test_statistics_count_http_inferences(client, server, digits):
    before = client.get_inference_statistics("network3")["model_stats"][0]
    client.infer("network3", [infer_input(images(digits[0][:3]))])
    after = client.get_inference_statistics()["model_stats"][0]
    assert after["inference_count"] == before["inference_count"] + 3
    assert after["inference_stats"]["success"]["count"] == before["inference_stats"]["success"]["count"] + 1


def test_errors_carry_tritons_statuses_and_the_server_goes_on(client, digits):
    pixels, probs = digits
    x = images(pixels[:2])
    cases = {
        "404": lambda: client.infer("lenet", [infer_input(x)]),
        "400": lambda: client.infer("network3", [infer_input(x.reshape(2, 784))]),
    }
    for status, call in cases.items():
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.status() == status, e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("lenet")
    assert e.value.status() == "404" and "lenet" in e.value.message()
    r = client.infer("network3", [infer_input(x)])
    np.testing.assert_allclose(r.as_numpy("probabilities"), probs[:2], atol=1e-5)


# ------------------------------------------------------------------------ plain HTTP --

def test_json_data_flat_or_nested(server, digits):
    pixels, probs = digits
    x = images(pixels[:2])
    for data in (x.tolist(), x.ravel().tolist()):
        body = json.dumps({"inputs": [{"name": "images", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": data}],
                           "outputs": [{"name": "probabilities"}]}).encode()
        status, headers, answer = request(server.http_port, "POST", "/v2/models/network3/versions/1/infer", body)
        assert status == 200 and headers["Content-Type"].startswith("application/json"), answer
        out = json.loads(answer)["outputs"]
        assert [o["name"] for o in out] == ["probabilities"] and out[0]["shape"] == [2, 10]
        np.testing.assert_allclose(np.array(out[0]["data"]).reshape(2, 10), probs[:2], atol=1e-5)


def test_binary_answer_layout(server, digits):
    """Inference-Header-Content-Length splits the answer: JSON, then the outputs' bytes in order."""
    x = images(digits[0][:2])
    header = json.dumps({"inputs": [{"name": "images", "shape": [2, 1, 28, 28], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    status, headers, body = request(server.http_port, "POST", "/v2/models/network3/infer", header + x.tobytes(),
                                    {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200, body
    n = int(headers["Inference-Header-Content-Length"])
    answer = json.loads(body[:n])
    sizes = [o["parameters"]["binary_data_size"] for o in answer["outputs"]]
    assert sizes == [80, 80] and len(body) == n + 160
    np.testing.assert_allclose(np.frombuffer(body[n + 80:], "<f4").reshape(2, 10), digits[1][:2], atol=1e-5)


BAD = {
    "not json": (b"{nope", {}),
    "not an object": (b"[1, 2]", {}),
    "no inputs": (b'{"inputs": []}', {}),
    "unknown input": (json.dumps({"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                             "data": [0] * 784}]}).encode(), {}),
    "shape not numbers": (json.dumps({"inputs": [{"name": "images", "shape": ["1", 1, 28, 28], "datatype": "FP32",
                                                 "data": [0] * 784}]}).encode(), {}),
    "too few values": (json.dumps({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                              "data": [0] * 783}]}).encode(), {}),
    "strings": (json.dumps({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                       "data": ["0"] * 784}]}).encode(), {}),
    "ragged": (json.dumps({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                      "data": [[0] * 783, [0]]}]}).encode(), {}),
    "NaN": (b'{"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [NaN'
            + b", 0" * 783 + b"]}]}", {}),
    "UINT8 over 255": (json.dumps({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                                              "data": [256] * 784}]}).encode(), {}),
    "deep nesting": (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}),
    "header length past the body": (b"{}", {"Inference-Header-Content-Length": "99"}),
    "header length not a number": (b"{}", {"Inference-Header-Content-Length": "x"}),
    "binary size wrong": (json.dumps({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                                                 "parameters": {"binary_data_size": 700}}]}).encode() + bytes(784),
                          "header"),
    "unknown output": (json.dumps({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                                              "data": [0] * 784}], "outputs": [{"name": "softmax"}]}).encode(), {}),
    "classification 11": (json.dumps({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                                                 "data": [0] * 784}],
                                      "outputs": [{"name": "logits", "parameters": {"classification": 11}}]}).encode(), {}),
    "bad gzip": (b"not gzip at all", {"Content-Encoding": "gzip"}),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_400_with_a_message(server, case, digits):
    body, headers = BAD[case]
    if headers == "header":
        headers = {"Inference-Header-Content-Length": str(body.index(b"}]}") + 3)}
    status, _, answer = request(server.http_port, "POST", "/v2/models/network3/infer", body, headers)
    assert status == 400, (status, answer)
    assert json.loads(answer)["error"]
    status, _, _ = request(server.http_port, "POST", "/v2/models/network3/infer", infer_body(images(digits[0][:1])))
    assert status == 200


FUZZ_VALUES = [None, True, 0, -1, 1, 2**63, 2**70, 1.5, "", "x", "images", "FP32", "UINT8", "BYTES", [], [1], [[1]], {},
               {"a": 1}, [-1, 1, 28, 28], [0, 1, 28, 28], [2**40, 1, 28, 28], [1.0, 1, 28, 28], "probabilities"]


def test_mutated_requests_never_get_a_5xx(server, digits):
    """600 seeded random mutations of a good request (fields replaced or removed): each answered
    200, 400 or 413, never a 5xx; a good request works after them."""
    import copy
    import random

    rng = random.Random(16)

    def paths(obj, prefix=()):
        yield prefix
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from paths(v, prefix + (k,))
        elif isinstance(obj, list) and len(obj) < 10:
            for i, v in enumerate(obj):
                yield from paths(v, prefix + (i,))

    statuses = set()
    for _ in range(600):
        req = {"id": "f", "parameters": {"binary_data_output": False},
               "inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [3] * 784,
                           "parameters": {}}],
               "outputs": [{"name": "probabilities", "parameters": {"classification": 3, "binary_data": False}}]}
        for _ in range(rng.randint(1, 3)):
            path = rng.choice([q for q in paths(req) if q])
            parent = req
            for k in path[:-1]:
                parent = parent[k]
            if rng.random() < 0.7:
                parent[path[-1]] = copy.deepcopy(rng.choice(FUZZ_VALUES))
            else:
                parent.pop(path[-1])
        status, _, answer = request(server.http_port, "POST", "/v2/models/network3/infer", json.dumps(req).encode())
        assert status in (200, 400, 413), (status, req, answer)
        statuses.add(status)
    assert statuses == {200, 400, 413}
    assert request(server.http_port, "POST", "/v2/models/network3/infer", infer_body(images(digits[0][:1])))[0] == 200


def test_unknown_path_and_method(server):
    status, headers, body = request(server.http_port, "GET", "/v3/nothing")
    assert status == 404 and json.loads(body)["error"].startswith("no such path") and headers["X-Request-ID"]
    status, _, body = request(server.http_port, "POST", "/v2/health/live")
    assert status == 405 and "error" in json.loads(body)
    status, _, body = request(server.http_port, "GET", "/v2/models/network3/versions/7/config")
    assert status == 404 and "version" in json.loads(body)["error"]


def test_body_limits_before_reading_and_after_decompression(server, digits):
    limit = server.options.limits.max_message_bytes
    # A Content-Length over the limit is refused before the body is read: none is sent at all.
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=T) as sock:
        sock.sendall(f"POST /v2/models/network3/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {limit + 1}\r\n"
                     f"Content-Type: application/json\r\n\r\n".encode())
        answer = sock.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 413") and "over the limit" in answer, answer
    # A small gzip body that inflates past the limit: refused once the limit is passed.
    bomb = gzip.compress(b" " * (limit + 1024))
    status, _, body = request(server.http_port, "POST", "/v2/models/network3/infer", bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and len(bomb) < limit // 100, body
    # Within the limit, gzip and deflate bodies are read as sent.
    good = infer_body(images(digits[0][:1]))
    for encoding, packed in (("gzip", gzip.compress(good)), ("deflate", zlib.compress(good))):
        status, _, body = request(server.http_port, "POST", "/v2/models/network3/infer", packed,
                                  {"Content-Encoding": encoding})
        assert status == 200, body


def test_request_id_echoed_and_counted_in_metrics(server, digits):
    counts = server.stats.method("http", "ModelInfer").codes
    before_ok, before_bad = counts.get("200", 0), counts.get("400", 0)
    status, headers, _ = request(server.http_port, "POST", "/v2/models/network3/infer",
                                 infer_body(images(digits[0][:2])), {"X-Request-ID": "req-42"})
    assert status == 200 and headers["X-Request-ID"] == "req-42"
    status, headers, _ = request(server.http_port, "POST", "/v2/models/network3/infer", b"{}",
                                 {"X-Request-ID": "two words"})
    assert status == 400 and headers["X-Request-ID"] == "two_words"  # as the access log writes it
    status, headers, _ = request(server.http_port, "GET", "/v2/health/live")
    assert headers["X-Request-ID"]  # a new one
    assert counts["200"] == before_ok + 1 and counts["400"] == before_bad + 1


def test_queue_full_is_429_and_deadline_504(onnx_model, digits):
    pixels, probs = digits
    with thread_server(onnx_model, batcher={"max_queue_delay_us": 600_000, "max_queue_size": 20,
                                                 "alone_min": 0}) as s:  # every request queues
        c = th.InferenceServerClient(f"127.0.0.1:{s.http_port}", network_timeout=T)
        body = infer_body(images(pixels), outputs=[{"name": "probabilities"}])
        with ThreadPoolExecutor(1) as pool:  # a thread, not tritonclient's greenlets: it runs while we wait
            waiting = pool.submit(request, s.http_port, "POST", "/v2/models/network3/infer", body)
            deadline = time.monotonic() + T
            while s.server.serving.batcher.queued_images != 16 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(InferenceServerException) as e:
                c.infer("network3", [infer_input(images(pixels[:8]))])
            assert e.value.status() == "429" and "queue full" in e.value.message()
            status, _, answer = waiting.result(T)
        assert status == 200
        got = np.array(json.loads(answer)["outputs"][0]["data"]).reshape(16, 10)
        np.testing.assert_allclose(got, probs, atol=1e-5)
        with pytest.raises(InferenceServerException) as e:
            c.infer("network3", [infer_input(images(pixels[:2]))], timeout=100_000)  # 0.1 s, in microseconds
        assert e.value.status() == "504"
        c.close()


def test_tls_serves_https_with_the_same_certificate(onnx_model, pki, digits):
    with thread_server(onnx_model, tls_cert=pki / "server.crt", tls_key=pki / "server.key") as s:
        assert s.http_url.startswith("https://")
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        status, _, body = request(s.http_port, "POST", "/v2/models/network3/infer",
                                  infer_body(images(digits[0][:1])), context=context)
        assert status == 200, body
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            request(s.http_port, "GET", "/v2/health/live")  # plain text to the TLS port


def test_mutual_tls_over_http(onnx_model, pki, digits):
    with thread_server(onnx_model, tls_cert=pki / "server.crt", tls_key=pki / "server.key",
                       tls_client_ca=pki / "ca.crt") as s:
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            request(s.http_port, "GET", "/v2/health/live", context=context)  # no client certificate
        context.load_cert_chain(pki / "client.crt", pki / "client.key")
        assert request(s.http_port, "GET", "/v2/health/live", context=context)[0] == 200


# ---------------------------------------------------------------------- in a process --

def test_sighup_reload_shows_over_http(process_server, onnx_model, tmp_path):
    import hashlib
    import shutil

    import onnx

    path = tmp_path / "served.onnx"
    shutil.copy(onnx_model, path)
    s = process_server(model=path)

    def sha256() -> str:
        return json.loads(request(s.http_port, "GET", "/v2/models/network3")[2])["parameters"]["sha256"]

    first = sha256()
    m = onnx.load(str(onnx_model))
    m.metadata_props.add(key="reload_marker", value="second")
    onnx.save(m, str(tmp_path / "new.onnx"))
    os.replace(tmp_path / "new.onnx", path)
    s.signal(signal.SIGHUP)
    deadline = time.monotonic() + T
    while sha256() == first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sha256() == hashlib.sha256(path.read_bytes()).hexdigest() != first


def test_token_guards_all_but_health_and_the_page(process_server, tmp_path, digits):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    s = process_server("--token-file", str(token_file))
    good = infer_body(images(digits[0][:1]))
    for path, body in (("/v2", None), ("/v2/models/network3/config", None), ("/v2/models/network3/infer", good),
                       ("/v1/model", None), ("/nothing", None)):
        method = "POST" if body else "GET"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            status, h, answer = request(s.http_port, method, path, body, headers)
            assert status == 401 and "token" in json.loads(answer)["error"], (path, headers, status)
            assert TOKEN not in answer.decode()
    status, _, _ = request(s.http_port, "POST", "/v2/models/network3/infer", good,
                           {"Authorization": f"Bearer {TOKEN}", "X-Request-ID": "with-token"})
    assert status == 200
    for path in ("/v2/health/live", "/v2/health/ready", "/", "/web/app.js"):
        assert request(s.http_port, "GET", path)[0] != 401, path
    c = th.InferenceServerClient(f"127.0.0.1:{s.http_port}", network_timeout=T)
    assert c.get_model_metadata("network3", headers={"Authorization": f"Bearer {TOKEN}"})["name"] == "network3"
    c.close()
    line = s.wait_for_log(r".* id=with-token .*").group(0)
    assert "method=http.ModelInfer code=200 images=1" in line
    assert TOKEN not in s.log()


def test_sigterm_drains_http_requests_in_flight_and_refuses_new_ones_503(process_server, digits):
    pixels, probs = digits
    s = process_server("--max-queue-delay-us", "1500000", "--grace", "20", "--metrics-port", "0")
    pool = ThreadPoolExecutor(8)  # threads, not tritonclient's greenlets: they run while we wait
    body = lambda i: infer_body(images(pixels[i:i + 2]), outputs=[{"name": "probabilities"}])  # noqa: E731
    waiting = [pool.submit(request, s.http_port, "POST", "/v2/models/network3/infer", body(i)) for i in range(0, 16, 2)]
    deadline = time.monotonic() + T
    while queue_depth(s.metrics_port) != 16 and time.monotonic() < deadline:  # the queue delay holds them 1.5 s
        time.sleep(0.02)
    s.signal(signal.SIGTERM)
    for _ in range(200):
        status, _, body = request(s.http_port, "GET", "/v2/health/ready")
        if status == 503:
            assert "shutting down" in json.loads(body)["error"]
            break
        time.sleep(0.01)
    else:
        pytest.fail("the server kept answering after SIGTERM")
    answers = [w.result(T) for w in waiting]
    pool.shutdown()
    assert [status for status, _, _ in answers] == [200] * 8
    got = np.concatenate([np.array(json.loads(a)["outputs"][0]["data"]).reshape(2, 10) for _, _, a in answers])
    np.testing.assert_allclose(got, probs, atol=1e-5)
    assert s.wait(30) == 0
    assert "stopped" in s.log()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", s.http_port), timeout=5).close()  # the site is closed


def queue_depth(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=T).read().decode()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("network3_queue_depth "))


def listening_sockets(pid: int) -> int:
    """How many listening TCP sockets process `pid` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                n += fields[3] == "0A" and fields[9] in inodes
    return n


def test_no_http_opens_no_http_port(process_server):
    s = process_server("--no-http")
    assert s.http_port is None and "network3 http on" not in s.log()
    assert listening_sockets(s.pid) == 1  # gRPC's only
    t = process_server()
    assert t.http_port and listening_sockets(t.pid) == 2
    lines = t.log().splitlines()
    http_line = lines.index(f"network3 http on http://127.0.0.1:{t.http_port}")
    assert lines[http_line + 1] == f"network3 serving on 127.0.0.1:{t.port}"  # the http line comes first


def test_a_taken_http_port_fails_at_once_with_one_line(process_server, onnx_model):
    first = process_server()
    r = subprocess.run([sys.executable, "-m", "serving.server", "--model", str(onnx_model), "--port", "0",
                        "--http-port", str(first.http_port), "--log-level", "WARNING"],
                       cwd=ROOT, capture_output=True, text=True, timeout=T)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0] == f"Error: cannot listen on http 127.0.0.1:{first.http_port}: Address already in use"
    assert request(first.http_port, "GET", "/v2/health/live")[0] == 200  # the first one is unharmed


def test_http_port_option_defaults_from_the_dataclass():
    from serving.server import ServerOptions, serve_command

    option = next(p for p in serve_command.params if p.name == "http_port")
    assert option.default == ServerOptions.http_port == 8000 and "NETWORK3_HTTP_PORT" in option.envvar


def test_perf_analyzer_over_http(process_server, tmp_path):
    found = perf_analyzer()
    if found is None:
        pytest.skip("perf_analyzer cannot load here (needs libb64-0d and nvidia-cuda-runtime-cu12; `make bench-serve` installs them)")
    binary, env = found
    s = process_server("--no-access-log")
    out = tmp_path / "perf.csv"
    r = subprocess.run([str(binary), "-m", "network3", "-u", f"127.0.0.1:{s.http_port}", "-i", "http",
                        "--input-data", "zero", "-b", "4", "--concurrency-range", "2", "--measurement-mode",
                        "count_windows", "--measurement-request-count", "30", "-s", "1000", "-f", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    row = next(csv.DictReader(out.open()))
    assert float(row["Inferences/Second"]) > 0
    assert "Server:" in r.stdout and "Inference count" in r.stdout  # it read our statistics


def test_concurrent_http_and_grpc_share_one_batcher(server, digits):
    """Both protocols at once on one server: every answer right, counted under each API."""
    import grpc

    from protos.inference import grpc_service_pb2 as v2
    from protos.inference import grpc_service_pb2_grpc as v2_grpc

    pixels, probs = digits
    x = images(pixels[:4])
    body = infer_body(x, outputs=[{"name": "probabilities"}])

    def over_http(_):
        status, _, answer = request(server.http_port, "POST", "/v2/models/network3/infer", body)
        assert status == 200
        return np.array(json.loads(answer)["outputs"][0]["data"]).reshape(4, 10)

    def over_grpc(_):
        with grpc.insecure_channel(server.address) as ch:
            T_ = v2.ModelInferRequest.InferInputTensor
            r = v2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(v2.ModelInferRequest(
                model_name="network3", inputs=[T_(name="images", datatype="FP32", shape=[4, 1, 28, 28])],
                raw_input_contents=[x.tobytes()]), timeout=T)
            return np.frombuffer(r.raw_output_contents[1], "<f4").reshape(4, 10)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: (over_http if i % 2 else over_grpc)(i), range(16)))
    for got in results:
        np.testing.assert_allclose(got, probs[:4], atol=1e-5)


def _call(port: int, method: str, path: str, headers: dict) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=T)
    try:
        c.request(method, path, headers=headers)
        r = c.getresponse()
        r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}
    finally:
        c.close()


def test_cors_is_off_unless_an_origin_is_named(onnx_model, tmp_path):
    """--cors-origin: a page of that origin may call the API (preflight without the token, the
    answer and its errors readable); any other origin, or a server without the option, gets no
    Access-Control-Allow-Origin, so a browser keeps the answer from the page."""
    allowed, other = "https://app.example", "https://evil.example"
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    with thread_server(onnx_model) as s:
        status, h = _call(s.http_port, "GET", "/v2", {"Origin": allowed})
        assert status == 200 and "access-control-allow-origin" not in h
        status, h = _call(s.http_port, "OPTIONS", "/v2/models/network3/infer", {"Origin": allowed, **preflight})
        assert status != 204 and "access-control-allow-origin" not in h
    with thread_server(onnx_model, cors_origins=(allowed,), token_file=token) as s:
        status, h = _call(s.http_port, "OPTIONS", "/v2/models/network3/infer", {"Origin": allowed, **preflight})
        assert status == 204 and h["access-control-allow-origin"] == allowed, (status, h)
        assert "POST" in h["access-control-allow-methods"] and "Authorization" in h["access-control-allow-headers"]
        status, h = _call(s.http_port, "OPTIONS", "/v2/models/network3/infer", {"Origin": other, **preflight})
        assert status == 401 and "access-control-allow-origin" not in h
        auth = {"Authorization": "Bearer s3cret"}
        status, h = _call(s.http_port, "GET", "/v2", {"Origin": allowed, **auth})
        assert status == 200 and h["access-control-allow-origin"] == allowed and "Origin" in h["vary"]
        assert "X-Request-ID" in h["access-control-expose-headers"]
        status, h = _call(s.http_port, "GET", "/v2", {"Origin": allowed})  # an error is readable too
        assert status == 401 and h["access-control-allow-origin"] == allowed
        status, h = _call(s.http_port, "GET", "/v2", {"Origin": other, **auth})
        assert status == 200 and "access-control-allow-origin" not in h
