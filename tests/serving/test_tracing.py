"""OpenTelemetry traces (issue 17, serving/tracing.py): one span per gRPC call and HTTP request,
with the batcher's queue, batch and compute time, a child of the caller's trace; off, never
imported.  The spans are read with the SDK's InMemorySpanExporter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from fixtures_serving import ROOT, thread_server
from protos.inference import grpc_service_pb2 as v2
from protos.inference import grpc_service_pb2_grpc as v2_grpc
from protos.network3.v1 import classifier_pb2 as pb
from protos.network3.v1 import classifier_pb2_grpc as pb_grpc

pytest.importorskip("opentelemetry.sdk", reason="opentelemetry-sdk is not installed (the test extra has it)")
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from serving.tracing import Tracing  # noqa: E402

T = 30
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
OTEL_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "NETWORK3_OTEL_ENDPOINT")


@pytest.fixture(scope="module")
def traced(onnx_model):
    """A server whose spans go to an in-memory exporter: (server, exporter)."""
    exporter = InMemorySpanExporter()
    with thread_server(onnx_model) as s:
        s.server.serving.tracing = Tracing(exporter, batch=False)
        yield s, exporter


@pytest.fixture
def spans(traced):
    """The exporter, emptied; `spans()` waits for and returns what the calls since made."""
    server, exporter = traced
    exporter.clear()

    def finished(n: int = 1):
        deadline = time.monotonic() + 5
        while len(exporter.get_finished_spans()) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # and nothing more comes
        return exporter.get_finished_spans()

    return finished


def _classify(server, n=1, metadata=()):
    request = pb.ClassifyRequest(images=[pb.Image(pixels=bytes(784), id=f"d{i}") for i in range(n)])
    with server.channel() as channel:
        return pb_grpc.DigitClassifierStub(channel).Classify(request, timeout=T, metadata=metadata)


def _http_infer(server, n=1, headers=None, model="network3"):
    import http.client

    x = np.zeros((n, 1, 28, 28), np.float32)
    body = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=T)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body=body,
                     headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def _check_batch_attributes(span, images: int, stats, compute_before: float, queue_before: float) -> None:
    """The span carries the batcher's own numbers: the same seconds the metrics got."""
    a = span.attributes
    assert a["network3.model"] == "network3" and a["network3.images"] == images
    assert a["network3.batch_size"] == images and a["network3.batches"] == 1
    assert len(a["network3.model.sha256"]) == 64
    assert a["network3.compute_seconds"] == pytest.approx(stats.compute.sum - compute_before, rel=1e-9, abs=1e-12)
    assert a["network3.compute_seconds"] > 0
    assert a["network3.queue_seconds"] == pytest.approx(stats.queue.sum - queue_before, rel=1e-9, abs=1e-12)
    assert a["network3.queue_seconds"] >= 0
    assert (span.end_time - span.start_time) / 1e9 >= a["network3.compute_seconds"] + a["network3.queue_seconds"]


def test_a_grpc_call_makes_one_span_with_its_queue_batch_and_compute_time(traced, spans):
    server, _ = traced
    stats = server.stats
    compute, queue = stats.compute.sum, stats.queue.sum
    _classify(server, n=3)
    [span] = spans()
    assert span.name == "network3.v1.DigitClassifier/Classify" and span.kind == SpanKind.SERVER
    a = span.attributes
    assert (a["rpc.system"], a["rpc.service"], a["rpc.method"]) == ("grpc", "network3.v1.DigitClassifier", "Classify")
    assert a["rpc.grpc.status_code"] == 0 and span.status.status_code == StatusCode.UNSET
    _check_batch_attributes(span, 3, stats, compute, queue)
    assert span.parent is None  # no traceparent sent: a root span
    assert span.resource.attributes["service.name"] == "network3"


def test_an_http_request_makes_one_span_with_its_queue_batch_and_compute_time(traced, spans):
    server, _ = traced
    stats = server.stats
    compute, queue = stats.compute.sum, stats.queue.sum
    assert _http_infer(server, n=2) == 200
    [span] = spans()
    assert span.name == "POST /v2/models/{model}/infer" and span.kind == SpanKind.SERVER
    a = span.attributes
    assert a["http.request.method"] == "POST" and a["http.route"] == "/v2/models/{model}/infer"
    assert a["url.path"] == "/v2/models/network3/infer" and a["network3.route"] == "ModelInfer"
    assert a["http.response.status_code"] == 200 and span.status.status_code == StatusCode.UNSET
    _check_batch_attributes(span, 2, stats, compute, queue)


def test_a_traceparent_makes_the_span_a_child_of_the_callers_on_grpc(traced, spans):
    server, _ = traced
    with server.channel() as channel:
        v2_grpc.GRPCInferenceServiceStub(channel).ServerLive(v2.ServerLiveRequest(), timeout=T,
                                                             metadata=(("traceparent", TRACEPARENT),))
    [span] = spans()
    assert span.name == "inference.GRPCInferenceService/ServerLive"
    assert span.context.trace_id == int(TRACE_ID, 16)
    assert span.parent is not None and span.parent.is_remote and span.parent.span_id == int(PARENT_ID, 16)
    assert "network3.batches" not in span.attributes  # it never reached the model


def test_a_traceparent_makes_the_span_a_child_of_the_callers_on_http(traced, spans):
    server, _ = traced
    assert _http_infer(server, headers={"traceparent": TRACEPARENT}) == 200
    [span] = spans()
    assert span.context.trace_id == int(TRACE_ID, 16)
    assert span.parent is not None and span.parent.is_remote and span.parent.span_id == int(PARENT_ID, 16)


def test_a_failed_call_records_its_status(traced, spans):
    server, _ = traced
    with pytest.raises(grpc.RpcError) as e:
        _classify(server, n=0)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _http_infer(server, model="no-such-model") == 404
    grpc_span, http_span = sorted(spans(2), key=lambda s: "http.route" in s.attributes)
    assert grpc_span.name == "network3.v1.DigitClassifier/Classify"
    assert grpc_span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert grpc_span.status.status_code == StatusCode.ERROR and grpc_span.status.description == "INVALID_ARGUMENT"
    assert http_span.attributes["http.response.status_code"] == 404
    assert http_span.status.status_code == StatusCode.ERROR and http_span.status.description == "404"


def test_a_stream_is_one_span_over_all_its_messages_and_each_batch_counts_once(onnx_model):
    """A stream's messages wait together for a fuller batch (--max-queue-delay-us): the batch that
    took several of them is one batch and one compute time in the span, as in the metrics."""
    exporter = InMemorySpanExporter()
    with thread_server(onnx_model, http_port=None, batcher={"max_queue_delay_us": 500_000}) as s:
        s.server.serving.tracing = Tracing(exporter, batch=False)
        stats = s.stats
        executions, compute = stats.execution_count(), stats.compute.sum
        requests = [pb.ClassifyRequest(images=[pb.Image(pixels=bytes(784))] * n) for n in (1, 2, 3)]
        with s.channel() as channel:
            answers = list(pb_grpc.DigitClassifierStub(channel).ClassifyStream(iter(requests), timeout=T))
        assert len(answers) == 3
        [span] = exporter.get_finished_spans()
        executions = stats.execution_count() - executions
        assert executions < 3  # some messages shared a batch (they were sent within the delay)
        a = span.attributes
        assert span.name == "network3.v1.DigitClassifier/ClassifyStream" and a["network3.images"] == 6
        assert a["network3.batches"] == executions
        assert a["network3.compute_seconds"] == pytest.approx(stats.compute.sum - compute, rel=1e-9, abs=1e-12)


def test_a_stream_the_client_cancels_records_cancelled(onnx_model):
    """The client cancels while its request waits in the batcher's queue (a long queue delay
    holds it there): the stream's span ends CANCELLED.  (Cancelled while the server waits for
    its next request, grpc.aio may end the stream as if the client had closed it.)"""
    exporter = InMemorySpanExporter()
    with thread_server(onnx_model, batcher={"max_queue_delay_us": 10_000_000}) as server:
        server.server.serving.tracing = Tracing(exporter, batch=False)
        more = threading.Event()

        def requests():
            yield pb.ClassifyRequest(images=[pb.Image(pixels=bytes(784))])
            more.wait(T)  # the stream stays open until the client cancels it

        with server.channel() as channel:
            call = pb_grpc.DigitClassifierStub(channel).ClassifyStream(requests(), timeout=T)
            deadline = time.monotonic() + T
            while server.server.serving.batcher.queued_images != 1:
                assert time.monotonic() < deadline, "the request never reached the queue"
                time.sleep(0.01)
            call.cancel()
            more.set()
        while not exporter.get_finished_spans():
            assert time.monotonic() < deadline, "no span"
            time.sleep(0.01)
    [span] = exporter.get_finished_spans()
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert span.attributes["network3.images"] == 1 and span.status.status_code == StatusCode.ERROR


def test_without_batching_the_span_has_the_same_timings(onnx_model):
    """--no-batching (serving.unbatched) reports to the span as the batcher does."""
    exporter = InMemorySpanExporter()
    with thread_server(onnx_model, http_port=None, batcher={"batching": False}) as s:
        s.server.serving.tracing = Tracing(exporter, batch=False)
        compute = s.stats.compute.sum
        _classify(s, n=2)
        [span] = exporter.get_finished_spans()
        a = span.attributes
        assert a["network3.batch_size"] == 2 and a["network3.batches"] == 1 and a["network3.queue_seconds"] >= 0
        assert a["network3.compute_seconds"] == pytest.approx(s.stats.compute.sum - compute, rel=1e-9, abs=1e-12)


def test_tracing_is_on_with_an_endpoint_or_the_standard_variable(onnx_model, monkeypatch):
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with thread_server(onnx_model, http_port=None) as s:
        assert s.server.serving.tracing is None
    # Nothing listens on port 9 (discard): no span is made, so nothing is sent at stop.
    with thread_server(onnx_model, http_port=None, otel_endpoint="http://127.0.0.1:9") as s:
        assert s.server.serving.tracing is not None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "digits")
    with thread_server(onnx_model, http_port=None) as s:
        tracing = s.server.serving.tracing
        assert tracing is not None and tracing.provider.resource.attributes["service.name"] == "digits"


def test_spans_reach_an_otlp_collector_as_children_of_the_callers(onnx_model, monkeypatch):
    """The real exporter, end to end: --otel-endpoint to a stand-in OTLP/gRPC collector, the
    batch processor told by the standard OTEL_BSP_SCHEDULE_DELAY to send every 50 ms."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts, trace_service_pb2_grpc as ts_grpc

    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    received = []

    class Collector(ts_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.append(request)
            return ts.ExportTraceServiceResponse()

    collector = grpc.server(ThreadPoolExecutor(2))
    ts_grpc.add_TraceServiceServicer_to_server(Collector(), collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    try:
        with thread_server(onnx_model, otel_endpoint=f"http://127.0.0.1:{port}") as s:
            _classify(s, metadata=(("traceparent", TRACEPARENT),))
            assert _http_infer(s) == 200
            deadline = time.monotonic() + T
            while sum(len(ss.spans) for r in received for rs in r.resource_spans for ss in rs.scope_spans) < 2:
                assert time.monotonic() < deadline, "the collector got no spans"
                time.sleep(0.02)
    finally:
        collector.stop(None)
    resources = [rs for r in received for rs in r.resource_spans]
    assert {a.key: a.value.string_value for a in resources[0].resource.attributes}["service.name"] == "network3"
    spans = {span.name: span for rs in resources for ss in rs.scope_spans for span in ss.spans}
    assert sorted(spans) == ["POST /v2/models/{model}/infer", "network3.v1.DigitClassifier/Classify"]
    grpc_span = spans["network3.v1.DigitClassifier/Classify"]
    assert grpc_span.trace_id == bytes.fromhex(TRACE_ID) and grpc_span.parent_span_id == bytes.fromhex(PARENT_ID)
    assert spans["POST /v2/models/{model}/infer"].parent_span_id == b""  # no traceparent: a root span
    for span in spans.values():
        attributes = {a.key: a.value for a in span.attributes}
        assert attributes["network3.images"].int_value == 1 and attributes["network3.compute_seconds"].double_value > 0


OFF = textwrap.dedent("""
    import asyncio, json, sys, urllib.request
    from pathlib import Path
    import grpc
    from protos.network3.v1 import classifier_pb2 as pb, classifier_pb2_grpc as pb_grpc
    from serving.server import Network3Server, ServerOptions

    async def main():
        s = Network3Server(ServerOptions(model=Path(sys.argv[1]), port=0, http_port=0, access_log=False))
        await s.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") as channel:
            await pb_grpc.DigitClassifierStub(channel).Classify(pb.ClassifyRequest(images=[pb.Image(pixels=bytes(784))]))
        body = json.dumps({"inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                       "data": [0.0] * 784}]}).encode()
        url = f"http://127.0.0.1:{s.http_port}/v2/models/network3/infer"
        status = (await asyncio.to_thread(urllib.request.urlopen, url, body)).status
        traced = s.serving.tracing
        await s.stop(grace=1)
        print(json.dumps({"status": status, "tracing": traced is not None,
                          "otel": sorted(m for m in sys.modules if m.startswith("opentelemetry"))}))

    asyncio.run(main())
""")


def test_with_tracing_off_the_server_never_imports_opentelemetry(onnx_model):
    env = {k: v for k, v in os.environ.items() if k not in OTEL_VARIABLES}
    r = subprocess.run([sys.executable, "-c", OFF, str(onnx_model)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"status": 200, "tracing": False, "otel": []}


def test_tracing_on_without_the_packages_is_one_line_naming_the_extra(onnx_model):
    """NETWORK3_OTEL_ENDPOINT (the option's variable) turns it on; opentelemetry is hidden."""
    hide = "import sys; sys.modules['opentelemetry'] = None; from serving.server import serve_command; serve_command()"
    env = {**{k: v for k, v in os.environ.items() if k not in OTEL_VARIABLES},
           "NETWORK3_OTEL_ENDPOINT": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, "-c", hide, "--model", str(onnx_model), "--port", "0", "--no-http"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "pip install 'network3[otel]'" in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
