"""The garbage collector while workers serve: applied by the first, undone by the last."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import heap
from worker.heap import YOUNG_GC_THRESHOLD


@contextlib.contextmanager
def collector_as_found() -> Iterator[tuple[int, int, int]]:
    """Full collections made no-ops (each would walk torch's ~400,000 objects); state restored.

    Yields the threshold found, which must not already be the serving one (a leak from before).
    """
    before = gc.get_threshold()
    assert before[0] != YOUNG_GC_THRESHOLD, "the test process starts at another threshold"
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(gc, "collect", lambda *_args: 0)
            yield before
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


@settings(deadline=None)  # gc.get_freeze_count walks every frozen object
@given(st.permutations(range(4)))
def test_the_last_block_to_end_restores_whatever_the_order(ends: list[int]) -> None:
    """Overlapping blocks: deferred and frozen until the last ends, then as before, any order."""
    with collector_as_found() as before, contextlib.ExitStack() as all_blocks:
        blocks = [all_blocks.enter_context(contextlib.ExitStack()) for _ in ends]
        for block in blocks:
            block.enter_context(heap.serving())
        for done, index in enumerate(ends, start=1):
            assert gc.get_threshold() == (YOUNG_GC_THRESHOLD, *before[1:])
            assert gc.get_freeze_count() > 0
            blocks[index].close()
            assert (gc.get_threshold() == before) == (done == len(ends))
        assert gc.get_freeze_count() == 0


def test_a_block_that_raises_still_restores() -> None:
    """A worker that fails while serving leaves the collector as it found it."""
    seen = []

    def fail_while_serving() -> None:
        with heap.serving():
            seen.append(gc.get_threshold()[0])
            raise RuntimeError("model lost")

    with collector_as_found() as before:
        with pytest.raises(RuntimeError, match="model lost"):
            fail_while_serving()
        assert seen == [YOUNG_GC_THRESHOLD]
        assert gc.get_threshold() == before
        assert gc.get_freeze_count() == 0


def test_what_the_process_set_itself_is_left_alone() -> None:
    """A threshold changed while serving stays; a heap frozen before the first worker stays."""
    with collector_as_found() as before:
        gc.freeze()  # as an application might before forking
        with heap.serving():
            gc.set_threshold(1_234, *before[1:])
        assert gc.get_threshold() == (1_234, *before[1:])
        assert gc.get_freeze_count() > 0
        with heap.serving():  # older generations changed: the whole threshold is theirs now
            gc.set_threshold(YOUNG_GC_THRESHOLD, 20, 20)
        assert gc.get_threshold() == (YOUNG_GC_THRESHOLD, 20, 20)
