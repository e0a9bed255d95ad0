"""The machinery under Client.classify_stream: a bounded window of requests on a ClassifyStream.

gRPC pulls requests from `Feed.requests()` in its own thread; the caller's thread takes one
token per item from the feed (in input order) and the answers from `Stream`.  A broken stream
is reopened and the unanswered requests are sent again; a watchdog bounds the wait for each
answer.  See Client.classify_stream for the contract.
"""
from __future__ import annotations

import collections
import random
import threading
import time
from typing import Iterator

import grpc

from protos.network3.v1 import classifier_pb2 as pb

from . import wire
from .errors import Overloaded
from .predictions import ClientError, Item, Prediction, _flat


END = object()  # next_token(): every item has been answered
IDLE_S = 0.25  # how often a caller waiting for its next item checks that the stream is alive


# A whole request refused with these is sent again (within the timeout): the server is busy, not
# the request wrong.
RETRY_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], grpc.StatusCode.UNAVAILABLE.value[0]})


class Stream:
    """The response side: one ClassifyStream call at a time, reopened (and the unanswered
    requests sent again) when the server goes away, within `timeout`."""

    def __init__(self, method, metadata, timeout: float, address: str, feed: "Feed"):
        self._method, self._metadata, self.timeout, self.address = method, metadata, timeout, address
        self._feed = feed
        self._backoff = Backoff()
        self._retry_end: float | None = None
        self._open()

    def _open(self) -> None:
        self._call = self._method(self._feed.requests(), metadata=self._metadata)
        self._watchdog = _Watchdog(self._call, self._feed, self.timeout)

    def next_answers(self) -> Iterator[Prediction]:
        """The predictions of the next answered request (one per image it carried)."""
        while True:
            try:
                resp = next(self._call)
            except StopIteration:
                self._feed.raise_source_error()
                raise ClientError("INTERNAL", "the server ended the stream early", self.address) from None
            except grpc.RpcError as e:
                self._feed.raise_source_error()
                if self._watchdog.fired:
                    raise ClientError("DEADLINE_EXCEEDED",
                                      f"no answer from the server in {self.timeout:g}s", self.address) from None
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise wire.client_error(e, self.address) from None
                self._retry_end = self._retry_end or time.monotonic() + self.timeout
                if not self._backoff.wait(self._retry_end):
                    raise wire.client_error(e, self.address) from None
                self._watchdog.stop()
                self._feed.rewind()  # the unanswered requests go first on the next stream
                self._open()
                continue
            self._watchdog.progress()
            if resp.HasField("error") and resp.error.code in RETRY_CODES:
                # The server refused this request for now (its queue is full): go back to it after
                # a pause, on a new stream, with everything sent after it, so the order holds.
                self._retry_end = self._retry_end or time.monotonic() + self.timeout
                if self._backoff.wait(self._retry_end):
                    self._watchdog.stop()
                    self._call.cancel()
                    self._feed.rewind()
                    self._open()
                    continue
            self._backoff.reset()
            self._retry_end = None
            n = len(self._feed.answered().images)
            if resp.HasField("error"):
                failure = Prediction(error=resp.error.message, code=wire.code_name(resp.error.code))
                return iter([failure] * n)
            if len(resp.predictions) != n:
                raise ClientError("INTERNAL",
                                  f"the server answered {len(resp.predictions)} predictions for {n} images", self.address)
            return map(wire.from_proto, resp.predictions)

    def revive(self) -> None:
        """Called while the caller waits for its next item.  gRPC stops pulling requests once a
        call has ended, so a stream that ended with nothing in flight (the server gone between
        answering the last request and gRPC asking for the next) would leave the feed waiting
        forever: open a new one, or raise the stream's error.  Not while a reader is waiting for
        the caller's next items: its batch will meet the ended call and the error will come back
        the usual way (and a server that stays down costs one new stream, not one per check)."""
        if self._feed.in_flight() or self._feed.reading() or not self._call.done():
            return
        if self._call.code() != grpc.StatusCode.UNAVAILABLE:
            self.next_answers()  # raises the stream's error (or "ended early")
        self._watchdog.stop()
        self._feed.rewind()  # a batch being read for the old stream goes to the new one
        self._open()

    def close(self) -> None:
        self._watchdog.stop()
        self._call.cancel()  # a no-op when the stream already ended


class Feed:
    """The request side of a stream.  gRPC pulls `requests()` from its own thread: it reads the
    caller's items, turns each batch of good ones into a request (at most `window` unanswered)
    and leaves one token per item, in order, for the caller's thread: None for an image that was
    sent, the exception for one that failed here.  After a broken stream `rewind()` puts the
    unanswered requests first in line for the next one (an old stream's iterator, if gRPC is
    still blocked in it, sees the new epoch and stops)."""

    def __init__(self, items: Iterator[Item], batch_size: int, window: int, top_k: int | None, max_bytes: int):
        self._items, self._batch_size, self._window, self._top_k = _flat(items), batch_size, window, top_k
        self._max_bytes = max_bytes
        self._carry: pb.Image | None = None  # the image that did not fit in the last request
        self._cond = threading.Condition()
        self._read_lock = threading.Lock()
        self._tokens: collections.deque = collections.deque()
        self._pending: collections.deque = collections.deque()  # sent, unanswered requests
        self._resend: collections.deque = collections.deque()
        self._epoch = 0
        self._done = False  # every item has been read (or the caller's iterator failed)
        self._closed = False
        self._error: BaseException | None = None

    # -- gRPC's thread ---------------------------------------------------------------------

    def requests(self) -> Iterator[pb.ClassifyRequest]:
        with self._cond:
            epoch = self._epoch
        stale = lambda: self._closed or self._epoch != epoch  # noqa: E731
        while True:
            with self._cond:
                self._cond.wait_for(lambda: stale() or len(self._pending) < self._window)
                if stale():
                    return
                request = self._resend.popleft() if self._resend else None
                if request is None and self._done:
                    return
                if request is not None:
                    self._pending.append(request)
            if request is None:
                # One reader at a time, and the requests queued for resending always go first:
                # an old stream's reader that finishes a batch after a rewind queues it there.
                with self._read_lock:
                    with self._cond:
                        if stale():
                            return
                        if self._resend:
                            continue
                        if self._done:
                            return
                    request = self._read_batch()  # outside the condition: reading files takes time
                    with self._cond:
                        if request is None:
                            return
                        if stale():
                            self._resend.append(request)
                            return
                        self._pending.append(request)
            yield request

    def _read_batch(self) -> pb.ClassifyRequest | None:
        """The next request (None at the end): up to batch_size images and max_bytes of image
        data.  Items that fail here (or alone exceed max_bytes) only leave their token."""
        while True:
            images: list[pb.Image] = []
            tokens: list[BaseException | None] = []
            size = 0
            try:
                while len(images) < self._batch_size:
                    if self._carry is not None:
                        image, self._carry = self._carry, None
                    else:
                        try:
                            item = next(self._items)
                        except StopIteration:
                            self._done = True
                            break
                        if isinstance(item, BaseException):
                            tokens.append(item)
                            continue
                        try:
                            image = wire.image(item)
                        except ValueError as e:
                            tokens.append(e)
                            continue
                    n = len(image.encoded) + len(image.pixels)
                    if n > self._max_bytes:
                        tokens.append(Overloaded(f"{n:,} bytes: more than one request may carry ({self._max_bytes:,})"))
                        continue
                    if images and size + n > self._max_bytes:
                        self._carry = image  # it opens the next request
                        break
                    images.append(image)
                    tokens.append(None)
                    size += n
            except BaseException as e:  # the caller's iterator failed: end the job, re-raise there
                self._error, self._done = e, True
            with self._cond:
                self._tokens.extend(tokens)
                self._cond.notify_all()
            if images:
                request = pb.ClassifyRequest(images=images)
                if self._top_k:
                    request.top_k = self._top_k
                return request
            if self._done:
                return None

    # -- the caller's thread ---------------------------------------------------------------

    def next_token(self, idle=lambda: None):
        """The next item's token, or END; `idle()` is called every IDLE_S seconds of waiting."""
        while True:
            with self._cond:
                if self._cond.wait_for(lambda: self._tokens or self._done, IDLE_S):
                    if self._tokens:
                        return self._tokens.popleft()
                    break
            idle()
        self.raise_source_error()
        return END

    def answered(self) -> pb.ClassifyRequest:
        with self._cond:
            request = self._pending.popleft()
            self._cond.notify_all()
            return request

    def reading(self) -> bool:
        """A reader is waiting for the caller's items (or turning them into a request)."""
        return self._read_lock.locked()

    def in_flight(self) -> int:
        with self._cond:
            return len(self._pending)

    def rewind(self) -> None:
        with self._cond:
            self._resend.extendleft(reversed(self._pending))
            self._pending.clear()
            self._epoch += 1
            self._cond.notify_all()

    def raise_source_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _Watchdog:
    """Cancels a stream that has had requests in flight and no answer for `timeout` seconds: the
    stream's deadline is per answer, since a bulk job may rightly run for hours."""

    def __init__(self, call, feed: Feed, timeout: float):
        self._call, self._feed, self._timeout = call, feed, timeout
        self._last = time.monotonic()
        self._stop = threading.Event()
        self.fired = False
        self._thread = threading.Thread(target=self._run, name="network3-stream-watchdog", daemon=True)
        self._thread.start()

    def progress(self) -> None:
        self._last = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(min(0.25, self._timeout / 4)):
            if self._feed.in_flight() == 0:
                self._last = time.monotonic()
            elif time.monotonic() - self._last > self._timeout:
                self.fired = True
                self._call.cancel()
                return

    def stop(self) -> None:
        self._stop.set()


class Backoff:
    """Exponential backoff with jitter: 50 ms doubling to 1 s, never past `end`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._delay = 0.05

    def wait(self, end: float) -> bool:
        left = end - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(left, self._delay * random.uniform(0.5, 1.0)))
        self._delay = min(self._delay * 2, 1.0)
        return True
