"""The garbage collector while workers serve: the heap frozen, young collections deferred.

Both are settings of the process, not of one worker: several workers in one process (the
tests, an application embedding :class:`~worker.app.Worker`) share them. The first worker to
start serving applies them; the last to stop undoes them (the heap unfrozen, the threshold as
it was before the first), in whatever order they stop, unless the process set them itself.

Deferring collections keeps garbage cycles alive longer, so the request path must not make
them: an error kept in an answer is :func:`~worker.errors.detached` from its traceback first.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["YOUNG_GC_THRESHOLD", "freeze", "serving"]

YOUNG_GC_THRESHOLD = 50_000
"""Allocations between two young-generation collections while serving (CPython's default: 700).

The count is net (allocations less deallocations). Under ``dev/request_cpu.py``'s load (mlp,
batch 64) the default ran the collector about 440 times in 20,000 requests, 7-9 us of CPU per
request; at 50,000 it did not run at all, and CPU per request was lower in 12 of 14
interleaved pairs (median ratio 0.82). If garbage cycles pile up that far, one young
collection of 50,000 objects takes about 1.6 ms (docs/performance.md, #28's sixth pass).
Older generations keep their defaults.
"""


class _Serving:
    """How many workers of this process serve, and what was there before the first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.before = gc.get_threshold()
        self.frozen_before = False
        """The process had frozen objects itself: the last worker leaves them frozen."""


_SERVING = _Serving()


def freeze() -> None:
    """Exempt what exists now (torch, the models, the clients) from garbage collection.

    With torch loaded, Python tracks ~400,000 objects; a full collection walks them all and
    stops the event loop for ~0.4 s (measured on the development machine), a latency spike
    for every request in flight. Frozen objects are never walked again; objects made later
    are collected as usual, and frozen ones still die by reference counting.
    """
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def serving() -> Iterator[None]:
    """While the block runs: the heap frozen (:func:`freeze`), young collections deferred.

    Counted per process: only the last block to end unfreezes the heap and restores the
    threshold, so a worker stopping never changes them under another that still serves. What
    the process set itself is left alone: a threshold changed while serving stays, and a heap
    it had frozen before the first worker started stays frozen (with what the workers froze:
    the collector cannot tell them apart).
    """
    entered = False
    try:
        with _SERVING.lock:
            if _SERVING.count == 0:
                _SERVING.before = gc.get_threshold()
                _SERVING.frozen_before = gc.get_freeze_count() > 0
            freeze()
            if _SERVING.count == 0:
                gc.set_threshold(YOUNG_GC_THRESHOLD, *_SERVING.before[1:])
            _SERVING.count += 1
            entered = True
        yield
    finally:
        if entered:
            _leave()


def _leave() -> None:
    with _SERVING.lock:
        _SERVING.count -= 1
        if _SERVING.count:
            return
        if gc.get_threshold() == (YOUNG_GC_THRESHOLD, *_SERVING.before[1:]):  # still ours
            gc.set_threshold(*_SERVING.before)
        if not _SERVING.frozen_before:
            gc.unfreeze()  # let exit-time collection see everything again
