"""DynamicBatcher: one queue of images in front of the model, drained in batches.

Requests from all RPCs (both APIs) land in one queue, counted in images.  A batch takes
requests from the head until `max_batch_size` images (a larger request is split across
batches and reassembled); with `max_queue_delay_us` > 0 it waits that long after the oldest
request for more to arrive, with 0 it takes what is queued and never waits.

Every request takes the same path, queued, taken into a batch, computed, delivered, except
two kinds that run on their own (`run_alone`, which `--no-batching` uses for every request): a
request that is a good batch already (`alone_min` images or more: merging it would add a wait,
a copy and a hand-back and save nothing), in an executor thread, and a small request that finds
the batcher idle, inline (it would be a batch of one).  Where a batch is computed is the
cost decision: on this CPU-bound model a small onnxruntime call
costs less than handing it to a thread and waking the loop again, so a batch of up to
`inline_max` images runs inline on the event loop thread, and larger batches go to one of
`instances` executor threads (onnxruntime releases the GIL, so gRPC keeps working on the
other cores meanwhile).  When the batcher is idle a small request is therefore computed
within its own `infer` call, and requests queue (and so get batched together) while all
instances are busy.

Everything here runs on the event loop thread except `model.predict` in executor threads,
so the queue needs no lock.  The batcher knows numpy arrays, never protos or gRPC.
`serving.unbatched.Unbatched` is the same interface without a queue (`--no-batching`).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from dataclasses import dataclass

import numpy as np

from .errors import DeadlineExceeded, ModelFailed, Overloaded, Unavailable
from .metrics import Stats
from .tracing import CURRENT

log = logging.getLogger("network3.batcher")
now = time.perf_counter


@dataclass
class BatcherOptions:
    max_batch_size: int = 256  # images per onnxruntime call
    max_queue_delay_us: int = 0  # 0: take what is queued, never wait
    max_queue_size: int = 4096  # images waiting; beyond it requests are refused at once
    instances: int = 1  # batches computed at the same time
    batching: bool = True  # False: the server runs every request on its own (serving.unbatched)
    inline_max: int = 8  # batches up to this many images run on the event loop thread
    # A request of at least this many images is a good batch already and runs on its own, in an
    # executor thread, rather than waiting to be merged: onnxruntime's cost per image is flat
    # from about 8 images up (63-66 us at 8 to 256 on EPYC: docs/results.md), so merging it
    # would only add a wait, a copy and a hand-back.  0: merge every request.
    alone_min: int = 16

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue_size", "instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_queue_delay_us < 0 or self.inline_max < 0 or self.alone_min < 0:
            raise ValueError("max_queue_delay_us, inline_max and alone_min must not be negative")


def compute(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The one call of the model: (logits, probabilities, seconds).  A failure of the model
    becomes ModelFailed (INTERNAL), logged here once with its traceback."""
    t0 = now()
    try:
        logits, probs = model.predict(x)
    except Exception as e:
        log.exception("the model failed on a batch of %d images", len(x))
        raise ModelFailed(f"the model failed on this request's batch ({type(e).__name__}); "
                          "see the server log") from None
    return logits, probs, now() - t0


async def run_alone(pool, model, x: np.ndarray, stats: Stats, t0: float):
    """One request as its own onnxruntime call (a good batch already, or --no-batching) in an
    executor thread: (logits, probabilities, model), counted as a batch of one request."""
    logits, probs, seconds = outcome = await asyncio.wrap_future(pool.submit(compute, model, x))
    return ran_alone(model, x, stats, max(0.0, now() - t0 - seconds), outcome)  # waited for a thread


def run_inline(model, x: np.ndarray, stats: Stats) -> tuple:
    """One small request computed at once on the event loop's thread, as run_alone counts it.
    A plain function: nothing else runs on the loop meanwhile (so no count of it in flight is
    needed), and the call costs no coroutine."""
    return ran_alone(model, x, stats, 0.0, compute(model, x))


def ran_alone(model, x: np.ndarray, stats: Stats, waited: float, outcome: tuple) -> tuple:
    """Count a request computed on its own (`outcome`: compute's) after `waited` seconds in
    the queue; (logits, probabilities, model)."""
    logits, probs, seconds = outcome
    stats.queue.observe(waited)
    stats.record_batch(len(x), 1, seconds)
    trace = CURRENT.get()
    if trace is not None:
        trace.queued(waited)
        trace.computed(len(x), seconds, model, probs)
    return logits, probs, model


def deadline_passed(stats: Stats) -> DeadlineExceeded:
    """Count a request dropped for its deadline; the error to fail it with."""
    stats.dropped["deadline"] = stats.dropped.get("deadline", 0) + 1
    return DeadlineExceeded("deadline passed while the request was queued")


class _Entry:
    """One request in the queue.  `taken` rows have gone into batches, `filled` came back."""

    __slots__ = ("x", "n", "fut", "deadline", "enqueued", "taken", "filled", "logits", "probs", "trace")

    def __init__(self, x, fut, deadline, enqueued, trace) -> None:
        self.x, self.n, self.fut, self.deadline, self.enqueued = x, len(x), fut, deadline, enqueued
        self.trace = trace  # the traced call it belongs to (serving.tracing), or None
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
        if not o.batching:
            raise ValueError("BatcherOptions(batching=False) is serving.unbatched.Unbatched's")
        self.stats = stats or Stats()
        self.stats.queue_depth = lambda: self._queued
        self._queue: collections.deque[_Entry] = collections.deque()
        self._queued = 0  # images waiting (not yet taken into a batch)
        self._inflight = 0  # batches being computed (inline or in a thread)
        self._alone = 0  # images of requests running on their own (alone_min)
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._pool = concurrent.futures.ThreadPoolExecutor(o.instances, thread_name_prefix="network3-infer")
        self._delay = o.max_queue_delay_us / 1e6

    # -- the one entry point ----------------------------------------------------------------

    async def infer(self, x: np.ndarray, deadline: float | None = None):
        """x: float32 [N, 1, 28, 28]; deadline: a time.perf_counter() value or None."""
        if self._closed:
            raise Unavailable("server is shutting down")
        n, o = len(x), self.options
        if self._queued + self._alone + n > o.max_queue_size:
            self.stats.rejected_images += n
            raise Overloaded(f"queue full: {self._queued + self._alone} images waiting, {n} more would pass "
                             f"--max-queue-size {o.max_queue_size}")
        # Two kinds of request cannot gain from the queue and run on their own (run_alone): one
        # that is a good batch already, and a small one that finds the batcher idle (nothing
        # queued, no batch running, no queue delay to wait for others), which would be taken
        # at once as a batch of one anyway, minus the queue's bookkeeping (about 10 us a request).
        if (o.alone_min and o.alone_min <= n <= o.max_batch_size) or \
                (n <= o.inline_max and not self._queue and not self._inflight and not self._delay):
            t0 = now()
            if deadline is not None and t0 > deadline:
                raise deadline_passed(self.stats)
            if n <= o.inline_max:
                return run_inline(self.model, x, self.stats)
            self._alone += n
            try:
                return await run_alone(self._pool, self.model, x, self.stats, t0)
            finally:
                self._alone -= n
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append(_Entry(x, fut, deadline, now(), CURRENT.get()))
        self._queued += n
        self._kick(loop)
        return await fut  # already done when the batch ran inline

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
                    e.fut.set_exception(deadline_passed(self.stats))
                elif e.fut.cancelled():
                    self.stats.dropped["cancelled"] = self.stats.dropped.get("cancelled", 0) + 1
                continue
            k = min(room, e.n - e.taken)
            parts.append((e, e.taken, e.taken + k))
            if e.taken == 0:
                waited = t - e.enqueued
                self.stats.queue.observe(waited)
                if e.trace is not None:
                    e.trace.queued(waited)
            e.taken += k
            room -= k
            self._queued -= k
            if e.taken == e.n:
                q.popleft()
        return parts

    def _run(self, parts, loop) -> None:
        """Compute one batch: inline when small, else in an executor thread; then deliver."""
        if len(parts) == 1 and parts[0][1] == 0 and parts[0][2] == parts[0][0].n:
            x = parts[0][0].x  # one whole request: no copy
        else:
            x = np.concatenate([e.x[a:b] for e, a, b in parts])
        model = self.model  # the model this batch runs on, whatever a reload does meanwhile
        self._inflight += 1
        if len(x) <= self.options.inline_max:
            try:
                outcome = compute(model, x)
            except ModelFailed as e:
                outcome = e
            self._deliver(parts, model, len(x), outcome)  # the caller's loop goes on forming batches
            return
        cf = self._pool.submit(compute, model, x)
        cf.add_done_callback(lambda f: loop.call_soon_threadsafe(self._from_thread, parts, model, len(x), f, loop))

    def _from_thread(self, parts, model, images: int, f: concurrent.futures.Future, loop) -> None:
        self._deliver(parts, model, images, f.exception() or f.result())
        self._kick(loop)

    def _deliver(self, parts, model, images: int, outcome) -> None:
        """The one place a batch ends: its rows to their requests, or its error to all of them."""
        self._inflight -= 1
        if isinstance(outcome, BaseException):
            for e, _, _ in parts:
                if not e.fut.done():
                    e.fut.set_exception(outcome)
            return
        logits, probs, seconds = outcome
        self.stats.record_batch(images, len(parts), seconds)
        off = 0
        for e, a, b in parts:
            k = b - a
            if not e.fut.done():
                if e.trace is not None:
                    e.trace.computed(images, seconds, model, outcome)
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
