"""DynamicBatcher: one queue of images in front of the model, drained in batches.

Requests from all RPCs (both APIs) land in one queue, counted in images.  A batch takes
requests from the head until `max_batch_size` images (a larger request is split across
batches and reassembled); with `max_queue_delay_us` > 0 it waits that long after the oldest
request for more to arrive, with 0 it takes what is queued and never waits.

Where the work runs is the main cost decision.  On this CPU-bound model onnxruntime costs
about 30 us per small call, less than a thread hand-off and wake-up: so a batch of up to
`inline_max` images runs inline on the event loop thread, and only larger batches go to one
of `instances` executor threads (onnxruntime releases the GIL, so gRPC keeps working on the
other core meanwhile).  When nothing is queued and an instance is free, a small request is run
at once, without a future or a loop iteration: an idle batcher costs a few function calls.
Requests queue (and so get batched together) while all instances are busy.

Everything here runs on the event loop thread except `model.predict` in executor threads,
so the queue needs no lock.  The batcher knows numpy arrays, never protos or gRPC.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from dataclasses import dataclass

import numpy as np

from .errors import DeadlineExceeded, Overloaded, Unavailable
from .metrics import Stats

log = logging.getLogger("network3.batcher")
now = time.perf_counter


@dataclass
class BatcherOptions:
    max_batch_size: int = 256  # images per onnxruntime call
    max_queue_delay_us: int = 0  # 0: take what is queued, never wait
    max_queue_size: int = 4096  # images waiting; beyond it requests are refused at once
    instances: int = 1  # batches computed at the same time
    batching: bool = True  # False: every request runs on its own (for comparison)
    inline_max: int = 8  # batches up to this many images run on the event loop thread

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue_size", "instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_queue_delay_us < 0 or self.inline_max < 0:
            raise ValueError("max_queue_delay_us and inline_max must not be negative")


class _Entry:
    """One request in the queue.  `taken` rows have gone into batches, `filled` came back."""

    __slots__ = ("x", "n", "fut", "deadline", "enqueued", "taken", "filled", "logits", "probs")

    def __init__(self, x, fut, deadline, enqueued) -> None:
        self.x, self.n, self.fut, self.deadline, self.enqueued = x, len(x), fut, deadline, enqueued
        self.taken = self.filled = 0
        self.logits = self.probs = None


class DynamicBatcher:
    """`await batcher.infer(x)` -> (logits, probabilities, model) for float32 x [N, 1, 28, 28].

    `model` is anything with predict(x) -> (logits, probs); assigning `batcher.model` swaps it
    (reload): batches already running finish on the old one, later batches use the new one.
    """

    def __init__(self, model, options: BatcherOptions | None = None, stats: Stats | None = None) -> None:
        self.model = model
        self.options = o = options or BatcherOptions()
        self.stats = stats or Stats()
        self.stats.queue_depth = lambda: self._queued
        self._queue: collections.deque[_Entry] = collections.deque()
        self._queued = 0  # images waiting (not yet taken into a batch)
        self._inflight = 0  # batches being computed (inline or in a thread)
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._pool = concurrent.futures.ThreadPoolExecutor(o.instances, thread_name_prefix="network3-infer")
        self._delay = o.max_queue_delay_us / 1e6
        # No-batching mode still bounds the images in flight.
        self._unbatched_images = 0

    # -- the one entry point ----------------------------------------------------------------

    async def infer(self, x: np.ndarray, deadline: float | None = None):
        """x: float32 [N, 1, 28, 28]; deadline: a time.perf_counter() value or None."""
        if self._closed:
            raise Unavailable("server is shutting down")
        o = self.options
        n = len(x)
        if not o.batching:
            return await self._infer_alone(x, n, deadline)
        loop = asyncio.get_running_loop()
        if not self._queue and self._inflight < o.instances and n <= o.inline_max and not self._delay:
            # Fast path: idle and small.  Run now, on this thread.
            if deadline is not None and now() > deadline:
                self._drop("deadline")
                raise DeadlineExceeded("deadline passed before the request was computed")
            model = self.model
            self.stats.queue.observe(0.0)
            logits, probs = self._compute(model, x, 1)
            return logits, probs, model
        if self._queued + n > o.max_queue_size:
            self.stats.rejected_images += n
            raise Overloaded(f"queue full: {self._queued} images waiting, {n} more would pass "
                             f"--max-queue-size {o.max_queue_size}")
        fut = loop.create_future()
        self._queue.append(_Entry(x, fut, deadline, now()))
        self._queued += n
        self._kick(loop)
        return await fut

    # -- scheduling -------------------------------------------------------------------------

    def _kick(self, loop) -> None:
        """Something was queued or an instance came free: form batches if it is time."""
        o = self.options
        while self._queue and self._inflight < o.instances:
            if self._delay and self._queued < o.max_batch_size:
                wait = self._queue[0].enqueued + self._delay - now()
                if wait > 0:
                    if self._timer is None:
                        self._timer = loop.call_later(wait, self._on_timer, loop)
                    return
            parts = self._take()
            if parts:
                self._run(parts, loop)

    def _on_timer(self, loop) -> None:
        self._timer = None
        self._kick(loop)

    def _take(self) -> list[tuple[_Entry, int, int]]:
        """Pop up to max_batch_size images from the head: [(entry, start, stop)].  Drops the dead."""
        parts, room, t = [], self.options.max_batch_size, now()
        q = self._queue
        while q and room:
            e = q[0]
            if e.fut.done() or (e.deadline is not None and t > e.deadline):
                q.popleft()
                self._queued -= e.n - e.taken
                if not e.fut.done():
                    e.fut.set_exception(DeadlineExceeded("deadline passed while the request was queued"))
                    self._drop("deadline")
                elif e.fut.cancelled():
                    self._drop("cancelled")
                continue
            k = min(room, e.n - e.taken)
            parts.append((e, e.taken, e.taken + k))
            if e.taken == 0:
                self.stats.queue.observe(t - e.enqueued)
            e.taken += k
            room -= k
            self._queued -= k
            if e.taken == e.n:
                q.popleft()
        return parts

    def _run(self, parts, loop) -> None:
        if len(parts) == 1 and parts[0][1] == 0 and parts[0][2] == parts[0][0].n:
            x = parts[0][0].x  # one whole request: no copy
        else:
            x = np.concatenate([e.x[a:b] for e, a, b in parts])
        model = self.model
        if len(x) <= self.options.inline_max:
            try:
                logits, probs = self._compute(model, x, len(parts))
            except Exception as e:  # a model failure fails this batch's requests, not the server
                self._fail(parts, e)
                return
            self._deliver(parts, logits, probs, model)
            return
        self._inflight += 1
        cf = self._pool.submit(_timed_predict, model, x)
        cf.add_done_callback(lambda f: loop.call_soon_threadsafe(self._finished, parts, f, model, len(x), loop))

    def _finished(self, parts, f: concurrent.futures.Future, model, images: int, loop) -> None:
        self._inflight -= 1
        try:
            logits, probs, seconds = f.result()
        except Exception as e:
            self._fail(parts, e)
        else:
            self.stats.record_batch(images, len(parts), seconds)
            self._deliver(parts, logits, probs, model)
        self._kick(loop)

    def _compute(self, model, x, requests: int):
        t0 = now()
        logits, probs = model.predict(x)
        self.stats.record_batch(len(x), requests, now() - t0)
        return logits, probs

    def _deliver(self, parts, logits, probs, model) -> None:
        off = 0
        for e, a, b in parts:
            k = b - a
            if not e.fut.done():
                if a == 0 and b == e.n:
                    e.fut.set_result((logits[off:off + k], probs[off:off + k], model))
                else:  # a split request: reassemble its rows
                    if e.logits is None:
                        e.logits = np.empty((e.n, logits.shape[1]), logits.dtype)
                        e.probs = np.empty((e.n, probs.shape[1]), probs.dtype)
                    e.logits[a:b] = logits[off:off + k]
                    e.probs[a:b] = probs[off:off + k]
                    e.filled += k
                    if e.filled == e.n:
                        e.fut.set_result((e.logits, e.probs, model))
            off += k

    def _fail(self, parts, exc: Exception) -> None:
        log.error("inference failed for a batch of %d requests: %s", len(parts), exc)
        for e, _, _ in parts:
            if not e.fut.done():
                e.fut.set_exception(exc)

    def _drop(self, reason: str) -> None:
        self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + 1

    # -- no batching: each request alone --------------------------------------------------

    async def _infer_alone(self, x, n: int, deadline):
        o = self.options
        if deadline is not None and now() > deadline:
            self._drop("deadline")
            raise DeadlineExceeded("deadline passed before the request was computed")
        model = self.model
        if n <= o.inline_max:
            self.stats.queue.observe(0.0)
            logits, probs = self._compute(model, x, 1)
            return logits, probs, model
        if self._unbatched_images + n > o.max_queue_size:
            self.stats.rejected_images += n
            raise Overloaded(f"queue full: {self._unbatched_images} images in flight, {n} more would pass "
                             f"--max-queue-size {o.max_queue_size}")
        self._unbatched_images += n
        try:
            t0 = now()
            logits, probs, seconds = await asyncio.wrap_future(self._pool.submit(_timed_predict, model, x))
            self.stats.queue.observe(now() - t0 - seconds)
            self.stats.record_batch(n, 1, seconds)
        finally:
            self._unbatched_images -= n
        return logits, probs, model

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def queued_images(self) -> int:
        return self._queued

    def close(self) -> None:
        """Refuse new work; queued requests fail with UNAVAILABLE.  (Drain first: see server.)"""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue:
            e = self._queue.popleft()
            if not e.fut.done():
                e.fut.set_exception(Unavailable("server is shutting down"))
        self._queued = 0
        self._pool.shutdown(wait=False)  # a batch still running finishes and is delivered


def _timed_predict(model, x):
    t0 = now()
    logits, probs = model.predict(x)
    return logits, probs, now() - t0
