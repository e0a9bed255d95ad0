"""What the servicers and the HTTP adapter share: their settings (Serving, Limits), the access
log, and the one RPC wrapper, `rpc` (errors, metrics, access log).

The wrapper is the one place a domain error becomes a gRPC status (via errors.grpc_status),
and where every RPC is counted and logged, so the servicers only convert protos and arrays.
HTTP's counterpart of the wrapper is the middlewares in api/http.py (errors.http_status).
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import os
import re
import sys
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import grpc
from aiohttp import web

from ..contract import MAX_IMAGES_PER_REQUEST, MAX_MESSAGE_BYTES, MAX_PIXELS, MODEL_NAME, MODEL_VERSION
from ..errors import InvalidInput, Network3Error, Unavailable, grpc_status
from ..metrics import Stats

log = logging.getLogger("network3.server")
now = time.perf_counter


@dataclass
class Limits:
    max_images_per_request: int = MAX_IMAGES_PER_REQUEST
    max_pixels: int = MAX_PIXELS  # per decoded image, width * height (decompression bombs)
    max_message_bytes: int = MAX_MESSAGE_BYTES  # gRPC messages, both directions


@dataclass
class Serving:
    """Everything a servicer needs.  The current model is `batcher.model` (swapped on reload).
    `batcher` is a batcher.DynamicBatcher or, with --no-batching, an unbatched.Unbatched."""

    batcher: object
    stats: Stats
    limits: Limits = field(default_factory=Limits)
    model_name: str = MODEL_NAME
    model_version: str = MODEL_VERSION
    access: "AccessLog | None" = None
    draining: bool = False  # set on SIGTERM: new calls get UNAVAILABLE (HTTP 503), calls in flight finish
    inflight: int = 0  # RPCs inside a wrapper and HTTP requests inside the middlewares now (the drain waits for 0)
    decode_pool: Executor = field(default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="network3-decode"))
    is_ready: Callable[[], bool] = lambda: True
    workers: int = 1  # worker processes of this server (serve --workers): the counters here are this one's
    tracing: "object | None" = None  # a serving.tracing.Tracing when traces are on (--otel-endpoint), else None

    @property
    def model(self):
        return self.batcher.model


# Keys of aiohttp's per-request storage, read by the HTTP middlewares (api/http.py): a handler
# stores the number of images its request carried under IMAGES (metrics, access log); the
# middlewares store the request id under REQUEST_ID_KEY.
IMAGES = web.RequestKey("images", int)
REQUEST_ID_KEY = web.RequestKey("request_id", str)


def deadline_of(context) -> float | None:
    """The RPC's deadline on the time.perf_counter() clock, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else now() + remaining


# ------------------------------------------------------------------------------ access log --

_SAFE_ID = re.compile(r"[\w.:/+=@#-]{1,128}", re.ASCII)
_UNSAFE_ID = re.compile(r"[^\w.:/+=@#-]", re.ASCII)


def safe_id(rid: str) -> str:
    """A request id as the access log writes it (and HTTP echoes it): at most 128 characters,
    each unsafe one (a space, a newline: a forged field or line) replaced by `_`."""
    return rid if _SAFE_ID.fullmatch(rid) else _UNSAFE_ID.sub("_", rid[:128])


class AccessLog:
    """One line per RPC: `<time> access id=.. method=.. code=.. images=.. ms=..`; with `pid`
(serve --workers N > 1), `<time> access pid=<worker pid> id=..`.

    Lines are buffered and written every `flush_s` seconds (and on close): a logging call per
    request costs a sizeable part of a 1-image request, and so does formatting the line, which
    under load costs several times what it does alone (docs/results.md has the figures); so a
    request appends its fields as a tuple and the lines are formatted when they are written.
    """

    def __init__(self, stream=None, flush_s: float = 0.25, pid: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.flush_s = flush_s
        self._lines: list[tuple] = []
        self._timer: asyncio.TimerHandle | None = None
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}-"
        self._second, self._stamp = -1, ""
        self._access = f"access pid={os.getpid()}" if pid else "access"

    def new_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    def write(self, rid: str | None, method: str, code: str, images: int, seconds: float) -> None:
        """`rid`: None for a new id (new_id's, given at flush), or a client's (the v2 `id`,
        x-request-id) made safe_id() by the caller: a newline or a space in one must not forge
        a line or a field."""
        self._lines.append((time.time(), rid, method, code, images, seconds))
        if self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self.flush_s, self.flush)
            except RuntimeError:
                self.flush()

    def _line(self, t: float, rid: str | None, method: str, code: str, images: int, seconds: float) -> str:
        second = int(t)
        if second != self._second:  # strftime once a second, not once a line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return (f"{self._stamp}.{int((t - second) * 1000):03d}Z {self._access} id={rid or self.new_id()} "
                f"method={method} code={code} images={images} ms={seconds * 1000:.3f}\n")

    def flush(self) -> None:
        self._timer = None
        if self._lines:
            lines, self._lines = self._lines, []
            try:
                self.stream.write("".join([self._line(*fields) for fields in lines]))
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed or broken log stream must not take the server down


# --------------------------------------------------------------------------------- the wrapper --

class Servicer:
    """Base of our servicers: `API` is the service's full name, `serving` what its methods use."""

    API = ""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving


def _request_id(context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return value[:128]
    return None


def parser(message_type) -> Callable:
    """raw request bytes -> a `message_type` message, or InvalidInput.

    The server registers our handlers without a deserializer (server.add_service), because grpc
    answers a message its own deserializer cannot parse (corrupt wire format, invalid UTF-8 in
    a string field) with UNKNOWN, or INTERNAL inside a stream, before any handler runs and
    without counting it.  A message passed in already parsed (in-process callers) is kept.
    """
    def parse(raw):
        if not isinstance(raw, bytes):
            return raw
        try:
            return message_type.FromString(raw)
        except Exception as e:  # protobuf's DecodeError; any failure to parse is the sender's
            raise InvalidInput(f"request: {e}") from None

    return parse


def _no_images(servicer, request) -> int:
    return 0


def rpc(request_type, *, images: Callable = _no_images, model_call: bool = False, request_id: Callable | None = None):
    """The one wrapper of every RPC method of our servicers, unary and streaming alike:

        @rpc(pb.ModelInferRequest, images=..., model_call=True, request_id=lambda r: r.id)
        async def ModelInfer(self, request, context): ...

        @rpc(pb.ModelInferRequest, images=...)
        async def ModelStreamInfer(self, request_iterator, context): ...  # an async generator

    It parses the raw request bytes (see parser), refuses calls while draining, maps errors to
    statuses (_outcome), and records each RPC once: its status and latency in the metrics, a
    line in the access log and, with tracing on, a span (serving.tracing).
    `images(servicer, request)` counts a request's images (for a stream, summed over its
    messages); `model_call` also counts the RPC as a model request
    (v2 statistics); `request_id(request)` is the id the access log shows (default: the
    x-request-id metadata, else a new id).
    """
    parse = parser(request_type)

    def wrap(fn):
        method = fn.__name__

        full = ""  # "<service>.<method>", known at the first call (API is the servicer class's)

        if inspect.isasyncgenfunction(fn):
            @functools.wraps(fn)
            async def streaming(self, request_iterator, context):
                nonlocal full
                full = full or f"{self.API}.{method}"
                serving, t0, code, tally = self.serving, now(), "OK", [0]
                traced = serving.tracing.grpc(self.API, method, context) if serving.tracing is not None else None
                serving.inflight += 1
                try:
                    if serving.draining:
                        raise Unavailable(DRAINING)
                    async for response in fn(self, _parsed(request_iterator, parse, images, self, tally), context):
                        yield response
                except (asyncio.CancelledError, GeneratorExit):  # the client went away
                    code = "CANCELLED"
                    raise
                except Exception as e:
                    code, status, message = _outcome(e, context, full)
                    if status is None:
                        raise
                    await context.abort(status, message)
                finally:
                    serving.inflight -= 1
                    _record(serving, self.API, method, full, code, tally[0], now() - t0, False, context)
                    if traced is not None:
                        traced.end(code, tally[0], serving.model_name)

            return streaming

        @functools.wraps(fn)
        async def unary(self, raw, context):
            nonlocal full
            full = full or f"{self.API}.{method}"
            serving, t0, code, request = self.serving, now(), "OK", None
            traced = serving.tracing.grpc(self.API, method, context) if serving.tracing is not None else None
            serving.inflight += 1
            try:
                if serving.draining:
                    raise Unavailable(DRAINING)
                request = parse(raw)
                return await fn(self, request, context)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as e:
                code, status, message = _outcome(e, context, full)
                if status is None:  # an abort the handler made itself
                    raise
                await context.abort(status, message)
            finally:
                serving.inflight -= 1
                try:
                    n = images(self, request) if request is not None else 0
                except Exception:
                    n = 0
                _record(serving, self.API, method, full, code, n, now() - t0, model_call, context, request, request_id)
                if traced is not None:
                    traced.end(code, n, serving.model_name)

        return unary

    return wrap


# New calls while the server drains (SIGTERM) get UNAVAILABLE, so that clients retry elsewhere.
DRAINING = "server is shutting down: retry on another replica"


def _record(serving: Serving, api: str, method: str, full: str, code: str, images: int, seconds: float,
            model_call: bool, context, request=None, request_id: Callable | None = None) -> None:
    """An RPC ended: count it, and write its access line (`full`: "<api>.<method>")."""
    serving.stats.method(api, method).record(code, images, seconds)
    if model_call:
        serving.stats.record_model_request(code == "OK", seconds)
    access = serving.access
    if access is not None:
        if request_id is not None:  # v2 requests carry their own id
            rid = request_id(request) if request is not None else None
        else:  # ours may send x-request-id metadata
            rid = _request_id(context)
        access.write(safe_id(rid) if rid else None, full, code, images, seconds)


async def _parsed(request_iterator, parse, images, servicer, tally):
    async for raw in request_iterator:
        request = parse(raw)
        try:
            tally[0] += images(servicer, request)
        except Exception:
            pass
        yield request


def _outcome(e: Exception, context, full: str) -> tuple[str, grpc.StatusCode | None, str]:
    """The status a failed RPC ends with: (code name, status to abort with or None to re-raise, message).

    Domain errors map through `errors.grpc_status`; an abort the handler made itself passes
    through; anything else is a bug, logged with its traceback and answered INTERNAL.
    """
    if isinstance(e, Network3Error):
        status, message = grpc_status(e)
        return status.name, status, message
    if isinstance(e, grpc.aio.AbortError):
        return _code_name(context), None, ""
    log.exception("%s failed", full)
    return "INTERNAL", grpc.StatusCode.INTERNAL, f"internal error in {full.rpartition('.')[2]}: {type(e).__name__}"


def _code_name(context) -> str:
    try:
        code = context.code()
        return code.name if code is not None else "UNKNOWN"
    except Exception:
        return "UNKNOWN"


async def pipelined(request_iterator, work, window: int = 32):
    """Run `await work(request)` for each streamed request, up to `window` at once; yield the
    results in request order.  Cancelling the consumer cancels the reader and all pending work.
    """
    slots = asyncio.Semaphore(window)
    pending: asyncio.Queue = asyncio.Queue()
    done = object()

    async def read():
        try:
            async for request in request_iterator:
                await slots.acquire()
                pending.put_nowait(asyncio.ensure_future(work(request)))
        finally:
            pending.put_nowait(done)

    reader = asyncio.ensure_future(read())
    try:
        while True:
            task = await pending.get()
            if task is done:
                break
            result = await task
            slots.release()
            yield result
        await reader  # surfaces an error the reader hit
    finally:
        reader.cancel()
        while not pending.empty():
            task = pending.get_nowait()
            if task is not done:
                task.cancel()
