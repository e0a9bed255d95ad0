"""What both servicers share: their settings, the RPC wrapper (errors, metrics, access log).

The wrapper is the one place a domain error becomes a gRPC status (via errors.grpc_status),
and where every RPC is counted and logged, so the servicers only convert protos and arrays.
"""
from __future__ import annotations

import asyncio
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

from ..batcher import DynamicBatcher
from ..errors import InvalidInput, Network3Error, Unavailable, grpc_status
from ..metrics import MethodStats, Stats

log = logging.getLogger("network3.server")
now = time.perf_counter

MODEL_NAME = "network3"
MODEL_VERSION = "1"


@dataclass
class Limits:
    max_images_per_request: int = 1024
    max_pixels: int = 40_000_000  # per decoded image, width * height (decompression bombs)
    max_message_bytes: int = 64 * 1024 * 1024  # gRPC messages, both directions


@dataclass
class Serving:
    """Everything a servicer needs.  The current model is `batcher.model` (swapped on reload)."""

    batcher: DynamicBatcher
    stats: Stats
    limits: Limits = field(default_factory=Limits)
    model_name: str = MODEL_NAME
    model_version: str = MODEL_VERSION
    access: "AccessLog | None" = None
    draining: bool = False  # set on SIGTERM: new calls get UNAVAILABLE, calls in flight finish
    inflight: int = 0  # RPCs inside a wrapper now (the drain waits for 0)
    decode_pool: Executor = field(default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="network3-decode"))
    is_ready: Callable[[], bool] = lambda: True

    @property
    def model(self):
        return self.batcher.model


def deadline_of(context) -> float | None:
    """The RPC's deadline on the time.perf_counter() clock, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else now() + remaining


# ------------------------------------------------------------------------------ access log --

_SAFE_ID = re.compile(r"[\w.:/+=@#-]{1,128}", re.ASCII)
_UNSAFE_ID = re.compile(r"[^\w.:/+=@#-]", re.ASCII)


class AccessLog:
    """One line per RPC: `<time> access id=.. method=.. code=.. images=.. ms=..`.

    Lines are buffered and written every `flush_s` seconds (and on close): a logging call per
    request costs ~9 us, a sizeable part of a 1-image request; an f-string into a list ~1 us.
    """

    def __init__(self, stream=None, flush_s: float = 0.25) -> None:
        self.stream = stream or sys.stderr
        self.flush_s = flush_s
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}-"
        self._second, self._stamp = -1, ""

    def new_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    def write(self, rid: str, method: str, code: str, images: int, seconds: float) -> None:
        if not _SAFE_ID.fullmatch(rid):
            # Ids come from clients (the v2 `id`, x-request-id): a newline or a space in one
            # must not forge a line or a field.
            rid = _UNSAFE_ID.sub("_", rid[:128])
        t = time.time()
        second = int(t)
        if second != self._second:  # strftime once a second, not once a line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self._lines.append(f"{self._stamp}.{int((t - second) * 1000):03d}Z access id={rid} method={method} "
                           f"code={code} images={images} ms={seconds * 1000:.3f}\n")
        if self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self.flush_s, self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._timer = None
        if self._lines:
            lines, self._lines = self._lines, []
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed or broken log stream must not take the server down


# ------------------------------------------------------------------------------- wrappers --

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


def _as_is(request):
    return request


def unary(serving: Serving, api: str, method: str, fn, count: Callable, model_call: bool = False, rid_of=None,
          parse: Callable = _as_is):
    """Wrap `async fn(request, context) -> response` as a grpc.aio unary handler.
    `parse` turns the raw request into the message (see parser)."""
    ms: MethodStats = serving.stats.method(api, method)
    access, stats = serving.access, serving.stats
    full = f"{api}.{method}"

    async def handler(raw, context):
        t0 = now()
        code = "OK"
        request = None
        serving.inflight += 1
        try:
            if serving.draining:
                raise Unavailable("server is shutting down: retry on another replica")
            request = parse(raw)
            return await fn(request, context)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as e:
            code, status, message = _outcome(e, context, full, method)
            if status is None:
                raise
            await context.abort(status, message)
        finally:
            serving.inflight -= 1
            dt = now() - t0
            try:
                images = count(request)
            except Exception:
                images = 0
            ms.record(code, images, dt)
            if model_call:
                stats.record_model_request(code == "OK", dt)
            if access is not None:
                # v2 requests carry their own id; ours may send x-request-id metadata.
                rid = ((rid_of(request) if request is not None else "") if rid_of else _request_id(context)) or access.new_id()
                access.write(rid, full, code, images, dt)

    return handler


def stream(serving: Serving, api: str, method: str, fn, parse: Callable = _as_is):
    """Wrap `async gen fn(request_iterator, context, tally)` as a grpc.aio stream-stream handler.

    `tally` is a [messages, images] list the generator updates; one access line per stream.
    A streamed message that does not `parse` ends the stream with INVALID_ARGUMENT.
    """
    ms: MethodStats = serving.stats.method(api, method)
    access = serving.access
    full = f"{api}.{method}"

    async def handler(request_iterator, context):
        t0 = now()
        code = "OK"
        tally = [0, 0]
        serving.inflight += 1
        try:
            if serving.draining:
                raise Unavailable("server is shutting down: retry on another replica")
            async for response in fn(_parsed(request_iterator, parse), context, tally):
                yield response
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            code = "CANCELLED"
            raise
        except Exception as e:
            code, status, message = _outcome(e, context, full, method)
            if status is None:
                raise
            await context.abort(status, message)
        finally:
            serving.inflight -= 1
            dt = now() - t0
            ms.record(code, tally[1], dt)
            if access is not None:
                access.write(_request_id(context) or access.new_id(), full, code, tally[1], dt)

    return handler


async def _parsed(request_iterator, parse):
    async for raw in request_iterator:
        yield parse(raw)


def _outcome(e: Exception, context, full: str, method: str) -> tuple[str, grpc.StatusCode | None, str]:
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
    return "INTERNAL", grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(e).__name__}"


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
