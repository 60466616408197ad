"""Unit tests of runs bounded in time (:class:`worker.pacing.Pace`), alone and in a batcher."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.batching import Batcher
from worker.pacing import Pace


def test_a_pace_needs_a_positive_bound() -> None:
    """Zero, negative and NaN bounds are refused at construction."""
    for seconds in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="max_run_seconds"):
            Pace(seconds)


def test_one_batch_first_then_what_fits_at_most_twice_the_longest() -> None:
    """No report: one batch; then up to twice the longest run, and what fits the bound."""
    pace = Pace(0.035)
    assert pace.batches(64, 1) == 1
    pace.ran(1, 1, 0.010)  # 10 ms a request: 3 fit in 35 ms
    assert pace.batches(64, 1) == 2, "twice the longest run so far"
    pace.ran(2, 2, 0.020)
    assert pace.batches(64, 1) == 3, "what fits the bound"
    assert pace.batches(2, 1) == 2, "never more than max_batches_per_run"


def test_the_estimate_is_per_request_for_full_batches() -> None:
    """A run of one request at 1 ms, batches of 32: a full batch is 32 ms, one fits 35 ms."""
    pace = Pace(0.035)
    pace.ran(4, 4, 0.004)  # four batches of one request each, 1 ms a request
    assert pace.batches(64, 32) == 1, "a partial batch's time is not a full batch's"
    assert pace.batches(64, 1) == 8, "batches of one: 35 fit, twice the longest (4) is 8"


def test_the_estimate_follows_halfway_each_report() -> None:
    """10 ms a request, then 2 ms: the estimate goes 10, 6, 4, 3 ms (runs of 35 ms: 3, 5, 8, 11)."""
    pace = Pace(0.035)
    pace.ran(64, 64, 0.640)
    fits = []
    for _ in range(4):
        fits.append(pace.batches(64, 1))
        pace.ran(1, 1, 0.002)
    assert fits == [3, 5, 8, 11]


def test_a_report_of_nothing_run_changes_nothing() -> None:
    """No batches, no requests, or a time that is not a number: the estimate stays."""
    pace = Pace(0.035)
    pace.ran(1, 1, 0.010)
    for batches, items, seconds in [(0, 0, 0.0), (0, 5, 0.0), (3, 0, 0.0), (1, 1, float("nan"))]:
        pace.ran(batches, items, seconds)
    assert pace.batches(64, 1) == 2
    pace.ran(2, 2, 0.020)
    assert pace.batches(64, 1) == 3


def test_a_free_model_takes_the_most_allowed() -> None:
    """A run that took no time at all: the count bound alone, doubling from the longest."""
    pace = Pace(0.035)
    pace.ran(8, 8, 0.0)
    assert pace.batches(64, 1) == 16
    assert pace.batches(10, 1) == 10


@settings(max_examples=200, deadline=None)
@given(
    reports=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=100),
            st.integers(min_value=0, max_value=10_000),
            st.floats(min_value=0.0, max_value=100.0),
        ),
        max_size=12,
    ),
    most=st.integers(min_value=1, max_value=4096),
    size=st.integers(min_value=1, max_value=1 << 40),
    bound=st.floats(min_value=1e-6, max_value=60.0),
)
def test_a_run_is_never_empty_nor_past_its_bounds(
    reports: list[tuple[int, int, float]], most: int, size: int, bound: float
) -> None:
    """Whatever was reported: from one batch to max_batches_per_run and twice the longest run."""
    pace = Pace(bound)
    longest = 0
    for batches, items, seconds in reports:
        pace.ran(batches, items, seconds)
        if batches and items:
            longest = max(longest, batches)
        allowed = pace.batches(most, size)
        assert 1 <= allowed <= max(1, min(most, 2 * longest))


class Timed:
    """A ``process`` callback that tells its pace a batch of a run took ``per_batch`` seconds.

    ``later``: the time per batch in every run after the first.
    """

    def __init__(self, pace: Pace, per_batch: float, later: float | None = None) -> None:
        self.pace = pace
        self.per_batch = per_batch
        self.later = per_batch if later is None else later
        self.runs: list[int] = []
        self.done: list[int] = []

    async def __call__(self, run: list[list[int]]) -> None:
        self.runs.append(len(run))
        await asyncio.sleep(0)  # several calls at once overlap
        per_batch = self.later if len(self.runs) > 1 else self.per_batch
        items = [item for batch in run for item in batch]
        self.pace.ran(len(run), len(items), per_batch * len(run))
        self.done += items


async def timed_runs(timed: Timed, items: int, **options: object) -> list[int]:
    """Batches per run when ``items`` are queued at once in a paced batcher (closed at once)."""
    options = {"max_batch_size": 1, "max_batches_per_run": 64, **options}
    batcher: Batcher[int] = Batcher(timed, max_batch_delay=3600, pace=timed.pace, **options)  # type: ignore[arg-type]
    for i in range(items):
        batcher.put(i)
    batcher.close()
    await asyncio.wait_for(batcher.run(), 5)
    assert sorted(timed.done) == list(range(items)), "every item processed exactly once"
    return timed.runs


async def test_a_batcher_s_runs_grow_to_what_fits_its_pace() -> None:
    """At 10 ms a batch and 35 ms a run: runs of 1, 2, then 3 batches, the rest last."""
    assert await timed_runs(Timed(Pace(0.035), 0.010), 20) == [1, 2, 3, 3, 3, 3, 3, 2]
    fast = await timed_runs(Timed(Pace(0.035), 0.001), 40, max_batch_size=2, max_batches_per_run=8)
    assert fast == [1, 2, 4, 8, 5], "a bound that holds more than max_batches_per_run: that many"
    assert await timed_runs(Timed(Pace(0.035), 1.0), 4) == [1, 1, 1, 1], "slow: one at a time"


async def test_a_batcher_follows_a_model_that_gets_faster() -> None:
    """10 ms a batch, then 2 ms: runs grow 1, 2, 4, 8, 11 (35 ms at 3 ms estimated)."""
    assert await timed_runs(Timed(Pace(0.035), 0.010, later=0.002), 26) == [1, 2, 4, 8, 11]


async def test_several_instances_share_runs_bounded_by_time() -> None:
    """Two calls at once: runs grow to what fits (3 of 35 ms at 10 ms a batch) and no further."""
    timed = Timed(Pace(0.035), 0.010)
    runs = await timed_runs(timed, 60, max_concurrent_batches=2)
    assert max(runs) == 3
    assert runs.count(3) >= 10, "most of the backlog went in runs of three"


async def test_length_aware_runs_are_bounded_by_time() -> None:
    """A measured (text) lane, batches of 2: runs grow to what fits (3 of 35 ms), no more."""
    timed = Timed(Pace(0.035), 0.010)
    runs = await timed_runs(
        timed, 60, max_batch_size=2, measure=lambda item: (1, 1 + item % 5), sort_window=4
    )
    assert runs[:4] == [1, 2, 3, 3]
    assert max(runs) == 3


@settings(max_examples=40, deadline=None)
@given(
    fit=st.integers(min_value=1, max_value=12),
    most=st.integers(min_value=1, max_value=16),
    bound=st.floats(min_value=1e-4, max_value=10.0),
)
async def test_a_steady_time_per_batch_gives_runs_that_double_to_what_fits(
    fit: int, most: int, bound: float
) -> None:
    """At a steady time per batch, runs double from one up to min(fit, most) batches."""
    per_batch = bound / (fit + 0.5)  # exactly `fit` batches fit, whatever the rounding
    want, expected = min(fit, most), [1]
    while len(expected) < 8:
        expected.append(min(want, 2 * expected[-1]))
    runs = await timed_runs(Timed(Pace(bound), per_batch), sum(expected), max_batches_per_run=most)
    assert runs == expected
    assert all(b <= 2 * a for a, b in itertools.pairwise(runs))
