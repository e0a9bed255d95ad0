"""DynamicBatcher and Unbatched with a real model (tests/small_model.py) on real MNIST digits.

To make "a batch is running" deterministic, some tests wrap the real model in `Gated`, whose
predict waits for an Event before computing: requests that arrive meanwhile queue up.
`Failing` raises from predict, as a broken model or onnxruntime would.
"""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.batcher import BatcherOptions, DynamicBatcher
from serving.errors import DeadlineExceeded, ModelFailed, Overloaded, Unavailable, grpc_status
from serving.metrics import Stats
from serving.model import ModelOptions, load_model
from serving.preprocess import pixels_to_input
from serving.unbatched import Unbatched


@pytest.fixture(scope="module")
def model(onnx_model):
    return load_model(onnx_model, ModelOptions(intra_op_threads=1))


@pytest.fixture(scope="module")
def x(mnist):
    return pixels_to_input(mnist.test_x[:300])


class Gated:
    """The real model; predict blocks until `gate` is set, and records its batch sizes."""

    def __init__(self, model) -> None:
        self.model, self.gate, self.sizes = model, threading.Event(), []
        self.started = threading.Event()

    def predict(self, x):
        self.started.set()
        assert self.gate.wait(30), "test never opened the gate"
        self.sizes.append(len(x))
        return self.model.predict(x)


class Failing:
    """The real model, but predict raises for the next `failures` calls."""

    def __init__(self, model, failures: int = 1) -> None:
        self.model, self.failures, self.calls = model, failures, 0

    def predict(self, x):
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise RuntimeError("onnxruntime: simulated kernel failure")
        return self.model.predict(x)


def run(coro):
    return asyncio.run(coro)


def test_inline_result_is_the_models(model, x, mnist):
    async def main():
        b = DynamicBatcher(model, BatcherOptions())
        logits, probs, used = await b.infer(x[:4])
        return b, logits, probs, used

    b, logits, probs, used = run(main())
    want_logits, want_probs = model.predict(x[:4])
    assert used is model
    np.testing.assert_array_equal(logits, want_logits)
    np.testing.assert_array_equal(probs, want_probs)
    assert (probs.argmax(1) == mnist.test_y[:4]).mean() >= 0.75
    assert b.stats.batches == {4: [1, pytest.approx(b.stats.compute.sum)]}


def test_a_small_request_that_finds_the_batcher_idle_runs_at_once_and_one_that_waits_merges(model, x):
    """Idle (nothing queued, nothing computing, no queue delay): a 2-image request is computed
    within its own infer call, as a batch of its own, before infer's first await returns to the
    loop.  With a queue delay it waits for others instead, and they go as one batch."""
    async def main(delay_us):
        b = DynamicBatcher(model, BatcherOptions(max_queue_delay_us=delay_us))
        calls = [b.infer(x[i:i + 2]) for i in range(0, 6, 2)]
        done = [asyncio.ensure_future(c) for c in calls]
        await asyncio.sleep(0) if not delay_us else await asyncio.sleep(0.05)
        states = [d.done() for d in done]
        return b, states, await asyncio.gather(*done)

    b, states, results = run(main(0))
    assert states == [True, True, True]  # each ran in its own first step: nothing waited
    assert {size: v[0] for size, v in b.stats.batches.items()} == {2: 3}
    for i, (_, probs, _) in enumerate(results):
        np.testing.assert_allclose(probs, model.predict(x[2 * i:2 * i + 2])[1], rtol=1e-5, atol=1e-6)
    b, states, results = run(main(20_000))
    assert {size: v[0] for size, v in b.stats.batches.items()} == {6: 1}


def test_large_request_is_split_and_reassembled(model, x):
    async def main():
        b = DynamicBatcher(model, BatcherOptions(max_batch_size=64, inline_max=8))
        return b, await b.infer(x[:200])

    b, (logits, probs, _) = run(main())
    np.testing.assert_allclose(probs, model.predict(x[:200])[1], rtol=1e-5, atol=1e-6)
    assert {size: v[0] for size, v in b.stats.batches.items()} == {64: 3, 8: 1}
    assert b.stats.inference_count() == 200


def test_requests_arriving_while_busy_share_one_batch(model, x):
    gated = Gated(model)

    async def main():
        b = DynamicBatcher(gated, BatcherOptions(inline_max=0, instances=1))
        first = asyncio.ensure_future(b.infer(x[:2]))
        await asyncio.get_running_loop().run_in_executor(None, gated.started.wait, 10)
        rest = [asyncio.ensure_future(b.infer(x[i:i + 1])) for i in range(2, 7)]
        await asyncio.sleep(0.01)
        assert b.queued_images == 5
        gated.gate.set()
        return b, await first, await asyncio.gather(*rest)

    b, first, rest = run(main())
    assert gated.sizes == [2, 5]  # the five single images went as one batch
    for i, (logits, probs, _) in enumerate(rest, start=2):
        np.testing.assert_allclose(probs[0], model.predict(x[i:i + 1])[1][0], rtol=1e-5, atol=1e-6)
    assert b.stats.batch_size.count == 2 and b.stats.queue.count == 6


def test_a_request_that_is_a_good_batch_runs_alone_and_small_ones_still_merge(model, x):
    """Arriving while a batch runs: two 32-image requests (alone_min 16) each go to the
    executor as they are, the single images wait and go as one batch.  With alone_min 0 the
    big ones would have been merged too."""
    for alone_min, want in ((16, [2, 32, 32, 4]), (0, [2, 68])):
        gated = Gated(model)

        async def main():
            b = DynamicBatcher(gated, BatcherOptions(inline_max=0, instances=1, alone_min=alone_min))
            first = asyncio.ensure_future(b.infer(x[:2]))
            await asyncio.get_running_loop().run_in_executor(None, gated.started.wait, 10)
            big = [asyncio.ensure_future(b.infer(x[10 + 32 * i:42 + 32 * i])) for i in range(2)]
            small = [asyncio.ensure_future(b.infer(x[i:i + 1])) for i in range(2, 6)]
            await asyncio.sleep(0.01)
            assert b.queued_images == (4 if alone_min else 68)
            gated.gate.set()
            return b, await first, await asyncio.gather(*big), await asyncio.gather(*small)

        b, first, big, small = run(main())
        assert sorted(gated.sizes) == sorted(want), alone_min
        for i, (_, probs, _) in enumerate(big):
            np.testing.assert_allclose(probs, model.predict(x[10 + 32 * i:42 + 32 * i])[1], rtol=1e-5, atol=1e-6)
        assert b.stats.inference_count() == 2 + 64 + 4 and b.stats.queue.count == 7


def test_queue_delay_gathers_concurrent_requests(model, x):
    async def main():
        b = DynamicBatcher(model, BatcherOptions(max_queue_delay_us=50_000))
        results = await asyncio.gather(*(b.infer(x[i:i + 1]) for i in range(6)))
        return b, results

    b, results = run(main())
    assert {size: v[0] for size, v in b.stats.batches.items()} == {6: 1}
    assert [int(r[1].argmax()) for r in results] == [int(p.argmax()) for p in model.predict(x[:6])[1]]


def test_full_queue_refuses_at_once_then_recovers(model, x):
    gated = Gated(model)

    async def main():
        b = DynamicBatcher(gated, BatcherOptions(inline_max=0, max_queue_size=10))
        running = asyncio.ensure_future(b.infer(x[:4]))  # taken into a batch: not queued
        await asyncio.get_running_loop().run_in_executor(None, gated.started.wait, 10)
        queued = asyncio.ensure_future(b.infer(x[:6]))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="queue full"):
            await b.infer(x[:5])
        gated.gate.set()
        await running, await queued
        return b, await b.infer(x[:5])

    b, (_, probs, _) = run(main())
    assert probs.shape == (5, 10)
    assert b.stats.rejected_images == 5


def test_expired_and_cancelled_requests_are_not_computed(model, x):
    gated = Gated(model)

    async def main():
        b = DynamicBatcher(gated, BatcherOptions(inline_max=0))
        running = asyncio.ensure_future(b.infer(x[:3]))
        await asyncio.get_running_loop().run_in_executor(None, gated.started.wait, 10)
        expiring = asyncio.ensure_future(b.infer(x[:7], deadline=time.perf_counter() + 0.02))
        cancelled = asyncio.ensure_future(b.infer(x[:11]))
        alive = asyncio.ensure_future(b.infer(x[:2]))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        gated.gate.set()
        await running
        with pytest.raises(DeadlineExceeded):
            await expiring
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await alive
        return b

    b = run(main())
    assert gated.sizes == [3, 2]  # neither the 7 nor the 11 images reached the model
    assert b.stats.dropped == {"deadline": 1, "cancelled": 1}
    assert b.stats.inference_count() == 5


def test_model_swap_applies_to_later_batches(model, onnx_model, x):
    other = load_model(onnx_model, ModelOptions(intra_op_threads=1))

    async def main():
        b = DynamicBatcher(model, BatcherOptions())
        before = (await b.infer(x[:1]))[2]
        b.model = other
        after = (await b.infer(x[:1]))[2]
        return before, after

    before, after = run(main())
    assert before is model and after is other


def test_close_fails_queued_requests_and_refuses_new_ones(model, x):
    gated = Gated(model)

    async def main():
        b = DynamicBatcher(gated, BatcherOptions(inline_max=0))
        running = asyncio.ensure_future(b.infer(x[:1]))
        await asyncio.get_running_loop().run_in_executor(None, gated.started.wait, 10)
        queued = asyncio.ensure_future(b.infer(x[:1]))
        await asyncio.sleep(0)
        b.close()
        with pytest.raises(Unavailable):
            await queued
        with pytest.raises(Unavailable):
            await b.infer(x[:1])
        gated.gate.set()
        _, probs, _ = await running  # the batch already running still answers
        assert probs.shape == (1, 10)

    run(main())


def test_stats_are_shared_with_the_caller(model, x):
    stats = Stats()

    async def main():
        b = DynamicBatcher(model, BatcherOptions(), stats)
        await b.infer(x[:3])

    run(main())
    assert stats.inference_count() == 3 and stats.execution_count() == 1


@pytest.mark.parametrize("inline_max", [8, 0], ids=["inline", "executor"])
def test_a_failing_model_fails_its_batch_and_the_next_request_works(model, x, inline_max):
    """The model raises on a batch of three requests (gathered by the queue delay): all three
    fail with ModelFailed (INTERNAL, a message saying what happened), nothing is counted as
    computed, and the next request is answered by the same batcher."""
    failing = Failing(model)

    async def main():
        b = DynamicBatcher(failing, BatcherOptions(inline_max=inline_max, max_queue_delay_us=20_000))
        results = await asyncio.gather(*(b.infer(x[i:i + 2]) for i in (0, 2, 4)), return_exceptions=True)
        after = await b.infer(x[10:13])
        return b, results, after

    b, results, after = run(main())
    assert failing.calls == 2  # one batch of three requests, then the next request
    assert all(isinstance(e, ModelFailed) for e in results), results
    status, message = grpc_status(results[0])
    assert status.name == "INTERNAL" and "the model failed" in message and "RuntimeError" in message
    np.testing.assert_allclose(after[1], model.predict(x[10:13])[1], rtol=1e-5, atol=1e-6)
    assert b.queued_images == 0 and b.stats.inference_count() == 3 and b.stats.execution_count() == 1


def test_reload_while_a_batch_runs(model, onnx_model, x):
    """A batch is running on the old model when `batcher.model` is swapped: it finishes on the
    old one (and says so), the requests queued meanwhile run on the new one."""
    gated = Gated(model)
    new = load_model(onnx_model, ModelOptions(intra_op_threads=1))

    async def main():
        b = DynamicBatcher(gated, BatcherOptions(inline_max=0))
        running = asyncio.ensure_future(b.infer(x[:4]))
        await asyncio.get_running_loop().run_in_executor(None, gated.started.wait, 10)
        queued = asyncio.ensure_future(b.infer(x[4:6]))
        await asyncio.sleep(0)
        b.model = new  # the reload
        gated.gate.set()
        return await running, await queued, await b.infer(x[6:7])

    (l1, p1, m1), (l2, p2, m2), (_, _, m3) = run(main())
    assert m1 is gated and gated.sizes == [4]  # the running batch finished on the old model
    assert m2 is new and m3 is new
    np.testing.assert_allclose(p1, model.predict(x[:4])[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p2, new.predict(x[4:6])[1], rtol=1e-5, atol=1e-6)


def test_batching_false_belongs_to_unbatched(model):
    with pytest.raises(ValueError, match="Unbatched"):
        DynamicBatcher(model, BatcherOptions(batching=False))


# ------------------------------------------------------------------------------ Unbatched --

def test_unbatched_runs_each_request_alone(model, x):
    async def main():
        b = Unbatched(model, BatcherOptions(batching=False, inline_max=4))
        results = await asyncio.gather(*(b.infer(x[i:i + 10]) for i in range(0, 50, 10)))
        small = await b.infer(x[:2])  # inline
        return b, results, small

    b, results, small = run(main())
    assert {size: v[0] for size, v in b.stats.batches.items()} == {10: 5, 2: 1}
    assert b.stats.queue.count == 6 and b.queued_images == 0 and b.stats.queue_depth() == 0
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), model.predict(x[:50])[1], rtol=1e-5, atol=1e-6)
    assert all(r[2] is model for r in results) and small[1].shape == (2, 10)


def test_unbatched_bounds_images_in_flight_and_drops_expired(model, x):
    gated = Gated(model)

    async def main():
        b = Unbatched(gated, BatcherOptions(batching=False, inline_max=0, max_queue_size=10, instances=1))
        running = asyncio.ensure_future(b.infer(x[:8]))
        await asyncio.get_running_loop().run_in_executor(None, gated.started.wait, 10)
        with pytest.raises(Overloaded, match="queue full"):
            await b.infer(x[:3])
        with pytest.raises(DeadlineExceeded):
            await b.infer(x[:1], deadline=time.perf_counter() - 1)
        gated.gate.set()
        await running
        return b, await b.infer(x[:3])

    b, (_, probs, _) = run(main())
    assert probs.shape == (3, 10) and gated.sizes == [8, 3]
    assert b.stats.rejected_images == 3 and b.stats.dropped == {"deadline": 1}


def test_unbatched_model_failure_swap_and_close(model, onnx_model, x):
    other = load_model(onnx_model, ModelOptions(intra_op_threads=1))

    async def main():
        b = Unbatched(Failing(model), BatcherOptions(batching=False))
        with pytest.raises(ModelFailed):
            await b.infer(x[:1])
        ok = await b.infer(x[:1])  # the same (now healthy) model answers the next request
        b.model = other
        swapped = await b.infer(x[:1])
        b.close()
        with pytest.raises(Unavailable):
            await b.infer(x[:1])
        return ok, swapped

    ok, swapped = run(main())
    assert ok[1].shape == (1, 10) and swapped[2] is other
