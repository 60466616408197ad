"""Counting garbage cycles: what a code path leaves for the collector (a kept traceback, say)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["chained_tracebacks", "cycles_counted"]


@contextlib.contextmanager
def cycles_counted() -> Iterator[list[int]]:
    """Collector off (frozen: what exists already); yields a list that gets what was in cycles."""
    enabled = gc.isenabled()
    gc.disable()  # cycles, if any, are counted at the end instead of collected meanwhile
    gc.freeze()  # what exists already (torch...) out of the count and of the collection's time
    counted: list[int] = []
    try:
        gc.collect()
        yield counted
        counted.append(gc.collect())
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


def chained_tracebacks(exc: BaseException) -> int:
    """How many errors chained to ``exc`` (its causes and contexts) still hold a traceback."""
    count, seen = 0, {id(exc)}
    link = exc.__cause__ or exc.__context__
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        count += link.__traceback__ is not None
        link = link.__cause__ or link.__context__
    return count
