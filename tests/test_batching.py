"""Unit tests of the dynamic batcher (pure asyncio, no Kafka, no torch)."""

from __future__ import annotations

import asyncio

import pytest

from worker.batching import Batcher, BatcherClosedError


class Recorder:
    """A ``process`` callback that records batches and can be held to simulate a busy model."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.runs: list[int] = []
        """Batches per call of ``process``."""
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()

    async def __call__(self, run: list[list[int]]) -> None:
        self.started.set()
        self.runs.append(len(run))
        await self.gate.wait()
        self.batches.extend(run)


async def test_batch_closes_at_max_size() -> None:
    """Items put at once are cut into batches of max_batch_size, remainder last, order kept."""
    rec = Recorder()
    batcher: Batcher[int] = Batcher(rec, max_batch_size=4, max_batch_delay=10.0)
    for i in range(10):
        batcher.put(i)
    batcher.close()
    await asyncio.wait_for(batcher.run(), 5)
    assert rec.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert rec.runs == [1, 1, 1], "one batch per call unless runs are asked for"


async def test_batch_closes_when_oldest_waited_the_delay() -> None:
    """A partial batch is processed once its oldest item waited max_batch_delay (no close)."""
    rec = Recorder()
    batcher: Batcher[int] = Batcher(rec, max_batch_size=100, max_batch_delay=0.02)
    async with asyncio.TaskGroup() as group:
        group.create_task(batcher.run())
        batcher.put(1)
        batcher.put(2)
        await asyncio.wait_for(rec.started.wait(), 5)
        batcher.close()
    assert rec.batches == [[1, 2]]


async def test_full_batch_does_not_wait_for_delay() -> None:
    """A batch that reaches max size is processed although the delay is long."""
    rec = Recorder()
    batcher: Batcher[int] = Batcher(rec, max_batch_size=3, max_batch_delay=3600)
    async with asyncio.TaskGroup() as group:
        group.create_task(batcher.run())
        for i in range(3):
            batcher.put(i)
        await asyncio.wait_for(rec.started.wait(), 5)
        batcher.close()
    assert rec.batches == [[0, 1, 2]]


async def test_next_batch_gathers_while_model_is_busy() -> None:
    """Items arriving during a forward pass form the next batch, never above the max size."""
    rec = Recorder()
    rec.gate.clear()
    batcher: Batcher[int] = Batcher(rec, max_batch_size=5, max_batch_delay=0.0)
    async with asyncio.TaskGroup() as group:
        group.create_task(batcher.run())
        batcher.put(0)
        await asyncio.wait_for(rec.started.wait(), 5)
        for i in range(1, 13):
            batcher.put(i)
        await spin()
        assert len(batcher) == 12, "nothing is taken while the only slot is busy"
        rec.gate.set()
        batcher.close()
    assert rec.batches == [[0], [1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12]]
    assert max(len(b) for b in rec.batches) <= 5


async def test_close_flushes_without_waiting_and_refuses_more() -> None:
    """close() processes what is queued at once, and later puts raise BatcherClosedError."""
    rec = Recorder()
    batcher: Batcher[int] = Batcher(rec, max_batch_size=10, max_batch_delay=3600)
    batcher.put(7)
    batcher.close()
    await asyncio.wait_for(batcher.run(), 5)
    assert rec.batches == [[7]]
    with pytest.raises(BatcherClosedError):
        batcher.put(8)


async def test_concurrent_batches_respect_the_limit() -> None:
    """With max_concurrent_batches=2, two batches run at once and a third waits."""
    running = 0
    peak = 0
    release = asyncio.Event()

    async def process(run: list[list[int]]) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1

    batcher: Batcher[int] = Batcher(
        process, max_batch_size=1, max_batch_delay=0, max_concurrent_batches=2
    )
    async with asyncio.TaskGroup() as group:
        group.create_task(batcher.run())
        for i in range(5):
            batcher.put(i)
        for _ in range(20):
            await asyncio.sleep(0)
        assert running == 2
        release.set()
        batcher.close()
    assert peak == 2


async def test_process_error_ends_run() -> None:
    """An exception escaping process() ends run() instead of being swallowed."""

    async def process(run: list[list[int]]) -> None:
        raise RuntimeError("boom")

    batcher: Batcher[int] = Batcher(process, max_batch_size=2, max_batch_delay=0)
    batcher.put(1)
    with pytest.raises(ExceptionGroup) as info:
        await asyncio.wait_for(batcher.run(), 5)
    assert info.group_contains(RuntimeError, match="boom")


def test_invalid_limits_are_rejected() -> None:
    """Non-positive sizes and negative delays are refused at construction."""

    async def process(run: list[list[int]]) -> None:
        return None

    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(process, max_batch_size=0, max_batch_delay=0)
    with pytest.raises(ValueError, match="max_batch_delay"):
        Batcher(process, max_batch_size=1, max_batch_delay=-1)
    with pytest.raises(ValueError, match="max_batches_per_run"):
        Batcher(process, max_batch_size=1, max_batch_delay=0, max_batches_per_run=0)


async def spin() -> None:
    """Let every ready task run (a few rounds of the event loop)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_partial_batch_waits_for_the_delay() -> None:
    """Without start_when_idle, a lone item is held until the delay or a full batch."""
    rec = Recorder()
    batcher: Batcher[int] = Batcher(rec, max_batch_size=3, max_batch_delay=3600)
    async with asyncio.TaskGroup() as group:
        group.create_task(batcher.run())
        batcher.put(1)
        await spin()
        assert not rec.started.is_set(), "a partial batch must wait for its delay"
        batcher.put(2)
        await spin()
        assert not rec.started.is_set(), "a new item does not close a partial batch"
        batcher.put(3)
        await asyncio.wait_for(rec.started.wait(), 5)
        batcher.close()
    assert rec.batches == [[1, 2, 3]]


async def test_start_when_idle_runs_a_lone_request_at_once() -> None:
    """An idle model takes a lone item at once; items arriving while busy wait for the delay."""
    rec = Recorder()
    rec.gate.clear()
    batcher: Batcher[int] = Batcher(
        rec, max_batch_size=3, max_batch_delay=3600, start_when_idle=True
    )
    async with asyncio.TaskGroup() as group:
        group.create_task(batcher.run())
        batcher.put(1)
        await asyncio.wait_for(rec.started.wait(), 5)
        rec.started.clear()
        batcher.put(2)
        rec.gate.set()
        await spin()
        assert not rec.started.is_set(), "under load, a partial batch waits for its delay"
        assert rec.batches == [[1]]
        batcher.close()
    assert rec.batches == [[1], [2]]


async def test_start_when_idle_again_once_the_model_is_free() -> None:
    """After a batch finishes and nothing waits, the next lone item starts at once too."""
    rec = Recorder()
    batcher: Batcher[int] = Batcher(
        rec, max_batch_size=3, max_batch_delay=3600, start_when_idle=True
    )
    async with asyncio.TaskGroup() as group:
        group.create_task(batcher.run())
        batcher.put(1)
        await asyncio.wait_for(rec.started.wait(), 5)
        await spin()  # the first batch is done: the model is idle again
        assert rec.batches == [[1]]
        rec.started.clear()
        batcher.put(2)
        await asyncio.wait_for(rec.started.wait(), 5)
        await spin()
        assert rec.batches == [[1], [2]]
        batcher.close()


async def test_the_delay_counts_from_the_oldest_item_on_the_batchers_clock() -> None:
    """With an injected clock that does not move, a partial batch with a short delay waits."""
    rec = Recorder()
    batcher: Batcher[int] = Batcher(rec, max_batch_size=3, max_batch_delay=0.5, clock=lambda: 0.0)
    async with asyncio.TaskGroup() as group:
        group.create_task(batcher.run())
        batcher.put(1)
        await spin()
        assert not rec.started.is_set(), "0.5 s of delay left on the batcher's clock"
        batcher.close()
    assert rec.batches == [[1]]


async def test_a_backlog_is_handed_over_in_runs_of_full_batches() -> None:
    """Ten queued items, batches of 2, runs of up to 3 batches: two calls, order kept."""
    rec = Recorder()
    batcher: Batcher[int] = Batcher(
        rec, max_batch_size=2, max_batch_delay=3600, max_batches_per_run=3
    )
    for i in range(11):
        batcher.put(i)
    batcher.close()
    await asyncio.wait_for(batcher.run(), 5)
    assert rec.batches == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10]]
    assert rec.runs == [3, 2, 1]
    exact = Recorder()
    batcher = Batcher(exact, max_batch_size=2, max_batch_delay=3600, max_batches_per_run=3)
    for i in range(6):
        batcher.put(i)
    batcher.close()
    await asyncio.wait_for(batcher.run(), 5)
    assert exact.runs == [3], "a last full batch joins the run"
