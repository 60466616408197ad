"""What waits for a batch: one FIFO queue per priority class, taken in aged order.

:class:`Waiting` holds a batcher's waiting entries (:mod:`worker.batching`), one deque per class
(:mod:`worker.priority`: 0 is taken first). The next entry taken is the one with the earliest
*aged* arrival, ``at + rank x aging``: a class-0 entry goes before a class-2 entry that arrived
less than ``2 x aging`` earlier, and after one that arrived more than that earlier. Within a
class, arrival order. So no entry is ever overtaken by one that arrived more than
``(its rank - the other's rank) x aging`` after it, and the lowest class cannot starve however
much higher-class traffic comes. With one class (or ``aging`` infinite and one rank in use) it is
a plain FIFO queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Generic, NamedTuple, TypeVar

__all__ = ["Entry", "Waiting"]

T = TypeVar("T")


class Entry(NamedTuple, Generic[T]):
    """One waiting item: when it came, its class, its measure (rows, length)."""

    at: float
    item: T
    rows: int
    length: int
    rank: int = 0


class Waiting(Generic[T]):
    """Waiting entries in ``classes`` FIFO queues, taken in aged order (see the module)."""

    def __init__(self, classes: int = 1, aging: float = 1.0) -> None:
        if classes < 1:
            raise ValueError("classes must be at least 1")
        if aging < 0:
            raise ValueError("aging must not be negative")
        self._queues: list[deque[Entry[T]]] = [deque() for _ in range(classes)]
        self._aging = aging
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def append(self, entry: Entry[T]) -> None:
        """Queue ``entry`` last in its class (a rank out of range: the last class)."""
        rank = min(max(entry.rank, 0), len(self._queues) - 1)
        if rank != entry.rank:
            entry = entry._replace(rank=rank)
        self._queues[rank].append(entry)
        self._count += 1

    def oldest_at(self) -> float:
        """When the entry that has waited longest arrived (any class); the queue is not empty."""
        return min(q[0].at for q in self._queues if q)

    def _next(self) -> deque[Entry[T]]:
        """The queue whose first entry goes next (earliest aged arrival; ties: higher class)."""
        best: deque[Entry[T]] | None = None
        best_at = 0.0
        for rank, queue in enumerate(self._queues):
            if queue:
                aged = queue[0].at + rank * self._aging
                if best is None or aged < best_at:
                    best, best_at = queue, aged
        if best is None:
            raise IndexError("nothing is waiting")
        return best

    def next_rank(self) -> int:
        """The class of the entry that goes next; the queue is not empty."""
        return self._next()[0].rank

    def popleft(self) -> Entry[T]:
        """Take the entry that goes next."""
        entry = self._next().popleft()
        self._count -= 1
        return entry

    def give_back(self, entries: Iterable[Entry[T]]) -> None:
        """Put taken entries back at the front of their classes (``entries`` in taken order)."""
        for entry in reversed(list(entries)):
            self._queues[entry.rank].appendleft(entry)
            self._count += 1

    def withdraw(self, unwanted: Callable[[T], bool]) -> list[Entry[T]]:
        """Take every entry whose item is ``unwanted`` out; the rest keep their order."""
        out: list[Entry[T]] = []
        for rank, queue in enumerate(self._queues):
            kept: deque[Entry[T]] = deque()
            for entry in queue:
                (out if unwanted(entry.item) else kept).append(entry)
            self._queues[rank] = kept
        self._count -= len(out)
        return out
