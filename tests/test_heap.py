"""The garbage collector while workers serve: applied by the first, undone by the last."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker import heap
from worker.heap import YOUNG_GC_THRESHOLD


@contextlib.contextmanager
def cheap_collections() -> Iterator[None]:
    """Full collections made no-ops: with torch loaded each would walk ~400,000 objects."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gc, "collect", lambda *_args: 0)
        yield


@given(st.permutations(range(4)))
def test_the_last_block_to_end_restores_whatever_the_order(ends: list[int]) -> None:
    """Overlapping blocks: deferred and frozen until the last ends, then as before, any order."""
    before = gc.get_threshold()
    assert before[0] != YOUNG_GC_THRESHOLD, "the test process starts at another threshold"
    with cheap_collections():
        blocks = [contextlib.ExitStack() for _ in ends]
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
    before = gc.get_threshold()
    seen = []

    def fail_while_serving() -> None:
        with heap.serving():
            seen.append(gc.get_threshold()[0])
            raise RuntimeError("model lost")

    with cheap_collections(), pytest.raises(RuntimeError, match="model lost"):
        fail_while_serving()
    assert seen == [YOUNG_GC_THRESHOLD]
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
