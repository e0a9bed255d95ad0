"""The real server on a loopback port, real MNIST digits, our own generated stubs.

Every error case is followed by a good request on the same server, which must still succeed.
Signals (SIGTERM drain, SIGHUP reload) use a server in a subprocess.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from fixtures_serving import ROOT, png, thread_server
from protos.inference import grpc_service_pb2 as v2
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from protos.network3.v1 import classifier_pb2 as pb
from protos.network3.v1 import classifier_pb2_grpc as pb_grpc
from serving.model import ModelOptions, load_model
from serving.preprocess import pixels_to_input

T = 30  # seconds: every call has a deadline


def stubs(channel):
    return pb_grpc.DigitClassifierStub(channel), v2_grpc.GRPCInferenceServiceStub(channel)


def raw(pixels, ids=None, top_k=None):
    ids = ids or [f"d{i}" for i in range(len(pixels))]
    return pb.ClassifyRequest(images=[pb.Image(pixels=p.tobytes(), id=i) for p, i in zip(pixels, ids)], top_k=top_k)


def v2_request(x: np.ndarray, dtype="FP32", outputs=(), **kw) -> v2.ModelInferRequest:
    T_ = v2.ModelInferRequest.InferInputTensor
    return v2.ModelInferRequest(model_name=kw.pop("model_name", "network3"),
                                inputs=[T_(name="images", datatype=dtype, shape=list(x.shape))],
                                raw_input_contents=[x.tobytes()], outputs=list(outputs), **kw)


def metrics(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=T).read().decode()
    return {s.name + str(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.fixture(scope="module")
def reference(onnx_model):
    """The same file in-process: what the server must answer."""
    return load_model(onnx_model, ModelOptions())


@pytest.fixture(scope="module")
def digits(mnist, reference):
    """The first 64 MNIST test digits and the served model's own answers for them: the serving
    tests' model (tests/small_model.py) is not the trained net, so what the server must return
    is what the model says, not the true label (test_classify_png_digits checks accuracy)."""
    pixels = mnist.test_x[:64]
    return pixels, reference.predict(pixels_to_input(pixels))[1].argmax(1)


@pytest.fixture(scope="module")
def channel(server):
    with server.channel() as ch:
        yield ch


# ------------------------------------------------------------------------ classification --

def test_classify_png_digits(channel, digits, reference, mnist):
    pixels, predicted = digits
    classify, _ = stubs(channel)
    request = pb.ClassifyRequest(images=[pb.Image(encoded=png(p), id=f"png{i}") for i, p in enumerate(pixels)])
    response = classify.Classify(request, timeout=T)
    got = np.array([p.digit for p in response.predictions])
    assert [p.id for p in response.predictions] == [f"png{i}" for i in range(len(pixels))]
    assert (got == mnist.test_y[:len(pixels)]).mean() >= 0.85  # a real classifier on real test digits
    np.testing.assert_array_equal(got, predicted)
    for p in response.predictions:
        assert len(p.probabilities) == 10 and abs(sum(p.probabilities) - 1) < 1e-4
        assert p.probability == max(p.probabilities) and p.label == str(p.digit)


def test_classify_raw_pixels_with_top_k(channel, digits, reference, onnx_model):
    pixels, labels = digits
    classify, _ = stubs(channel)
    response = classify.Classify(raw(pixels[:10], top_k=3), timeout=T)
    want = reference.predict(pixels_to_input(pixels[:10]))[1]
    for p, row in zip(response.predictions, want):
        np.testing.assert_allclose(p.probabilities, row, rtol=1e-5, atol=1e-6)
        assert [c.digit for c in p.top_k] == list(np.argsort(-row, kind="stable")[:3])
        assert p.top_k[0].probability == p.probability
    assert response.model_sha256 == hashlib.sha256(onnx_model.read_bytes()).hexdigest()


def test_stream_keeps_order_ids_and_survives_bad_images(channel, digits):
    pixels, labels = digits
    classify, _ = stubs(channel)
    requests = [raw(pixels[i:i + 4], ids=[f"s{j}" for j in range(i, i + 4)]) for i in range(0, 40, 4)]
    requests.insert(3, pb.ClassifyRequest())  # empty: a response with `error`, the stream goes on
    requests.insert(6, pb.ClassifyRequest(images=[pb.Image(pixels=pixels[0].tobytes(), id="ok"),
                                                  pb.Image(encoded=b"not an image", id="bad"),
                                                  pb.Image(pixels=b"\x00" * 10, id="short")]))
    responses = list(classify.ClassifyStream(iter(requests), timeout=T))
    assert len(responses) == len(requests)
    assert responses[3].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and not responses[3].predictions
    mixed = responses[6].predictions
    assert [p.id for p in mixed] == ["ok", "bad", "short"]
    assert not mixed[0].HasField("error") and mixed[0].digit == labels[0]
    assert mixed[1].error.code == 3 and "images[1].encoded" in mixed[1].error.message
    assert mixed[2].error.code == 3 and "images[2].pixels: 10 bytes" in mixed[2].error.message
    good = [p for i, r in enumerate(responses) if i not in (3, 6) for p in r.predictions]
    assert [p.id for p in good] == [f"s{j}" for j in range(40)]
    assert [p.digit for p in good] == list(labels[:40])


def test_model_info_shows_file_and_metadata(channel, onnx_model):
    classify, _ = stubs(channel)
    info = classify.GetModelInfo(pb.GetModelInfoRequest(), timeout=T)
    assert info.name == "network3" and info.version == "1"
    assert info.sha256 == hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    assert {"labels", "input", "preset", "test_accuracy"} <= set(info.metadata)
    assert list(info.labels) == [str(i) for i in range(10)]
    loaded = info.loaded_at.ToDatetime(tzinfo=datetime.timezone.utc)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - loaded).total_seconds()) < 24 * 3600
    assert info.limits.max_images_per_request == 256 and info.limits.max_pixels == 1_000_000
    assert "CPUExecutionProvider" in info.providers


def test_v2_infer_fp32_and_uint8_and_classification(channel, digits, reference):
    pixels, labels = digits
    _, infer = stubs(channel)
    x = pixels_to_input(pixels[:8])
    r = infer.ModelInfer(v2_request(x, id="req-1"), timeout=T)
    assert r.id == "req-1" and [o.name for o in r.outputs] == ["logits", "probabilities"]
    probs = np.frombuffer(r.raw_output_contents[1], np.float32).reshape(8, 10)
    np.testing.assert_allclose(probs, reference.predict(x)[1], rtol=1e-5, atol=1e-6)
    out = v2.ModelInferRequest.InferRequestedOutputTensor(
        name="probabilities", parameters={"classification": v2.InferParameter(int64_param=2)})
    r = infer.ModelInfer(v2_request(pixels[:8].reshape(8, 1, 28, 28), dtype="UINT8", outputs=[out]), timeout=T)
    assert r.outputs[0].datatype == "BYTES" and list(r.outputs[0].shape) == [8, 2]
    blob, items = r.raw_output_contents[0], []
    while blob:
        n = int.from_bytes(blob[:4], "little")
        items.append(blob[4:4 + n].decode())
        blob = blob[4 + n:]
    top = [items[i].split(":") for i in range(0, 16, 2)]
    assert [int(t[1]) for t in top] == list(probs.argmax(1)) and all(t[1] == t[2] for t in top)
    np.testing.assert_allclose([float(t[0]) for t in top], probs.max(1), atol=1e-5)


def test_v2_metadata_config_statistics(channel, server):
    _, infer = stubs(channel)
    assert infer.ServerLive(v2.ServerLiveRequest(), timeout=T).live
    assert infer.ServerReady(v2.ServerReadyRequest(), timeout=T).ready
    assert infer.ModelReady(v2.ModelReadyRequest(name="network3"), timeout=T).ready
    assert not infer.ModelReady(v2.ModelReadyRequest(name="other"), timeout=T).ready
    assert "classification" in infer.ServerMetadata(v2.ServerMetadataRequest(), timeout=T).extensions
    meta = infer.ModelMetadata(v2.ModelMetadataRequest(name="network3"), timeout=T)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("images", "FP32", [-1, 1, 28, 28])]
    assert meta.parameters["sha256"].string_param == server.server.serving.model.sha256
    config = infer.ModelConfig(v2.ModelConfigRequest(name="network3"), timeout=T).config
    assert config.max_batch_size == 256 and list(config.input[0].dims) == [1, 28, 28]
    assert [list(o.dims) for o in config.output] == [[10], [10]]
    infer.ModelInfer(v2_request(np.zeros((3, 1, 28, 28), np.float32)), timeout=T)
    stats = infer.ModelStatistics(v2.ModelStatisticsRequest(name="network3"), timeout=T).model_stats[0]
    assert stats.inference_count == server.stats.inference_count() >= 3
    assert stats.execution_count == server.stats.execution_count()
    assert stats.inference_stats.success.count >= 1 and stats.inference_stats.compute_infer.ns > 0


def test_v2_stream_infer(channel, digits):
    pixels, labels = digits
    _, infer = stubs(channel)
    requests = [v2_request(pixels_to_input(pixels[i:i + 2]), id=f"r{i}") for i in range(0, 10, 2)]
    requests.insert(2, v2_request(np.full((1, 1, 28, 28), 2.0, np.float32), id="bad"))
    responses = list(infer.ModelStreamInfer(iter(requests), timeout=T))
    assert [r.infer_response.id for r in responses] == ["r0", "r2", "bad", "r4", "r6", "r8"]
    assert "outside [0, 1]" in responses[2].error_message
    good = [r for r in responses if not r.error_message]
    digits_out = np.concatenate([np.frombuffer(r.infer_response.raw_output_contents[1], np.float32).reshape(-1, 10).argmax(1)
                                 for r in good])
    assert list(digits_out) == list(labels[:10])


# --------------------------------------------------------------------------------- errors --

def _v2(x, **kw):
    return lambda c, i: i.ModelInfer(v2_request(x, **kw), timeout=T)


def _v2_raw(request):
    return lambda c, i: i.ModelInfer(request, timeout=T)


Tensor = v2.ModelInferRequest.InferInputTensor
ZERO = np.zeros((1, 1, 28, 28), np.float32)
BAD_REQUESTS = {
    # name: (call, expected code, words the message must contain)
    "empty request": (lambda c, i: c.Classify(pb.ClassifyRequest(), timeout=T), "INVALID_ARGUMENT", "no images"),
    "undecodable bytes": (lambda c, i: c.Classify(pb.ClassifyRequest(images=[pb.Image(encoded=b"\x89PNG broken")]), timeout=T),
                          "INVALID_ARGUMENT", "images[0].encoded"),
    "wrong pixel count": (lambda c, i: c.Classify(pb.ClassifyRequest(images=[pb.Image(pixels=bytes(784)), pb.Image(pixels=bytes(783))]), timeout=T),
                          "INVALID_ARGUMENT", "images[1].pixels: 783 bytes"),
    "image without data": (lambda c, i: c.Classify(pb.ClassifyRequest(images=[pb.Image(id="x")]), timeout=T),
                           "INVALID_ARGUMENT", "images[0]"),
    "top_k over 10": (lambda c, i: c.Classify(pb.ClassifyRequest(images=[pb.Image(pixels=bytes(784))], top_k=11), timeout=T),
                      "INVALID_ARGUMENT", "top_k"),
    "too many images": (lambda c, i: c.Classify(pb.ClassifyRequest(images=[pb.Image(pixels=bytes(784))] * 257), timeout=T),
                        "RESOURCE_EXHAUSTED", "--max-images-per-request 256"),
    "image over max pixels": (lambda c, i: c.Classify(pb.ClassifyRequest(images=[pb.Image(encoded=png(np.zeros((1000, 1100), np.uint8)))]), timeout=T),
                              "RESOURCE_EXHAUSTED", "1,100,000 pixels"),
    "message too large": (lambda c, i: c.Classify(pb.ClassifyRequest(images=[pb.Image(encoded=os.urandom(5 * 1024 * 1024))]), timeout=T),
                          "RESOURCE_EXHAUSTED", ""),
    "unknown model": (_v2(ZERO, model_name="lenet"), "NOT_FOUND", "unknown model 'lenet'"),
    "unknown version": (_v2(ZERO, model_version="7"), "NOT_FOUND", "no version '7'"),
    "no inputs": (_v2_raw(v2.ModelInferRequest(model_name="network3")), "INVALID_ARGUMENT", "no inputs"),
    "unknown input": (_v2_raw(v2.ModelInferRequest(model_name="network3", inputs=[Tensor(name="pixels", datatype="FP32", shape=[1, 1, 28, 28])],
                                                   raw_input_contents=[ZERO.tobytes()])), "INVALID_ARGUMENT", "unknown input 'pixels'"),
    "wrong datatype": (_v2(ZERO.astype(np.int32), dtype="INT32"), "INVALID_ARGUMENT", "datatype 'INT32'"),
    "wrong shape": (_v2(np.zeros((1, 28, 28), np.float32)), "INVALID_ARGUMENT", "shape [1, 28, 28]"),
    "byte count not matching shape": (_v2_raw(v2.ModelInferRequest(model_name="network3", inputs=[Tensor(name="images", datatype="FP32", shape=[2, 1, 28, 28])],
                                                                   raw_input_contents=[ZERO.tobytes()])), "INVALID_ARGUMENT", "3136 bytes"),
    "NaN": (_v2(np.where(np.arange(784).reshape(1, 1, 28, 28) == 5, np.nan, 0).astype(np.float32)), "INVALID_ARGUMENT", "NaN"),
    "infinity": (_v2(np.full((1, 1, 28, 28), np.inf, np.float32)), "INVALID_ARGUMENT", "infinity"),
    "value over 1": (_v2(np.full((1, 1, 28, 28), 1.5, np.float32)), "INVALID_ARGUMENT", "outside [0, 1]"),
    "negative value": (_v2(np.full((1, 1, 28, 28), -0.1, np.float32)), "INVALID_ARGUMENT", "outside [0, 1]"),
    "raw and typed contents": (_v2_raw(v2.ModelInferRequest(model_name="network3", inputs=[Tensor(
        name="images", datatype="FP32", shape=[1, 1, 28, 28], contents=v2.InferTensorContents(fp32_contents=[0.0] * 784))],
        raw_input_contents=[ZERO.tobytes()])), "INVALID_ARGUMENT", "both raw_input_contents and contents"),
    "typed count not matching shape": (_v2_raw(v2.ModelInferRequest(model_name="network3", inputs=[Tensor(
        name="images", datatype="FP32", shape=[1, 1, 28, 28], contents=v2.InferTensorContents(fp32_contents=[0.0] * 700))])),
        "INVALID_ARGUMENT", "700 values"),
    "uint8 typed over 255": (_v2_raw(v2.ModelInferRequest(model_name="network3", inputs=[Tensor(
        name="images", datatype="UINT8", shape=[1, 1, 28, 28], contents=v2.InferTensorContents(uint_contents=[256] * 784))])),
        "INVALID_ARGUMENT", "over 255"),
    "unknown output": (_v2(ZERO, outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(name="softmax")]),
                       "INVALID_ARGUMENT", "unknown output 'softmax'"),
    "bad classification count": (_v2(ZERO, outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(
        name="logits", parameters={"classification": v2.InferParameter(int64_param=11)})]), "INVALID_ARGUMENT", "classification"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_clear_status_then_good_request_works(case, channel, digits):
    call, code, words = BAD_REQUESTS[case]
    classify, infer = stubs(channel)
    with pytest.raises(grpc.RpcError) as e:
        call(classify, infer)
    assert e.value.code() == getattr(grpc.StatusCode, code), e.value.details()
    assert words in e.value.details()
    pixels, labels = digits
    assert classify.Classify(raw(pixels[:1]), timeout=T).predictions[0].digit == labels[0]
    r = infer.ModelInfer(v2_request(pixels_to_input(pixels[:1])), timeout=T)
    assert np.frombuffer(r.raw_output_contents[1], np.float32).argmax() == labels[0]


def test_typed_contents_are_accepted(channel, digits):
    pixels, labels = digits
    _, infer = stubs(channel)
    x = pixels_to_input(pixels[:2])
    r = infer.ModelInfer(v2.ModelInferRequest(model_name="network3", inputs=[Tensor(
        name="images", datatype="FP32", shape=[2, 1, 28, 28], contents=v2.InferTensorContents(fp32_contents=x.ravel().tolist()))]),
        timeout=T)
    assert list(np.frombuffer(r.raw_output_contents[1], np.float32).reshape(2, 10).argmax(1)) == list(labels[:2])


# ------------------------------------------------------------- health, reflection, metrics --

def test_health_per_service_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "network3.v1.DigitClassifier", "inference.GRPCInferenceService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=T).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(channel)
    assert {"network3.v1.DigitClassifier", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= set(db.get_services())
    found = db.FindFileContainingSymbol("network3.v1.DigitClassifier")
    assert found.package == "network3.v1" and [s.name for s in found.service] == ["DigitClassifier"]


def test_metrics_count_requests_by_code(server, channel, digits):
    classify, _ = stubs(channel)
    before = metrics(server.server.metrics_port)
    classify.Classify(raw(digits[0][:2]), timeout=T)
    with pytest.raises(grpc.RpcError):
        classify.Classify(pb.ClassifyRequest(), timeout=T)
    after = metrics(server.server.metrics_port)
    key = "network3_requests_total[('api', 'network3.v1.DigitClassifier'), ('code', '{}'), ('method', 'Classify')]"
    assert after[key.format("OK")] - before.get(key.format("OK"), 0) == 1
    assert after[key.format("INVALID_ARGUMENT")] - before.get(key.format("INVALID_ARGUMENT"), 0) == 1
    fail = "network3_request_failures_total[('api', 'network3.v1.DigitClassifier'), ('code', 'INVALID_ARGUMENT'), ('method', 'Classify')]"
    assert after[fail] == after[key.format("INVALID_ARGUMENT")]
    assert after["network3_batch_size_count[]"] - before["network3_batch_size_count[]"] == 1
    assert after["network3_queue_depth[]"] == 0
    for name in ("network3_request_duration_seconds_count", "network3_compute_duration_seconds_count",
                 "network3_queue_duration_seconds_count"):
        assert any(k.startswith(name) for k in after), name


def test_concurrent_requests_are_batched(onnx_model, digits):
    pixels, labels = digits
    with thread_server(onnx_model, metrics_port=0, batcher={"max_queue_delay_us": 200_000}) as s, s.channel() as ch:
        classify, _ = stubs(ch)
        futures = [classify.Classify.future(raw(pixels[i:i + 1]), timeout=T) for i in range(12)]
        got = [f.result().predictions[0].digit for f in futures]
        m = metrics(s.server.metrics_port)
    assert got == list(labels[:12])
    assert m["network3_batch_size_sum[]"] == 12
    assert m["network3_batch_size_count[]"] < 12  # fewer batches than requests: they were batched


def test_queue_full_and_deadline_expiry(onnx_model, digits):
    pixels, labels = digits
    opts = {"max_queue_delay_us": 600_000, "max_queue_size": 64, "alone_min": 0}  # every request queues
    with thread_server(onnx_model, batcher=opts) as s, s.channel() as ch:
        classify, _ = stubs(ch)
        batcher = s.server.serving.batcher
        waiting = classify.Classify.future(raw(pixels[:40]), timeout=T)
        _wait_until(lambda: batcher.queued_images == 40)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            classify.Classify(raw(pixels[:40]), timeout=T)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in e.value.details()
        assert time.monotonic() - t0 < 0.5  # refused at once, not after the queue delay
        assert [p.digit for p in waiting.result().predictions] == [p.digit for p in classify.Classify(raw(pixels[:40]), timeout=T).predictions]
        # A request whose deadline passes while it waits is dropped before compute.
        computed = s.stats.inference_count()
        with pytest.raises(grpc.RpcError) as e:
            classify.Classify(raw(pixels[:5]), timeout=0.2)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait_until(lambda: sum(s.stats.dropped.values()) == 1)
        assert s.stats.inference_count() == computed
        assert classify.Classify(raw(pixels[:3]), timeout=T).predictions[2].digit == labels[2]


def test_large_request_is_split_across_batches(onnx_model, digits, reference):
    pixels, labels = digits
    with thread_server(onnx_model, batcher={"max_batch_size": 16}) as s, s.channel() as ch:
        classify, _ = stubs(ch)
        response = classify.Classify(raw(pixels[:50]), timeout=T)
    np.testing.assert_allclose([p.probabilities for p in response.predictions],
                               reference.predict(pixels_to_input(pixels[:50]))[1], rtol=1e-5, atol=1e-6)
    assert {size: b[0] for size, b in s.stats.batches.items()} == {16: 3, 2: 1}


def test_no_batching_mode_answers_the_same(onnx_model, digits):
    from serving.unbatched import Unbatched

    pixels, labels = digits
    with thread_server(onnx_model, batcher={"batching": False}) as s, s.channel() as ch:
        assert isinstance(s.server.serving.batcher, Unbatched)
        classify, infer = stubs(ch)
        got = [p.digit for p in classify.Classify(raw(pixels[:20]), timeout=T).predictions]
        config = infer.ModelConfig(v2.ModelConfigRequest(name="network3"), timeout=T).config
        assert s.stats.inference_count() >= 20 and s.stats.method(
            "network3.v1.DigitClassifier", "Classify").codes == {"OK": 1}
    assert got == list(labels[:20])
    assert not config.HasField("dynamic_batching")


class FailingOnce:
    """The served model, but the next predict raises (a broken kernel, an onnxruntime error)."""

    def __init__(self, model) -> None:
        self.model, self.failed = model, False

    def __getattr__(self, name):  # labels, sha256, ...: the real model's
        return getattr(self.model, name)

    def predict(self, x):
        if not self.failed:
            self.failed = True
            raise RuntimeError("simulated onnxruntime failure")
        return self.model.predict(x)


@pytest.mark.parametrize("batching", [True, False], ids=["batched", "unbatched"])
def test_a_model_failure_fails_that_request_and_the_server_keeps_serving(onnx_model, digits, batching):
    pixels, labels = digits
    with thread_server(onnx_model, batcher={"batching": batching}) as s, s.channel() as ch:
        runner = s.server.serving.batcher

        async def break_model():
            runner.model = FailingOnce(runner.model)

        s.call(break_model())
        classify, infer = stubs(ch)
        with pytest.raises(grpc.RpcError) as e:
            classify.Classify(raw(pixels[:3]), timeout=T)
        assert e.value.code() == grpc.StatusCode.INTERNAL and "the model failed" in e.value.details()
        assert [p.digit for p in classify.Classify(raw(pixels[:3]), timeout=T).predictions] == list(labels[:3])
        r = infer.ModelInfer(v2_request(pixels_to_input(pixels[:2])), timeout=T)
        assert list(np.frombuffer(r.raw_output_contents[1], np.float32).reshape(2, 10).argmax(1)) == list(labels[:2])
        assert s.stats.method("network3.v1.DigitClassifier", "Classify").codes == {"INTERNAL": 1, "OK": 1}
        assert s.stats.model_fail[0] == 1


def _wait_until(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


# ------------------------------------------------------------------------------ security --

def _tls_channel(s, pki, client_cert=True):
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.crt").read_bytes(),
        private_key=(pki / "client.key").read_bytes() if client_cert else None,
        certificate_chain=(pki / "client.crt").read_bytes() if client_cert else None)
    return grpc.secure_channel(s.address, creds)


def test_tls(onnx_model, pki, digits):
    pixels, labels = digits
    with thread_server(onnx_model, tls_cert=pki / "server.crt", tls_key=pki / "server.key") as s:
        with _tls_channel(s, pki, client_cert=False) as ch:
            assert stubs(ch)[0].Classify(raw(pixels[:1]), timeout=T).predictions[0].digit == labels[0]
        with s.channel() as plain:  # plain text to a TLS port fails
            with pytest.raises(grpc.RpcError) as e:
                stubs(plain)[0].Classify(raw(pixels[:1]), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_without_certificate(onnx_model, pki, digits):
    pixels, labels = digits
    with thread_server(onnx_model, tls_cert=pki / "server.crt", tls_key=pki / "server.key",
                       tls_client_ca=pki / "ca.crt") as s:
        with _tls_channel(s, pki, client_cert=False) as ch:
            with pytest.raises(grpc.RpcError) as e:
                stubs(ch)[0].Classify(raw(pixels[:1]), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with _tls_channel(s, pki, client_cert=True) as ch:
            assert stubs(ch)[0].Classify(raw(pixels[:1]), timeout=T).predictions[0].digit == labels[0]


def test_token(onnx_model, tmp_path, digits):
    pixels, labels = digits
    (tmp_path / "token").write_text("s3cret-token\n")
    with thread_server(onnx_model, token_file=tmp_path / "token") as s, s.channel() as ch:
        classify, infer = stubs(ch)
        calls = {
            "Classify": lambda md: classify.Classify(raw(pixels[:1]), timeout=T, metadata=md),
            "ClassifyStream": lambda md: list(classify.ClassifyStream(iter([raw(pixels[:1])]), timeout=T, metadata=md)),
            "ModelInfer": lambda md: infer.ModelInfer(v2_request(ZERO), timeout=T, metadata=md),
            "ModelMetadata": lambda md: infer.ModelMetadata(v2.ModelMetadataRequest(name="network3"), timeout=T, metadata=md),
        }
        for name, call in calls.items():
            for md in (None, [("authorization", "Bearer wrong")], [("authorization", "s3cret-token")]):
                with pytest.raises(grpc.RpcError) as e:
                    call(md)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, md)
            call([("authorization", "Bearer s3cret-token")])
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=T)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # health needs no token
        assert s.stats.method("network3.v1.DigitClassifier", "Classify").codes["UNAUTHENTICATED"] == 3


# ------------------------------------------------------------------ lifecycle (processes) --

def test_sigterm_drains_requests_in_flight(process_server, digits):
    pixels, labels = digits
    s = process_server("--max-queue-delay-us", "1500000", "--grace", "20", "--metrics-port", "0")
    metrics_port = int(s.wait_for_log(r"metrics on :(\d+)/metrics").group(1))
    with grpc.insecure_channel(s.address) as ch:
        classify, _ = stubs(ch)
        futures = [classify.Classify.future(raw(pixels[i:i + 2]), timeout=T) for i in range(0, 40, 2)]
        _wait_until(lambda: metrics(metrics_port)["network3_queue_depth[]"] == 40)
        s.signal(signal.SIGTERM)
        late = []  # calls racing the signal: each must be answered or refused, never lost
        for _ in range(200):
            try:
                late.append(classify.Classify(raw(pixels[:1]), timeout=T).predictions[0].digit)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
                break
            time.sleep(0.01)
        else:
            pytest.fail("the server kept accepting calls after SIGTERM")
        got = [p.digit for f in futures for p in f.result().predictions]
    assert len(got) == 40
    assert got == list(labels[:40])
    assert all(d == labels[0] for d in late)
    assert s.wait(30) == 0
    assert "draining" in s.log() and "stopped" in s.log()


def test_sighup_reloads_good_file_and_keeps_serving_on_bad_one(process_server, onnx_model, tmp_path, digits):
    import onnx

    pixels, labels = digits
    path = tmp_path / "served.onnx"
    shutil.copy(onnx_model, path)
    s = process_server(model=path)
    with grpc.insecure_channel(s.address) as ch:
        classify, _ = stubs(ch)
        first = classify.GetModelInfo(pb.GetModelInfoRequest(), timeout=T)
        # A good new file (same weights, one more metadata entry): it takes over.
        m = onnx.load(str(onnx_model))
        m.metadata_props.add(key="reload_marker", value="second")
        onnx.save(m, str(tmp_path / "new.onnx"))
        os.replace(tmp_path / "new.onnx", path)
        s.signal(signal.SIGHUP)
        _wait_until(lambda: classify.GetModelInfo(pb.GetModelInfoRequest(), timeout=T).sha256 != first.sha256)
        second = classify.GetModelInfo(pb.GetModelInfoRequest(), timeout=T)
        assert second.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert second.metadata["reload_marker"] == "second"
        assert second.loaded_at.ToNanoseconds() > first.loaded_at.ToNanoseconds()
        # A truncated file: the reload fails, the old model keeps serving.
        path.write_bytes(path.read_bytes()[:5000])
        s.signal(signal.SIGHUP)
        s.wait_for_log(r"reload failed, still serving sha256 " + second.sha256[:12])
        assert classify.GetModelInfo(pb.GetModelInfoRequest(), timeout=T).sha256 == second.sha256
        response = classify.Classify(raw(pixels[:10]), timeout=T)
        assert response.model_sha256 == second.sha256
        assert [p.digit for p in response.predictions] == list(labels[:10])


@pytest.mark.parametrize("content", [None, b"not an onnx file at all"])
def test_bad_model_file_exits_with_one_clear_line(tmp_path, content):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    r = subprocess.run([sys.executable, "-m", "serving.server", "--model", str(path), "--port", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(path) in lines[0], r.stderr
    assert "Traceback" not in r.stderr
