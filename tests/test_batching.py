"""Unit tests of the dynamic batcher (pure asyncio, no Kafka, no torch)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


async def test_everything_withdrawn_while_a_batch_waits_forms_no_batch() -> None:
    """A revoke empties the queue during the delay, then a stop: no batch, no error."""
    rec = Recorder()
    batcher: Batcher[int] = Batcher(
        rec, max_batch_size=100, max_batch_delay=10.0, classify=lambda _: 1, classes=2
    )
    batcher.put(1)
    batcher.put(2)
    async with asyncio.TaskGroup() as group:
        task = group.create_task(batcher.run())
        await asyncio.sleep(0)  # one loop turn: the batcher takes up waiting out the delay
        assert batcher.withdraw(lambda _: True) == [1, 2]
        batcher.close()
        await asyncio.wait_for(task, 5)
    assert rec.batches == []


async def test_items_put_after_a_withdrawal_emptied_the_queue_form_the_next_batch() -> None:
    """The batcher waits again once a revoke emptied its queue; later items batch as usual."""
    rec = Recorder()
    batcher: Batcher[int] = Batcher(rec, max_batch_size=2, max_batch_delay=3600)
    async with asyncio.TaskGroup() as group:
        task = group.create_task(batcher.run())
        batcher.put(1)
        await spin()  # the batcher waits out 1's delay
        assert batcher.withdraw(lambda _: True) == [1]
        await spin()  # and finds nothing left to wait for
        assert not rec.started.is_set()
        batcher.put(2)
        batcher.put(3)  # a full batch: no delay
        await asyncio.wait_for(rec.started.wait(), 5)
        batcher.close()
        await asyncio.wait_for(task, 5)
    assert rec.batches == [[2, 3]]


def on_clock(rec: Recorder, now: list[float]) -> Batcher[int]:
    """A batcher of up to 10 items, 10 s of delay, on the fake clock ``now[0]``."""
    return Batcher(rec, max_batch_size=10, max_batch_delay=10.0, clock=lambda: now[0])


async def test_an_item_put_right_after_a_withdrawal_waits_its_own_delay() -> None:
    """Withdraw all then put in one turn: the new item keeps its own deadline, not the old one."""
    rec = Recorder()
    now = [0.0]
    batcher = on_clock(rec, now)
    async with asyncio.TaskGroup() as group:
        group.create_task(batcher.run())
        batcher.put(1)
        await spin()  # the batcher waits out 1's delay (deadline 10)
        assert batcher.withdraw(lambda _: True) == [1]
        now[0] = 11.0
        batcher.put(2)  # deadline 21: past 1's deadline, not its own
        await spin()
        assert not rec.started.is_set(), "2 has waited 0 of its 10 s"
        batcher.close()
    assert rec.batches == [[2]]


async def test_a_partial_withdrawal_leaves_the_rest_their_own_deadline() -> None:
    """Withdrawing the oldest item moves the deadline to the next oldest, not earlier."""
    rec = Recorder()
    now = [0.0]
    batcher = on_clock(rec, now)
    async with asyncio.TaskGroup() as group:
        group.create_task(batcher.run())
        batcher.put(1)
        now[0] = 5.0
        batcher.put(2)
        await spin()  # the batcher waits out 1's delay (deadline 10)
        now[0] = 11.0
        assert batcher.withdraw(lambda item: item == 1) == [1]
        await spin()
        assert not rec.started.is_set(), "2's deadline is 15, the clock says 11"
        now[0] = 15.0
        batcher.put(3)  # a put wakes the batcher, which now finds 2 due
        await asyncio.wait_for(rec.started.wait(), 5)
        batcher.close()
    assert rec.batches == [[2, 3]]


async def test_a_put_that_finds_the_model_idle_starts_while_a_batch_waited() -> None:
    """start_when_idle: withdraw the waiting item, put another at once: it starts without delay."""
    rec = Recorder()
    rec.gate.clear()
    batcher: Batcher[int] = Batcher(
        rec, max_batch_size=10, max_batch_delay=10.0, start_when_idle=True, clock=lambda: 0.0
    )
    async with asyncio.TaskGroup() as group:
        group.create_task(batcher.run())
        batcher.put(1)  # the model is idle: 1 starts at once
        await asyncio.wait_for(rec.started.wait(), 5)
        batcher.put(2)  # the model is busy: 2 waits out its delay
        rec.gate.set()
        await spin()
        assert rec.batches == [[1]], "2 waits its 10 s"
        assert batcher.withdraw(lambda item: item == 2) == [2]
        batcher.put(3)  # nothing queued, nothing running: no reason to wait
        await spin()
        assert rec.batches == [[1], [3]], "3 found the model idle"
        batcher.close()


async def test_one_object_put_twice_is_handed_back_and_processed_twice() -> None:
    """Hand-backs find each run's own entries: an item object in two runs at once is fine."""
    item = object()
    gates = [asyncio.Event(), asyncio.Event()]
    calls: list[int] = []
    processed: list[object] = []

    async def process(run: list[list[object]]) -> list[object]:
        call = len(calls)
        calls.append(call)
        if call < len(gates):
            await gates[call].wait()
        if call == 1:
            return [i for batch in run for i in batch]  # handed back, to be run again
        processed.extend(i for batch in run for i in batch)
        return []

    batcher: Batcher[object] = Batcher(
        process, max_batch_size=1, max_batch_delay=0.0, max_concurrent_batches=2
    )
    batcher.put(item)
    batcher.put(item)
    batcher.close()
    async with asyncio.TaskGroup() as group:
        task = group.create_task(batcher.run())
        await spin()
        assert calls == [0, 1], "both runs started"
        gates[0].set()
        await spin()
        gates[1].set()
        await asyncio.wait_for(task, 5)
    assert processed == [item, item]
    assert calls == [0, 1, 2]


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


async def test_a_backlog_is_shared_between_concurrent_calls() -> None:
    """Two calls at once, eight full batches queued: each call takes half, none takes all."""
    rec = Recorder()
    rec.gate.clear()  # the first call holds its run until both have started
    batcher: Batcher[int] = Batcher(
        rec, max_batch_size=2, max_batch_delay=3600, max_concurrent_batches=2,
        max_batches_per_run=8,
    )  # fmt: skip
    for i in range(16):
        batcher.put(i)
    batcher.close()
    async with asyncio.TaskGroup() as group:
        running = group.create_task(batcher.run())
        while len(rec.runs) < 2:
            assert not running.done()
            await asyncio.sleep(0)
        rec.gate.set()
    assert rec.runs == [4, 4], "each free call took its share of the eight batches"
    assert sorted(rec.batches) == [[2 * i, 2 * i + 1] for i in range(8)]


def length_of(item: int) -> tuple[int, int]:
    """Items are their own lengths, one row each."""
    return 1, item


async def batches_of(lengths: list[int], **options: Any) -> Recorder:
    """Put items (lengths) at once into a measured batcher, close, and record its batches."""
    rec = Recorder()
    batcher: Batcher[int] = Batcher(rec, max_batch_delay=10.0, measure=length_of, **options)
    for length in lengths:
        batcher.put(length)
    batcher.close()
    await asyncio.wait_for(batcher.run(), 5)
    return rec


def padding_efficiency(batches: list[list[int]]) -> float:
    """Real tokens / padded tokens over all batches."""
    real = sum(sum(b) for b in batches)
    return real / sum(len(b) * max(b) for b in batches)


async def test_the_token_budget_bounds_each_padded_batch() -> None:
    """Rows x longest length never passes max_batch_tokens; an item over it runs alone."""
    rec = await batches_of([10, 30, 5, 100, 20, 20, 20], max_batch_size=8, max_batch_tokens=60)
    assert rec.batches == [[10, 30], [5], [100], [20, 20, 20]]
    assert sorted(x for b in rec.batches for x in b) == sorted([10, 30, 5, 100, 20, 20, 20])


async def test_length_aware_batches_pad_less_than_arrival_order() -> None:
    """With a sort window, mixed lengths are grouped by length: far less padding than FIFO."""
    lengths = [5, 200, 7, 180, 6, 190, 8, 210] * 4
    fifo = await batches_of(lengths, max_batch_size=4, max_batches_per_run=8)
    grouped = await batches_of(lengths, max_batch_size=4, max_batches_per_run=8, sort_window=8)
    assert padding_efficiency(grouped.batches) > 0.9
    assert padding_efficiency(fifo.batches) < 0.6
    assert grouped.runs == [len(grouped.batches)], "full batches of the window go in one run"
    assert grouped.batches[0][0] == 5, "the oldest item's batch goes first"
    assert all(max(b) - min(b) <= 12 or min(b) > 100 for b in grouped.batches)


async def test_batches_are_cut_where_padding_would_pass_the_bound() -> None:
    """min_padding_efficiency splits a mixed group: short and long ones go in separate batches."""
    rec = await batches_of([10, 12, 100, 11, 95], max_batch_size=8, min_padding_efficiency=0.8)
    assert rec.batches == [[10, 12], [100], [11], [95]]
    sorted_rec = await batches_of(
        [10, 12, 100, 11, 95], max_batch_size=8, min_padding_efficiency=0.8, sort_window=2
    )
    assert sorted_rec.batches == [[10, 12, 11], [100, 95]]
    assert padding_efficiency(sorted_rec.batches) >= 0.8
    exact = await batches_of([6, 10], max_batch_size=8, min_padding_efficiency=0.8)
    assert exact.batches == [[6, 10]], "16 real of 20 padded is 0.8: not below the bound"


async def test_waiting_stops_once_a_budget_of_tokens_is_queued() -> None:
    """A long delay is cut short as soon as queued tokens reach max_batch_tokens exactly."""
    rec = Recorder()
    batcher: Batcher[int] = Batcher(
        rec, max_batch_size=100, max_batch_delay=3600, measure=length_of, max_batch_tokens=60
    )
    async with asyncio.TaskGroup() as group:
        group.create_task(batcher.run())
        batcher.put(30)
        assert batcher.queued_tokens == 30
        batcher.put(30)
        await asyncio.wait_for(rec.started.wait(), 5)
        assert batcher.queued_tokens == 0, "taken tokens leave the count"
        batcher.put(10)
        assert batcher.queued_tokens == 10
        batcher.close()
    assert rec.batches == [[30, 30], [10]]


def test_measured_bounds_are_checked_at_their_edges() -> None:
    """A token budget of 1 and an efficiency of 0 or 1 are valid; 0 tokens or 1.01 are not."""

    async def process(_run: list[list[int]]) -> None:
        """Never called."""

    for tokens, fill in ((1, 0.0), (1, 1.0)):
        batcher: Batcher[int] = Batcher(
            process, max_batch_size=1, max_batch_delay=0, measure=length_of,
            max_batch_tokens=tokens, min_padding_efficiency=fill,
        )  # fmt: skip
        assert (batcher.max_batch_tokens, batcher.min_padding_efficiency) == (tokens, fill)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Batcher(process, max_batch_size=1, max_batch_delay=0, max_batch_tokens=0)
    with pytest.raises(ValueError, match="min_padding_efficiency"):
        Batcher(process, max_batch_size=1, max_batch_delay=0, min_padding_efficiency=1.01)
    with pytest.raises(ValueError, match="sort_window"):
        Batcher(process, max_batch_size=1, max_batch_delay=0, sort_window=0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 300), min_size=1, max_size=120),
    st.integers(1, 16),
    st.sampled_from([None, 64, 512, 4096]),
    st.integers(1, 8),
    st.integers(1, 4),
    st.sampled_from([0.0, 0.5, 0.8]),
)
def test_measured_batching_loses_nothing_and_never_starves(  # noqa: PLR0917 - hypothesis
    lengths: list[int], size: int, tokens: int | None, window: int, per_run: int, fill: float
) -> None:
    """Any lengths and bounds: every item once, bounds kept, each run starts with the oldest."""
    seen_runs: list[list[list[int]]] = []
    pending = list(enumerate(lengths))

    async def process(run: list[list[tuple[int, int]]]) -> None:
        oldest = min(pending)
        assert oldest in run[0], "the oldest waiting item is in the run's first batch"
        for batch in run:
            assert len(batch) <= size
            padded = len(batch) * max(length for _, length in batch)
            if len(batch) > 1:
                assert tokens is None or padded <= tokens
                assert sum(length for _, length in batch) >= fill * padded
            assert batch == sorted(batch), "a batch keeps arrival order"
            for entry in batch:
                pending.remove(entry)
        seen_runs.append([[length for _, length in b] for b in run])

    async def scenario() -> None:
        batcher: Batcher[tuple[int, int]] = Batcher(
            process,
            max_batch_size=size,
            max_batch_delay=10.0,
            max_batches_per_run=per_run,
            measure=lambda entry: (1, entry[1]),
            max_batch_tokens=tokens,
            sort_window=window,
            min_padding_efficiency=fill,
        )
        for entry in enumerate(lengths):
            batcher.put(entry)
        batcher.close()
        await asyncio.wait_for(batcher.run(), 5)

    asyncio.run(scenario())
    assert pending == []
    assert all(len(run) <= per_run for run in seen_runs)
