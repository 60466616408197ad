"""Unit tests of offset tracking: commits never pass an unanswered record."""

from __future__ import annotations

import random

from worker.offsets import OffsetTracker


def test_position_stops_at_first_unanswered_offset() -> None:
    """Out-of-order completion only advances the position over a done prefix."""
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in range(10, 15):
        tracker.track("p0", offset)
    tracker.done("p0", 12)
    tracker.done("p0", 11)
    assert tracker.committable() == {}  # 10 is still open, nothing moved
    tracker.done("p0", 10)
    assert tracker.committable() == {"p0": 13}
    assert tracker.pending == 2


def test_all_done_commits_one_past_last() -> None:
    """When every tracked record is done, the position is one past the last offset."""
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.track("p0", 5)
    tracker.done("p0", 5)
    assert tracker.committable() == {"p0": 6}
    tracker.mark_committed({"p0": 6})
    assert tracker.committable() == {}


def test_random_completion_order_never_commits_past_open_records() -> None:
    """Under any completion order, the position is the smallest offset not yet done."""
    rng = random.Random(7)
    tracker: OffsetTracker[int] = OffsetTracker()
    offsets = list(range(200))
    for offset in offsets:
        tracker.track(0, offset)
    order = offsets[:]
    rng.shuffle(order)
    done: set[int] = set()
    committed = 0
    for offset in order:
        tracker.done(0, offset)
        done.add(offset)
        position = tracker.committable().get(0, committed)
        assert position == min(set(offsets) - done, default=200)
        tracker.mark_committed({0: position})
        committed = position
    assert tracker.pending == 0


def test_partitions_are_independent_and_forgettable() -> None:
    """Each partition has its own position; forget() drops a partition's pending records."""
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.track("a", 0)
    tracker.track("b", 0)
    tracker.track("b", 1)
    tracker.done("a", 0)
    assert tracker.committable() == {"a": 1}
    assert tracker.unfinished_in(["b"]) == 2
    tracker.forget(["b"])
    assert tracker.pending == 0
    tracker.done("b", 0)  # a late reply for a revoked partition is ignored
    assert tracker.committable() == {"a": 1}


def test_an_offset_going_backwards_starts_the_partition_afresh() -> None:
    """A position reset (lower offset) does not raise; old in-flight acks cannot finish new ones."""
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in range(100, 105):
        tracker.track("p0", offset)
    tracker.done("p0", 100)
    tracker.track("p0", 50)  # the log was truncated / the position reset
    assert tracker.pending == 1
    assert tracker.committed("p0") == 50
    tracker.done("p0", 103)  # a reply of the old epoch: not tracked now, ignored
    for offset in range(51, 104):
        tracker.track("p0", offset)
    tracker.done("p0", 50)
    assert tracker.committable() == {"p0": 51}, "103 was never answered in this epoch"
    assert tracker.pending == 53


def test_done_ignores_offsets_not_tracked_yet() -> None:
    """Marking an offset beyond the last tracked one does nothing (it is not fetched yet)."""
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.track("p0", 0)
    tracker.done("p0", 1)
    tracker.track("p0", 1)
    tracker.done("p0", 0)
    assert tracker.committable() == {"p0": 1}
