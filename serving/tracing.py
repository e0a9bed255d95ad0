"""OpenTelemetry traces, optional: one SERVER span per gRPC call or HTTP request.

Off unless `--otel-endpoint` (NETWORK3_OTEL_ENDPOINT) or the standard
OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set (`configured`).  Off,
nothing here imports opentelemetry and the request path pays a None check in the rpc wrapper
and the HTTP middleware (`Serving.tracing`), and a ContextVar read and two None checks in the
batcher.
On, it needs the `otel` extra (`start` says so in one line when it is missing).

The interface, small on purpose:

    tracing = start(endpoint)                       # at server start; or Tracing(exporter) in tests
    call = tracing.grpc(api, method, context)       # the rpc wrapper, as a call starts
    call = tracing.http(request, route)             # the HTTP middleware, as a request starts
    call.end(code, images, model)                   # both, once, as it ends
    CURRENT.get()                                   # the batcher: the call under way, or None

A span is named `<service>/<method>` (gRPC) or `<HTTP method> <route>` (HTTP).  Its attributes:
the OpenTelemetry names (rpc.system, rpc.service, rpc.method, rpc.grpc.status_code; or
http.request.method, http.route, url.path, http.response.status_code, and network3.route, the
metrics' method), network3.model, network3.images, and once the call reached the batcher
network3.queue_seconds, network3.batch_size (the largest batch it ran in), network3.batches,
network3.compute_seconds (summed over them) and network3.model.sha256.  A call that failed
(metrics.failed: a status other than OK, an HTTP status of 400 or more) has status ERROR.

The batcher reports what it already measures for its metrics (the time a request waited in the
queue, the size and onnxruntime time of each batch it ran in) to the call in CURRENT, so the
span carries the same numbers as network3_queue_duration_seconds, network3_batch_size and
network3_compute_duration_seconds.  The caller's trace context (`traceparent`, `tracestate`:
gRPC metadata or HTTP headers) is read with the configured propagator (W3C trace context by
default; OTEL_PROPAGATORS), so the span is a child of the caller's.  The SDK reads the other
OTEL_* variables itself (sampler, resource attributes, exporter headers, TLS, timeouts, batch
processor).
"""
from __future__ import annotations

import logging
import os
import threading
from contextvars import ContextVar

from .metrics import failed

log = logging.getLogger("network3.server")

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
INSTALL = "pip install 'network3[otel]'"
SERVICE_NAME = "network3"
SHUTDOWN_S = 2.0  # at stop, the longest the spans left may take to export

# The call under way in this task (set by Tracing.grpc/http, read by the batcher), or None.
CURRENT: ContextVar["Call | None"] = ContextVar("network3_trace_call", default=None)


class TracingUnavailable(Exception):
    """Tracing was asked for but the OpenTelemetry packages are not installed."""


def configured(endpoint: str | None) -> bool:
    """Whether tracing is on: an --otel-endpoint, or the standard OTLP endpoint variables."""
    return bool(endpoint) or any(os.environ.get(name) for name in ENDPOINT_VARIABLES)


def start(endpoint: str | None) -> "Tracing":
    """Tracing that exports over OTLP/gRPC to `endpoint` (None: the OTEL_EXPORTER_OTLP_* variables)
    in batches from a background thread.  TracingUnavailable when the `otel` extra is missing."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as e:
        raise TracingUnavailable(f"tracing is on (--otel-endpoint or OTEL_EXPORTER_OTLP_ENDPOINT) but OpenTelemetry "
                                 f"is not installed (no module {e.name or e}): {INSTALL}") from None
    exporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
    log.info("tracing on: spans over OTLP/gRPC to %s",
             endpoint or next(os.environ[name] for name in ENDPOINT_VARIABLES if os.environ.get(name)))
    return Tracing(exporter)


class Tracing:
    """Spans of network3's calls, exported by `exporter` (batched in a background thread, or
    one at a time with batch=False, as tests want)."""

    def __init__(self, exporter, batch: bool = True) -> None:
        import grpc
        from opentelemetry import propagate, trace
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        from . import __version__

        # service.name network3 unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES say otherwise.
        attributes = {"service.name": SERVICE_NAME, "service.version": __version__,
                      **OTELResourceDetector().detect().attributes}
        # shutdown_on_exit=False: the server's stop shuts it down, bounded (an atexit shutdown is not).
        self.provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
        self._exporter = exporter
        self.provider.add_span_processor((BatchSpanProcessor if batch else SimpleSpanProcessor)(exporter))
        self._tracer = self.provider.get_tracer("network3", __version__)
        self._extract = propagate.extract
        self._server = trace.SpanKind.SERVER
        self._status = trace.Status
        self._error = trace.StatusCode.ERROR
        self._grpc_codes = {code.name: code.value[0] for code in grpc.StatusCode}

    def grpc(self, api: str, method: str, context) -> "Call":
        carrier = dict(context.invocation_metadata() or ())
        return self._begin(f"{api}/{method}", carrier, {"rpc.system": "grpc", "rpc.service": api, "rpc.method": method},
                           True)

    def http(self, request, route: str) -> "Call":
        resource = request.match_info.route.resource
        path = resource.canonical if resource is not None else None
        attributes = {"http.request.method": request.method, "url.path": request.path, "network3.route": route}
        if path is not None:
            attributes["http.route"] = path
        return self._begin(f"{request.method} {path or route}", request.headers, attributes, False)

    def _begin(self, name: str, carrier, attributes: dict, is_grpc: bool) -> "Call":
        span = self._tracer.start_span(name, context=self._extract(carrier), kind=self._server, attributes=attributes)
        call = Call(self, span, is_grpc)
        call._token = CURRENT.set(call)
        return call

    def shutdown(self, timeout: float = SHUTDOWN_S) -> None:
        """Export the spans left and stop (the server's stop), in at most `timeout` seconds: a
        collector that does not answer must not hold up the exit (the exporter retries for 10 s)."""
        worker = threading.Thread(target=self.provider.shutdown, name="network3-otel-shutdown", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            log.warning("tracing: the collector did not take the last spans within %.0f s; they are dropped", timeout)
            self._exporter.shutdown()  # ends its retries


class Call:
    """One traced call: its span, and what the batcher reported about it."""

    __slots__ = ("tracing", "span", "is_grpc", "queue", "compute", "batch_size", "batches", "model_sha256", "_batch",
                 "_token")

    def __init__(self, tracing: Tracing, span, is_grpc: bool) -> None:
        self.tracing, self.span, self.is_grpc = tracing, span, is_grpc
        self.queue: float | None = None  # None: never reached the batcher's queue
        self.compute = 0.0
        self.batch_size = self.batches = 0
        self.model_sha256 = None
        self._batch = None  # the last batch counted (held, so its id cannot be reused)
        self._token = None

    # -- from the batcher ---------------------------------------------------------------

    def queued(self, seconds: float) -> None:
        """A request of this call waited `seconds` in the queue before its (first) batch."""
        self.queue = seconds + (self.queue or 0.0)

    def computed(self, images: int, seconds: float, model, batch) -> None:
        """A batch of `images` images, with rows of this call, ran `seconds` in onnxruntime.
        `batch` is that batch's result: a batch that took several messages of one stream
        is counted once."""
        if batch is self._batch:
            return
        self._batch = batch
        self.compute += seconds
        self.batches += 1
        self.batch_size = max(self.batch_size, images)
        self.model_sha256 = model.sha256

    # -- from the rpc wrapper or the HTTP middleware ---------------------------------------

    def end(self, code: str, images: int, model: str) -> None:
        """The call ended with `code` (a gRPC status name, or an HTTP status as a string); a
        failure (metrics.failed) sets the span's status to ERROR."""
        if self._token is not None:
            try:
                CURRENT.reset(self._token)
            except ValueError:  # a stream's generator closed from another context: nothing to restore
                pass
            self._token = None
        span = self.span
        if not span.is_recording():  # not sampled (OTEL_TRACES_SAMPLER): nothing to add
            return
        attributes = {"network3.model": model, "network3.images": images}
        if self.is_grpc:
            attributes["rpc.grpc.status_code"] = self.tracing._grpc_codes.get(code, 2)  # 2: UNKNOWN
        else:
            attributes["http.response.status_code"] = int(code)
        if self.queue is not None:
            attributes["network3.queue_seconds"] = self.queue
        if self.batches:
            attributes.update({"network3.batch_size": self.batch_size, "network3.batches": self.batches,
                               "network3.compute_seconds": self.compute, "network3.model.sha256": self.model_sha256})
        span.set_attributes(attributes)
        if failed(code):
            span.set_status(self.tracing._status(self.tracing._error, code))
        span.end()

