"""Unbatched: `--no-batching`, every request its own onnxruntime call (for comparison).

The same interface as batcher.DynamicBatcher (`await infer(x, deadline)` -> (logits,
probabilities, model), `model` to swap on reload, `options`, `stats`, `queued_images`,
`close()`) and the same counters, without a queue: a request of up to `inline_max` images
runs inline on the event loop thread, a larger one in one of `instances` executor threads.
`max_queue_size` still bounds the images in flight.
"""
from __future__ import annotations

import concurrent.futures
import time

import numpy as np

from .batcher import BatcherOptions, deadline_passed, run_alone, run_inline
from .errors import Overloaded, Unavailable
from .metrics import Stats

now = time.perf_counter


class Unbatched:
    def __init__(self, model, options: BatcherOptions | None = None, stats: Stats | None = None) -> None:
        self.model = model
        self.options = o = options or BatcherOptions(batching=False)
        self.stats = stats or Stats()
        self.stats.queue_depth = lambda: 0  # nothing ever waits for another request
        self._images = 0  # images being computed now
        self._closed = False
        self._pool = concurrent.futures.ThreadPoolExecutor(o.instances, thread_name_prefix="network3-infer")

    async def infer(self, x: np.ndarray, deadline: float | None = None):
        """x: float32 [N, 1, 28, 28]; deadline: a time.perf_counter() value or None."""
        if self._closed:
            raise Unavailable("server is shutting down")
        t0, n, o = now(), len(x), self.options
        if deadline is not None and t0 > deadline:
            raise deadline_passed(self.stats)
        if self._images + n > o.max_queue_size:
            self.stats.rejected_images += n
            raise Overloaded(f"queue full: {self._images} images in flight, {n} more would pass "
                             f"--max-queue-size {o.max_queue_size}")
        if n <= o.inline_max:
            return run_inline(self.model, x, self.stats)
        self._images += n
        try:
            return await run_alone(self._pool, self.model, x, self.stats, t0)
        finally:
            self._images -= n

    @property
    def queued_images(self) -> int:
        return 0

    def close(self) -> None:
        """Refuse new work; a request being computed still finishes."""
        self._closed = True
        self._pool.shutdown(wait=False)
