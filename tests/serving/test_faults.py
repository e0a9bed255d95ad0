"""Faults: the server killed under a running `network3 classify` job and back on its port, a
client that disconnects mid-stream, a server started on a bad model, SIGTERM with 100 requests
of both APIs in flight.

Already elsewhere: the server gone for good under a job (exit 3: test_cli.py), a stream across
a server restart (test_client.py), SIGTERM drain and SIGHUP reload with a truncated file
(test_server.py), training killed and resumed, full and read-only disks (test_train_faults.py).
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fixtures_serving import ROOT, ProcessServer, thread_server
from protos.inference import grpc_service_pb2 as v2
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from protos.network3.v1 import classifier_pb2 as pb
from protos.network3.v1 import classifier_pb2_grpc as pb_grpc

T = 60  # seconds: every call and every wait has a deadline
NETWORK3 = Path(sys.executable).with_name("network3")


def wait_until(condition, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout}s")
        time.sleep(0.02)


def classify_request(pixels: np.ndarray, tag: str) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(images=[pb.Image(pixels=p.tobytes(), id=f"{tag}-{i}") for i, p in enumerate(pixels)])


def infer_request(pixels: np.ndarray, tag: str) -> v2.ModelInferRequest:
    x = pixels.reshape(-1, 1, 28, 28)
    return v2.ModelInferRequest(model_name="network3", id=tag, inputs=[v2.ModelInferRequest.InferInputTensor(
        name="images", datatype="UINT8", shape=list(x.shape))], raw_input_contents=[x.tobytes()])


def infer_digits(r: v2.ModelInferResponse) -> list[int]:
    return np.frombuffer(r.raw_output_contents[1], np.float32).reshape(-1, 10).argmax(1).tolist()


# --------------------------------------------------------- SIGKILL under a classify job --

def test_classify_job_rides_out_a_server_killed_and_restarted(process_server, sample_dir, predict, tmp_path):
    """`network3 classify` over 600 files; the server is SIGKILLed a few answers in and comes
    back on the same port: the job retries, answers every file once and in order, exit 0."""
    from PIL import Image

    files = sorted(sample_dir.rglob("*.png")) * 2
    first = process_server("--no-access-log")
    port = first.port
    restarted = threading.Event()
    out_path, err_path = tmp_path / "out.jsonl", tmp_path / "err.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen([str(NETWORK3), "classify", "-", "--server", first.address, "--timeout", "30",
                                 "--batch-size", "20", "--window", "2"], stdin=subprocess.PIPE, stdout=out,
                                stderr=err, text=True, cwd=ROOT)

    def feed():  # the first half now, the rest once the server is back
        try:
            for i, f in enumerate(files):
                if i == len(files) // 2:
                    restarted.wait(T)
                proc.stdin.write(f"{f}\n")
                proc.stdin.flush()
            proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        wait_until(lambda: out_path.read_text().count("\n") >= 5, what="the job under way")
        first.kill()  # SIGKILL: nothing drained, the requests in flight are lost
        time.sleep(0.5)
        process_server("--no-access-log", "--port", str(port))
        restarted.set()
        try:
            code = proc.wait(120)  # never hangs
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the job hung after {out_path.read_text().count(chr(10))} of {len(files)} rows; "
                                 f"its stderr: {err_path.read_text()!r}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
    writer.join(10)
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert code == 0, err_path.read_text()
    assert [r["source"] for r in rows] == [str(f) for f in files]
    pixels = np.stack([np.asarray(Image.open(f)) for f in files])
    assert [r["digit"] for r in rows] == predict(pixels).tolist()


# --------------------------------------------------- a client that disconnects mid-stream --

CLIENT = r"""
import sys, time, grpc, numpy as np
from protos.network3.v1 import classifier_pb2 as pb, classifier_pb2_grpc as pb_grpc
from protos.inference import grpc_service_pb2 as v2, grpc_service_pb2_grpc as v2_grpc
api, address, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ch = grpc.insecure_channel(address)
def requests():
    for i in range(n):
        if api == "ClassifyStream":
            yield pb.ClassifyRequest(images=[pb.Image(pixels=bytes(784))] * 16)
        else:
            yield v2.ModelInferRequest(model_name="network3", inputs=[v2.ModelInferRequest.InferInputTensor(
                name="images", datatype="UINT8", shape=[16, 1, 28, 28])], raw_input_contents=[bytes(16 * 784)])
    print("sent", flush=True)
    time.sleep(600)  # keep the stream open: the test kills this process
stub = pb_grpc.DigitClassifierStub(ch) if api == "ClassifyStream" else v2_grpc.GRPCInferenceServiceStub(ch)
for answer in getattr(stub, api)(requests()):
    pass
"""


@pytest.mark.parametrize("api", ["ClassifyStream", "ModelStreamInfer"])
def test_a_client_killed_mid_stream_frees_its_work(onnx_model, digits, api):
    """The client process dies with 10 requests (160 images) queued on its stream: the server
    drops them without computing them, empties its queue, counts the stream CANCELLED and
    goes on serving."""
    pixels, labels = digits
    # The queue delay holds the requests in the batcher's queue long enough to kill the client
    # (alone_min 0: 16-image requests are merged too, not run on their own at once).
    with thread_server(onnx_model, batcher={"max_queue_delay_us": 2_000_000, "alone_min": 0}) as s:
        batcher, stats = s.server.serving.batcher, s.stats
        computed = stats.inference_count()
        client = subprocess.Popen([sys.executable, "-c", CLIENT, api, s.address, "10"], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout.readline().strip() == "sent"
            wait_until(lambda: batcher.queued_images == 160, what="160 images queued")
            client.send_signal(signal.SIGKILL)
            client.wait(T)
        finally:
            if client.poll() is None:
                client.kill()
        wait_until(lambda: s.server.serving.inflight == 0 and batcher.queued_images == 0, what="work freed")
        api_name = "network3.v1.DigitClassifier" if api == "ClassifyStream" else "inference.GRPCInferenceService"
        wait_until(lambda: stats.method(api_name, api).codes.get("CANCELLED") == 1, what="stream counted CANCELLED")
        assert stats.dropped.get("cancelled") == 10
        assert stats.inference_count() == computed  # nothing was computed for a client that left
        with s.channel() as ch:
            r = pb_grpc.DigitClassifierStub(ch).Classify(classify_request(pixels[:8], "after"), timeout=T)
            assert [p.digit for p in r.predictions] == predict_like(s, pixels[:8])
            r = v2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(infer_request(pixels[:8], "after"), timeout=T)
            assert infer_digits(r) == predict_like(s, pixels[:8])


def predict_like(s, pixels: np.ndarray) -> list[int]:
    from serving.preprocess import pixels_to_input

    return s.server.serving.model.predict(pixels_to_input(pixels))[1].argmax(1).tolist()


# ------------------------------------------------------------- a bad model at start-up --

def _wrong_signature(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(graph), str(path))


def _bad_labels(source: Path, path: Path) -> None:
    import onnx

    m = onnx.load(str(source))
    for p in m.metadata_props:
        if p.key == "labels":
            p.value = "not json"
    onnx.save(m, str(path))


@pytest.mark.parametrize("case", ["missing folder", "folder", "empty", "truncated", "wrong signature", "bad labels"])
def test_serve_on_a_bad_model_exits_with_one_line(onnx_model, tmp_path, case):
    path = tmp_path / "model.onnx"
    if case == "missing folder":
        path = tmp_path / "nowhere" / "model.onnx"
    elif case == "folder":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(onnx_model.read_bytes()[: onnx_model.stat().st_size // 2])
    elif case == "wrong signature":
        _wrong_signature(path)
    else:
        _bad_labels(onnx_model, path)
    r = subprocess.run([str(NETWORK3), "serve", "--model", str(path), "--port", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=T)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    if case == "folder":  # click's own check: a usage error (exit 2, with its usage lines)
        assert r.returncode == 2 and "is a directory" in lines[-1]
    else:
        assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[-1].startswith("Error: ") and str(path) in lines[-1] and "Traceback" not in r.stderr, r.stderr
    assert "network3 serving on" not in r.stderr


# ------------------------------------------------------- SIGTERM with 100 calls in flight --

def test_sigterm_with_100_calls_of_both_apis_in_flight(onnx_model, tmp_path, digits):
    """40 Classify, 40 ModelInfer, 10 ClassifyStream and 10 ModelStreamInfer calls (240 images)
    wait in the batcher's queue when SIGTERM comes: every one is answered, right, and the server
    exits 0."""
    pixels, labels = digits
    s = ProcessServer(onnx_model, "--max-queue-delay-us", "5000000", "--grace", "30", "--no-access-log",
                      "--metrics-port", "0", log=tmp_path / "server.log")
    metrics_port = int(s.wait_for_log(r"metrics on :(\d+)/metrics").group(1))
    try:
        from serving.model import ModelOptions, load_model
        from serving.preprocess import pixels_to_input

        reference = load_model(onnx_model, ModelOptions(intra_op_threads=1, warmup_batch_sizes=(1,)))
        want = reference.predict(pixels_to_input(pixels))[1].argmax(1).tolist()
        with grpc.insecure_channel(s.address) as ch, ThreadPoolExecutor(20) as pool:
            classify, infer = pb_grpc.DigitClassifierStub(ch), v2_grpc.GRPCInferenceServiceStub(ch)
            calls = []  # (what it must answer, a function that waits for the answer)
            for i in range(40):
                a, b = 2 * (i % 32), 2 * (i % 32) + 2
                f = classify.Classify.future(classify_request(pixels[a:b], f"c{i}"), timeout=T)
                calls.append((want[a:b], lambda f=f: [p.digit for p in f.result().predictions]))
                g = infer.ModelInfer.future(infer_request(pixels[a:b], f"i{i}"), timeout=T)
                calls.append((want[a:b], lambda g=g: infer_digits(g.result())))
            for i in range(10):
                a = 4 * i
                stream = classify.ClassifyStream(iter([classify_request(pixels[a:a + 2], "s"),
                                                       classify_request(pixels[a + 2:a + 4], "s")]), timeout=T)
                f = pool.submit(lambda st=stream: [p.digit for r in st for p in r.predictions])
                calls.append((want[a:a + 4], f.result))
                stream = infer.ModelStreamInfer(iter([infer_request(pixels[a:a + 2], "t"),
                                                      infer_request(pixels[a + 2:a + 4], "t")]), timeout=T)
                f = pool.submit(lambda st=stream: [d for r in st for d in infer_digits(r.infer_response)])
                calls.append((want[a:a + 4], f.result))
            assert len(calls) == 100
            # All 240 images queued: the queue delay holds them (5 s after the first one).
            wait_until(lambda: queue_depth(metrics_port) == 240, what="240 images queued")
            s.signal(signal.SIGTERM)
            answers = [(expected, get()) for expected, get in calls]
        assert all(got == expected for expected, got in answers)
        assert s.wait(T) == 0
        assert "draining" in s.log() and "stopped" in s.log()
    finally:
        s.kill()


def queue_depth(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=T).read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "network3_queue_depth")
