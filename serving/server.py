"""`network3 serve`: both gRPC APIs and HTTP/1.1 (the v2 REST API, /v1, the page) over one
batcher, in one event loop, with health, reflection, auth, TLS, limits, metrics, access log,
graceful drain (SIGTERM/SIGINT) and reload (SIGHUP: the model, the token and the TLS files).

This module only wires things together; the work is in model.py, batcher.py and api/.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
import grpc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.inference import grpc_service_pb2
from protos.network3.v1 import classifier_pb2

from . import tracing
from .api.classifier import API as CLASSIFIER_API, ClassifierServicer
from .api.common import AccessLog, Limits, Serving
from .api.http import build_app
from .api.inference import API as INFERENCE_API, InferenceServicer
from .batcher import BatcherOptions, DynamicBatcher
from .contract import MODEL_NAME
from .credentials import CredentialError, Tls, Token
from .errors import BadModel
from .metrics import Stats, start_metrics_server
from .model import ModelOptions, load_model
from .unbatched import Unbatched
from .watch import watch, watched_files
from .workers import LOG_FORMAT, WorkersFailed, cpu_count, host_port, supervise

log = logging.getLogger("network3.server")

SERVICES = (CLASSIFIER_API, INFERENCE_API)
# Health and reflection stay open without a token: load balancers and grpcurl need them.
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass
class ServerOptions:
    model: Path
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int | None = 8000  # None: no HTTP
    model_name: str = MODEL_NAME
    batcher: BatcherOptions = field(default_factory=BatcherOptions)
    limits: Limits = field(default_factory=Limits)
    model_options: ModelOptions = field(default_factory=ModelOptions)
    grace: float = 10.0
    metrics_port: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    token_file: Path | None = None
    access_log: bool = True
    # HTTP: a connection that has not sent a whole request (an idle keep-alive one, or a slow
    # client still dribbling its headers) is closed this many seconds after it opened or after
    # its last answer (aiohttp's keepalive_timeout; its default is an hour).
    http_idle_timeout: float = 75.0
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the HTTP API (none: CORS off)
    # Reload (as SIGHUP does) when the model, token or TLS files change on disk, checked this
    # often (0: only on SIGHUP).  Kubernetes updates a mounted Secret's files in place and sends
    # no signal; a stat of five files is all a check costs.
    watch_interval: float = 0.0
    # Worker processes sharing the ports (SO_REUSEPORT), each with its own batcher and session,
    # supervised by one parent (serving/workers.py).  1: this process serves, as it always has.
    workers: int = 1
    # With workers and metrics: where each worker writes its counters for the parent's /metrics
    # (None: a new temporary folder).  Must be writable (the image's root filesystem is not).
    metrics_dir: Path | None = None
    otel_endpoint: str | None = None  # OTLP/gRPC collector for traces (serving.tracing; also the OTEL_* variables)


class _ProtocolLog(logging.LoggerAdapter):
    """aiohttp's connection-level log (the server's `logger`): a request it cannot parse (a bad
    request line, header or chunk size, a lying Content-Length: the client's fault, answered
    400 by aiohttp before any handler runs) is one line at INFO, not an ERROR with a traceback
    that any client could fill the log with."""

    def exception(self, msg, *args, exc_info=True, **kwargs):
        # RequestPayloadError: a body that cannot be read (bad gzip), met again while aiohttp
        # reads and drops what is left of it after the answer.
        if isinstance(exc_info, (HttpProcessingError, RequestPayloadError, ConnectionError)):
            why = " ".join(str(exc_info).split())[:300]
            self.info(f"{msg}: %s: %s", *args, type(exc_info).__name__, why)
        else:
            self.error(msg, *args, exc_info=exc_info, **kwargs)


class StartupError(Exception):
    """The server cannot start as configured (an address it cannot bind); one clear line."""


class TokenAuth(grpc.aio.ServerInterceptor):
    """`authorization: Bearer <token>` on every call but health and reflection."""

    def __init__(self, token: Token, stats: Stats, access: AccessLog | None = None) -> None:
        self._token = token
        self._stats = stats
        self._access = access

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_METHODS):
            return await continuation(details)
        got = b""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
        if self._token.matches(got):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        _, _, rest = details.method.partition("/")
        api, _, method = rest.partition("/")
        self._stats.method(api, method).record("UNAUTHENTICATED", 0, 0.0)
        if self._access is not None:
            self._access.write(None, f"{api}.{method}", "UNAUTHENTICATED", 0, 0.0)
        return _refuse(handler, "missing or wrong token: send `authorization: Bearer <token>`" if got
                       else "missing token: send `authorization: Bearer <token>`")


# The grpc handler factory for each (request streaming, response streaming).
HANDLER_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
                 (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


def _refuse(handler, message: str):
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED without reading."""
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (makes this an async generator)

    kind = (handler.request_streaming, handler.response_streaming)
    return HANDLER_KINDS[kind](streaming if kind[1] else unary)


def _serialize(response) -> bytes:
    # ModelInfer's answers come serialized already (codec.response: the per-request cost).
    return response if type(response) is bytes else response.SerializeToString()


def add_service(server, service, servicer) -> None:
    """Register `servicer`'s methods for `service` (a protobuf ServiceDescriptor), as the
    generated `add_*_to_server` does but with the requests left as bytes (no deserializer) for
    our wrapper to parse (api.common.parser): grpc's own deserializer answers a message that
    does not parse with UNKNOWN (INTERNAL in a stream), uncounted; ours, INVALID_ARGUMENT."""
    handlers = {m.name: HANDLER_KINDS[m.client_streaming, m.server_streaming](
                    getattr(servicer, m.name), request_deserializer=None, response_serializer=_serialize)
                for m in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class Network3Server:
    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.stats = Stats()
        self.port: int | None = None
        self.http_port: int | None = None
        self.draining = False
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._metrics = None
        self._http: web.AppRunner | None = None
        self._stopped = asyncio.Event()
        self._reloading = False
        self.serving: Serving | None = None
        self._token: Token | None = None
        self._tls: Tls | None = None
        self._watcher: asyncio.Task | None = None

    async def start(self) -> int:
        o = self.options
        loop = asyncio.get_running_loop()
        try:
            traces = tracing.start(o.otel_endpoint) if tracing.configured(o.otel_endpoint) else None
        except tracing.TracingUnavailable as e:
            raise StartupError(str(e)) from None
        model = await loop.run_in_executor(None, load_model, o.model, o.model_options)
        batcher = (DynamicBatcher if o.batcher.batching else Unbatched)(model, o.batcher, self.stats)
        access = AccessLog(pid=o.workers > 1) if o.access_log else None
        self.serving = Serving(batcher=batcher, stats=self.stats, limits=o.limits, model_name=o.model_name,
                               access=access, is_ready=lambda: not self.draining and batcher.model.ready,
                               workers=o.workers, tracing=traces)
        self.stats.model_info = lambda: {"name": o.model_name, "sha256": batcher.model.sha256,
                                         "path": str(batcher.model.path), "loaded_at": batcher.model.loaded_at}
        interceptors = []
        if o.token_file is not None:
            self._token = Token(o.token_file)
            interceptors.append(TokenAuth(self._token, self.stats, access))
        if o.tls_cert or o.tls_key:
            if not (o.tls_cert and o.tls_key):
                raise CredentialError("TLS needs both --tls-cert and --tls-key")
            self._tls = Tls(o.tls_cert, o.tls_key, o.tls_client_ca)
        mb = o.limits.max_message_bytes
        server = grpc.aio.server(interceptors=interceptors or None, options=[
            ("grpc.max_receive_message_length", mb), ("grpc.max_send_message_length", mb),
            # A second server on a taken port must fail, not share it; workers share theirs
            # (the parent holds the port, so only its own workers can join: workers.py).
            ("grpc.so_reuseport", int(o.workers > 1)),
        ])
        add_service(server, classifier_pb2.DESCRIPTOR.services_by_name["DigitClassifier"], ClassifierServicer(self.serving))
        add_service(server, grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
                    InferenceServicer(self.serving))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = host_port(o.host, o.port)
        try:
            if self._tls is not None:
                self.port = server.add_secure_port(address, self._tls.grpc_credentials())
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as e:  # grpc: "Failed to bind to address"
            raise StartupError(f"cannot listen on {address}: {e}") from None
        if o.http_port is not None:
            try:
                await self._start_http()
            except BaseException:
                await server.stop(None)
                raise
        await server.start()
        self._server = server
        for name in ("", *SERVICES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if o.metrics_port is not None:
            self._metrics = start_metrics_server(self.stats, o.metrics_port, o.host)
        if o.watch_interval > 0:
            self._watcher = loop.create_task(watch(watched_files(o), o.watch_interval, self.reload))
        log.info("serving %s (sha256 %s, %s) as %r on %s%s%s%s", model.path, model.sha256[:12],
                 ",".join(model.providers), o.model_name, host_port(o.host, self.port), " with TLS" if o.tls_cert else "",
                 f", http on :{self.http_port}" if self.http_port is not None else "",
                 f", metrics on :{self._metrics.server_port}/metrics" if self._metrics else "")
        return self.port

    async def _start_http(self) -> None:
        """Bind the HTTP site on this loop (the same model, batcher, token, TLS and limits)."""
        o = self.options
        context = self._tls.http_context() if self._tls is not None else None
        runner = web.AppRunner(build_app(self.serving, self._token, o.cors_origins), handle_signals=False, access_log=None,
                               shutdown_timeout=1.0,  # stop() has already waited for requests in flight
                               keepalive_timeout=o.http_idle_timeout,
                               logger=_ProtocolLog(logging.getLogger("network3.http"), {}))
        await runner.setup()
        site = web.TCPSite(runner, o.host, o.http_port, ssl_context=context, reuse_port=o.workers > 1)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            reason = os.strerror(e.errno) if e.errno else str(e)  # asyncio's strerror repeats the address
            raise StartupError(f"cannot listen on http {host_port(o.host, o.http_port)}: {reason}") from None
        self._http = runner
        self.http_port = runner.addresses[0][1]

    @property
    def http_url(self) -> str | None:
        """The HTTP base URL, e.g. http://127.0.0.1:8000 (None: no HTTP)."""
        if self.http_port is None:
            return None
        return f"{'https' if self.options.tls_cert else 'http'}://{host_port(self.options.host, self.http_port)}"

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, refuse new calls, let calls in flight finish (up to grace)."""
        if self.draining:
            return
        self.draining = True
        if self._watcher is not None:
            self._watcher.cancel()
        grace = self.options.grace if grace is None else grace
        log.info("draining: refusing new calls, waiting up to %.1fs for calls in flight", grace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self._health.enter_graceful_shutdown()
        if self.serving is not None:
            # Our handlers answer new calls UNAVAILABLE, and HTTP requests 503 (clients retry
            # that; grpc's own refusal after server.stop() is CANCELLED) while the calls in
            # flight finish.
            self.serving.draining = True
            while self.serving.inflight and loop.time() < deadline:
                await asyncio.sleep(0.005)
        closing = []
        if self._server is not None:
            closing.append(self._server.stop(max(0.0, deadline - loop.time())))
        if self._http is not None:
            closing.append(self._http.cleanup())  # closes the site and its connections
        await asyncio.gather(*closing)
        if self.serving is not None:
            self.serving.batcher.close()
            if self.serving.access is not None:
                self.serving.access.flush()
            self.serving.decode_pool.shutdown(wait=False)
            if self.serving.tracing is not None:  # export the spans left
                await loop.run_in_executor(None, self.serving.tracing.shutdown)
        if self._metrics is not None:
            self._metrics.shutdown()
        log.info("stopped")
        self._stopped.set()

    @property
    def metrics_port(self) -> int | None:
        return self._metrics.server_port if self._metrics is not None else None

    async def wait(self) -> None:
        await self._stopped.wait()

    async def reload(self) -> bool:
        """SIGHUP: read the token file, the TLS files and the model file again.  Each is swapped
        only after it loaded (the token and TLS files checked, the model warmed up), each on its
        own: a bad file keeps the old one serving, with one ERROR line.  True if all reloaded."""
        if self._reloading or self.draining:
            log.warning("reload ignored: %s", "a reload is running" if self._reloading else "shutting down")
            return False
        self._reloading = True
        try:
            credentials = self.reload_credentials()
            return await self._reload_model() and credentials
        finally:
            self._reloading = False

    def reload_credentials(self) -> bool:
        ok = True
        if self._token is not None:
            try:
                changed = self._token.reload()
                log.info("reloaded token from %s%s", self._token.path, "" if changed else " (unchanged)")
            except Exception as e:  # never let a reload take the server down
                log.error("token reload failed, still accepting the old token: %s", _why(e))
                ok = False
        if self._tls is not None:
            old = self._tls.sha256
            try:
                new = self._tls.reload()
                log.info("reloaded TLS %s: certificate sha256 %s -> %s", self._tls.cert, old[:12], new[:12])
            except Exception as e:
                log.error("TLS reload failed, still serving certificate sha256 %s: %s", old[:12], _why(e))
                ok = False
        return ok

    async def _reload_model(self) -> bool:
        try:
            new = await self.load_model()
        except Exception as e:
            log.error("model reload failed, still serving sha256 %s: %s", self.serving.model.sha256[:12], _why(e))
            return False
        self.use_model(new)
        return True

    async def load_model(self):
        """The model file loaded and warmed up again, not yet served (raises on a bad file)."""
        return await asyncio.get_running_loop().run_in_executor(None, load_model, self.options.model,
                                                                 self.options.model_options)

    def use_model(self, new) -> None:
        old = self.serving.batcher.model
        self.serving.batcher.model = new  # batches already running finish on the old model
        log.info("reloaded %s: sha256 %s -> %s", new.path, old.sha256[:12], new.sha256[:12])


def _why(e: Exception) -> str:
    """A failed reload's reason: our own errors are one line already; others get their type."""
    return str(e) if isinstance(e, (BadModel, CredentialError)) else f"{type(e).__name__}: {e}"


async def serve(options: ServerOptions) -> int:
    """Run until SIGTERM/SIGINT (drain, exit 0).  SIGHUP reloads (Network3Server.reload)."""
    server = Network3Server(options)
    await server.start()
    # Everything allocated so far lives as long as the process: keep it out of the collector's
    # sight, so full collections under load stay short.
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    def spawn(coro) -> None:
        task = loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: (log.info("%s received", signal.Signals(s).name),
                                                    spawn(server.stop())))
    loop.add_signal_handler(signal.SIGHUP, lambda: (log.info("SIGHUP received: reloading"), spawn(server.reload())))
    if server.http_url is not None:
        print(f"network3 http on {server.http_url}", file=sys.stderr, flush=True)
    print(f"network3 serving on {host_port(options.host, server.port)}", file=sys.stderr, flush=True)
    await server.wait()
    return 0


# ------------------------------------------------------------------------------------ CLI --

# Every default below is read from the option dataclass it configures: written once, there.
B, L, M, S = BatcherOptions, Limits, ModelOptions, ServerOptions


class _CountOrAuto(click.ParamType):
    """A count (1 or more) or `auto`, which converts to 0 (the command works out what it means)."""

    def __init__(self, what: str) -> None:
        self.name, self.what = what.replace(" ", "-"), what

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        if str(value).strip().lower() == "auto":
            return 0
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            self.fail(f"{value!r} is not a number of {self.what} (1 or more) or auto", param, ctx)
        return n


@click.command("serve", context_settings={"max_content_width": 100, "show_default": True})
@click.option("--model", "model", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The ONNX file to serve (from `network3-train export`).")
@click.option("--host", default=S.host, help="Address to bind; loopback unless you say otherwise.")
@click.option("--port", default=S.port, type=click.IntRange(0, 65535), help="Port to bind (0: any free port).")
@click.option("--http-port", default=S.http_port, type=click.IntRange(0, 65535),
              help="HTTP/1.1 port: the v2 REST API, /v1 and the page (0: any free port).")
@click.option("--no-http", is_flag=True, help="Serve no HTTP, gRPC only.")
@click.option("--http-idle-timeout", default=S.http_idle_timeout, type=click.FloatRange(0, min_open=True),
              help="Close an HTTP connection that has not sent a whole request this many seconds after it opened "
                   "or after its last answer (idle keep-alive connections, slow clients).")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="A browser origin (e.g. https://app.example.com) allowed to call the HTTP API from its pages; "
                   "repeat for more.  Off unless given.")
@click.option("--model-name", default=S.model_name, help="The model's name on the v2 inference API.")
@click.option("--max-batch-size", default=B.max_batch_size, type=click.IntRange(1), help="Images per onnxruntime call at most.")
@click.option("--max-queue-delay-us", default=B.max_queue_delay_us, type=click.IntRange(0),
              help="Wait this long after the oldest queued request for a fuller batch (0: take what is queued, never wait).")
@click.option("--max-queue-size", default=B.max_queue_size, type=click.IntRange(1),
              help="Images allowed to wait; beyond it requests get RESOURCE_EXHAUSTED at once.")
@click.option("--instances", default=B.instances, type=click.IntRange(1), help="Batches computed in parallel (executor threads).")
@click.option("--batching/--no-batching", default=B.batching, help="--no-batching runs each request on its own (for comparison).")
@click.option("--inline-max-images", default=B.inline_max, type=click.IntRange(0),
              help="Batches up to this many images run on the event loop thread; larger ones in executor threads.")
@click.option("--alone-min-images", default=B.alone_min, type=click.IntRange(0),
              help="A request of at least this many images is a good batch already: it runs on its own in an executor "
                   "thread instead of waiting to be merged (0: merge every request).")
@click.option("--intra-op-threads", default=M.intra_op_threads, type=click.IntRange(0),
              help=f"onnxruntime threads per call of fewer than {M.wide_min} images (0: one per core).  1 leaves the other cores to "
                   "gRPC and other batches.")
@click.option("--wide-threads", default="auto", metavar="N|auto", type=_CountOrAuto("threads"),
              help=f"onnxruntime threads per call of {M.wide_min} images or more, a second session (auto: the CPUs this "
                   "process may use divided by --workers).")
@click.option("--max-message-bytes", default=L.max_message_bytes, type=click.IntRange(1024), help="gRPC message size limit, both directions.")
@click.option("--max-images-per-request", default=L.max_images_per_request, type=click.IntRange(1), help="More images in one request are refused.")
@click.option("--max-pixels", default=L.max_pixels, type=click.IntRange(1), help="Largest decoded image (width x height): no decompression bombs.")
@click.option("--grace", default=S.grace, type=click.FloatRange(0), help="On SIGTERM/SIGINT, seconds calls in flight get to finish.")
@click.option("--metrics-port", default=S.metrics_port, type=click.IntRange(0, 65535),
              help="Serve Prometheus metrics on this port at /metrics (off unless given).")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path),
              help="PEM certificate chain: serve TLS.  The TLS files are re-read on SIGHUP.")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), help="PEM private key for --tls-cert.")
@click.option("--tls-client-ca", type=click.Path(dir_okay=False, path_type=Path),
              help="PEM CA bundle: require client certificates signed by it (mutual TLS).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding a token every call must send as `authorization: Bearer <token>` (gRPC metadata or HTTP "
                   "header); not needed for health, reflection, /v2/health/* and the page.  Re-read on SIGHUP.")
@click.option("--watch-interval", default=S.watch_interval, type=click.FloatRange(0),
              help="Every this many seconds, check whether the model, token or TLS files changed on disk, and "
                   "reload as SIGHUP does when one did (Kubernetes updates a mounted Secret's files and sends no "
                   "signal).  0: reload only on SIGHUP.")
@click.option("--workers", default=str(S.workers), metavar="N|auto", type=_CountOrAuto("workers"),
              help="Worker processes sharing the ports, each with its own batcher and onnxruntime session, under "
                   "one parent that replaces a worker that dies and passes on SIGTERM and SIGHUP (auto: one per "
                   "CPU this process may use: its CPU affinity, within its cgroup's CPU quota).  Each worker computes with "
                   "--intra-op-threads and --wide-threads threads: keep workers x threads at most the cores.")
@click.option("--metrics-dir", type=click.Path(file_okay=False, path_type=Path),
              help="With --workers and --metrics-port: the folder where each worker leaves its counters for the "
                   "parent's /metrics (a writable mount, e.g. an emptyDir; default: a new temporary folder).")
@click.option("--access-log/--no-access-log", default=S.access_log, help="One line per RPC or HTTP request on stderr: id, method, status, images, latency.")
@click.option("--otel-endpoint",
              help="Send OpenTelemetry traces (a span per request, with its queue, batch and compute time) over OTLP/gRPC "
                   "to this collector, e.g. http://localhost:4317.  Off unless given or OTEL_EXPORTER_OTLP_ENDPOINT is set; "
                   "the other OTEL_* variables apply (OTEL_TRACES_SAMPLER to sample).  Needs `pip install 'network3[otel]'`.")
@click.option("--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Log level of the server's own messages.")
def serve_command(model, host, port, http_port, no_http, http_idle_timeout, cors_origins, model_name, max_batch_size, max_queue_delay_us, max_queue_size, instances,
                  batching, inline_max_images, alone_min_images, intra_op_threads, wide_threads, max_message_bytes, max_images_per_request, max_pixels,
                  grace, metrics_port, tls_cert, tls_key, tls_client_ca, token_file, watch_interval, workers, metrics_dir, access_log,
                  otel_endpoint, log_level):
    """Serve an ONNX model over gRPC (network3.v1.DigitClassifier and the Triton/KServe v2 API) and
    HTTP (the v2 REST API, /v1 and a page)."""
    workers = workers or cpu_count()
    wide_threads = wide_threads or max(1, cpu_count() // workers)
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format=LOG_FORMAT if workers > 1 else "%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if tls_client_ca and not tls_cert:
        raise click.UsageError("--tls-client-ca needs --tls-cert and --tls-key")
    options = ServerOptions(
        model=model, host=host, port=port, http_port=None if no_http else http_port, model_name=model_name,
        batcher=BatcherOptions(max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                               max_queue_size=max_queue_size, instances=instances, batching=batching,
                               inline_max=inline_max_images, alone_min=alone_min_images),
        limits=Limits(max_images_per_request=max_images_per_request, max_pixels=max_pixels,
                      max_message_bytes=max_message_bytes),
        model_options=ModelOptions(intra_op_threads=intra_op_threads, wide_threads=wide_threads),
        grace=grace, metrics_port=metrics_port, tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca,
        token_file=token_file, access_log=access_log, http_idle_timeout=http_idle_timeout,
        cors_origins=tuple(cors_origins), watch_interval=watch_interval, workers=workers, metrics_dir=metrics_dir,
        otel_endpoint=otel_endpoint,
    )
    try:
        code = asyncio.run(serve(options) if workers == 1 else supervise(options, Network3Server))
    except (BadModel, CredentialError, StartupError, WorkersFailed) as e:  # missing/corrupt model, bad TLS or token file, port taken: one line
        raise click.ClickException(str(e)) from None
    sys.exit(code)


def _envvars(command: click.Command) -> None:
    """Every serve option can also be set by NETWORK3_<OPTION> (`--http-port`: NETWORK3_HTTP_PORT),
    as containers are configured; an option on the command line wins over its variable."""
    for p in command.params:
        if isinstance(p, click.Option):
            p.envvar = "NETWORK3_" + max(p.opts, key=len).lstrip("-").replace("-", "_").upper()
            p.show_envvar = True


_envvars(serve_command)

if __name__ == "__main__":
    serve_command()
