"""Dynamic batching, in pure asyncio: no Kafka, no torch.

A :class:`Batcher` collects items put by the caller and hands them to ``process`` in batches.
A batch closes when it holds ``max_batch_size`` items, or when its *oldest* item has waited
``max_batch_delay`` seconds, whichever comes first. At most ``max_concurrent_batches`` calls of
``process`` run at once; while they run, the next batch gathers, so a busy model always takes
the fullest batch available as soon as it is free (as Triton's dynamic batcher does).

Two ways to pay less per batch:

- ``start_when_idle``: a batch whose first item arrived while the model was idle (nothing
  queued, nothing running) starts at once with what is there; items arriving meanwhile form
  the next batch. The delay is then paid only under load, not by a lone request.
- ``max_batches_per_run``: when more than a full batch is queued, ``process`` gets up to this
  many full batches in one call (a *run*), so a caller that hands each call to another thread
  pays that hand-off once per run instead of once per batch. Each batch of a run still holds
  at most ``max_batch_size`` items, in arrival order. With several calls allowed at once
  (``max_concurrent_batches``), the waiting full batches are shared between the free ones: a
  run takes at most its share, so no instance idles while another has a queue of batches.
- ``pace`` (:class:`~worker.pacing.Pace`): a run is also bounded in time, as many batches as
  the pace allows (its estimate comes from what ``process`` reports to it, not from the
  batcher: only the caller knows which items the model ran).

Variable-length items (text) are measured by ``measure(item) -> (rows, length)``; then

- ``max_batch_tokens`` bounds a batch's *padded* size, rows x longest length (an item over the
  budget on its own still runs, alone); waiting stops early once that many tokens are queued;
- ``sort_window`` > 1 groups what is waiting by length: the first ``max_batch_size`` x
  ``max(sort_window, batches this run may take)`` waiting items are sorted by length and cut into
  batches under both bounds, and a batch is also cut where the next item would bring its
  padding efficiency (real / padded tokens) below ``min_padding_efficiency``, so each batch
  pads little (a few well-packed batches cost less than one padded one). The batch holding
  the *oldest* waiting item always goes first (then other full batches), so nothing starves:
  a request is overtaken only by requests inside the window, and goes within as many runs as
  there are requests ahead of it there. Under a backlog the window is full and sorting pays;
  with fresh traffic only a batch or less waits, and length-aware cutting alone applies.

Priority classes (``classify(item) -> rank``, ``classes``, ``aging``): what waits is held per
class and taken in aged order (:mod:`worker.waiting`): a batch is filled from the highest
class (rank 0) first, and a lower class's item counts as arriving ``rank x aging`` later, so
none starves. A run whose first batch holds a rank-0 item is that batch alone (a run's answers
are delivered together, after its last batch). Without ``classify`` everything is one class,
in arrival order. "Oldest" below means first in that order.

Preemption (``urgent``, with ``classify``): a rank-0 item put while runs are being processed
sets the event; ``process`` may then stop its run early and return the items it did not take,
which go back to the front of their classes (with their arrival times), so the new item waits
for at most the batch being processed, not the rest of a run.

An item is any object (one object put twice is two items). Every item put before
:meth:`Batcher.close` is processed exactly once (passed to ``process`` once, or again after a
hand-back): ``run`` returns only when the queue is empty and every run it started has
finished. ``process`` must answer every item of its run but those it returns (handed back:
they are passed again in a later run); an exception it lets escape ends ``run``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from worker.pacing import Pace
from worker.waiting import Entry, Waiting

__all__ = ["Batcher", "BatcherClosedError"]

T = TypeVar("T")


class BatcherClosedError(RuntimeError):
    """``put`` was called after ``close``."""


class Batcher(Generic[T]):
    """Groups items into batches by size and by the age of the oldest item."""

    def __init__(
        self,
        process: Callable[[list[list[T]]], Awaitable[Sequence[T] | None]],
        *,
        max_batch_size: int,
        max_batch_delay: float,
        max_concurrent_batches: int = 1,
        max_batches_per_run: int = 1,
        start_when_idle: bool = False,
        measure: Callable[[T], tuple[int, int]] | None = None,
        max_batch_tokens: int | None = None,
        sort_window: int = 1,
        min_padding_efficiency: float = 0.0,
        classify: Callable[[T], int] | None = None,
        classes: int = 1,
        aging: float = 1.0,
        urgent: threading.Event | None = None,
        pace: Pace | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_batch_delay < 0:
            raise ValueError("max_batch_delay must not be negative")
        if max_concurrent_batches < 1:
            raise ValueError("max_concurrent_batches must be at least 1")
        if max_batches_per_run < 1:
            raise ValueError("max_batches_per_run must be at least 1")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be at least 1")
        if sort_window < 1:
            raise ValueError("sort_window must be at least 1")
        if not 0 <= min_padding_efficiency <= 1:
            raise ValueError("min_padding_efficiency must be from 0 to 1")
        self._process = process
        self.max_batch_size = max_batch_size
        self.max_batch_delay = max_batch_delay
        self.max_batches_per_run = max_batches_per_run
        self.pace = pace
        self.start_when_idle = start_when_idle
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        self._concurrency = max_concurrent_batches
        self._running = 0
        self._idle_start = False
        self._clock = clock
        self._measure = measure
        self.max_batch_tokens = max_batch_tokens
        self.sort_window = sort_window
        self.min_padding_efficiency = min_padding_efficiency
        self._queued_tokens = 0
        self._queue: Waiting[T] = Waiting(classes, aging)
        self._classify = classify
        self._urgent = urgent
        self._wakeup = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        """Items waiting for a batch (not counting batches being processed)."""
        return len(self._queue)

    @property
    def queued_tokens(self) -> int:
        """Measured items: rows x length of all waiting (0 for a batcher without ``measure``)."""
        return self._queued_tokens

    def put(self, item: T) -> None:
        """Queue one item; it will be part of exactly one batch."""
        if self._closed:
            raise BatcherClosedError("batcher is closed; no more items are accepted")
        if not self._queue and not self._running:
            self._idle_start = True  # the model is idle and nothing waits: no reason to delay
        rows, length = self._measure(item) if self._measure else (1, 1)
        rank = self._classify(item) if self._classify else 0
        self._queue.append(Entry(self._clock(), item, rows, length, rank))
        if self._measure:
            self._queued_tokens += rows * length
        if rank == 0 and self._urgent is not None and self._running:
            self._urgent.set()  # the runs being processed stop early and hand the rest back
        self._wakeup.set()

    def withdraw(self, unwanted: Callable[[T], bool]) -> list[T]:
        """Take every waiting item that is ``unwanted`` out of the queue; it joins no batch."""
        out = self._queue.withdraw(unwanted)
        if self._measure:
            self._queued_tokens -= sum(e.rows * e.length for e in out)
        if out:
            self._wakeup.set()  # a batch being waited for may have nothing left to wait for
        return [e.item for e in out]

    def close(self) -> None:
        """Accept no more items; what is queued is batched at once (no more waiting)."""
        self._closed = True
        self._wakeup.set()

    async def run(self) -> None:
        """Form and process batches until closed and drained."""
        async with asyncio.TaskGroup() as group:
            while True:
                await self._slots.acquire()
                taken = await self._next_run()
                if not taken:
                    self._slots.release()
                    return
                self._running += 1
                if self._urgent is not None:
                    self._urgent.clear()
                group.create_task(self._run(taken))

    async def _run(self, taken: list[list[Entry[T]]]) -> None:
        try:
            left = await self._process([[entry.item for entry in batch] for batch in taken])
            if left:  # not processed: back at the front of their classes, as they were
                entries = _entries_of(left, taken)
                self._queue.give_back(entries)
                self._queued_tokens += sum(e.rows * e.length for e in entries if self._measure)
        finally:
            self._running -= 1
            self._slots.release()
            self._wakeup.set()  # a run handed items back, or a closed batcher may now end

    async def _wait(self, timeout: float | None) -> bool:
        """Wait for a put or close; False if ``timeout`` passed first."""
        self._wakeup.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._wakeup.wait()
        except TimeoutError:
            return False
        return True

    async def _next_run(self) -> list[list[Entry[T]]]:
        # Everything is read again each time round: a withdrawal (a revoke) or a hand-back
        # changes who is oldest or empties the queue, and a put may find the model idle.
        while True:
            if not self._queue:
                if self._closed and not self._running:  # a run may still hand items back
                    return []
                await self._wait(None)
            elif self._full() or self._closed or (self._idle_start and self.start_when_idle):
                break
            else:
                remaining = self._queue.oldest_at() + self.max_batch_delay - self._clock()
                if remaining <= 0:
                    break
                if not await self._wait(remaining) and self._queue:
                    break  # the oldest waited out the delay
        self._idle_start = False
        # A run's answers go out when its last batch is done: a batch holding the top class
        # runs alone, so its answers are never held by the batches behind it.
        share = 1 if self._classify and self._queue.next_rank() == 0 else self._share()
        if self._measure is None:
            batches = [self._take()]
            while len(batches) < share and len(self._queue) >= self.max_batch_size:
                batches.append(self._take())
            return batches
        return self._take_measured(share)

    def _share(self) -> int:
        """Most batches this run may take (count and pace bounds), split among free calls."""
        cap = self.max_batches_per_run
        if self.pace is not None:
            cap = self.pace.batches(cap, self.max_batch_size)
        if self._concurrency == 1:
            return cap
        free = self._concurrency - self._running  # this run's slot included
        full = len(self._queue) // self.max_batch_size
        return max(1, min(cap, full // max(1, free)))

    def _full(self) -> bool:
        """Enough is waiting for a full batch: stop waiting for more."""
        budget = self.max_batch_tokens
        return len(self._queue) >= self.max_batch_size or (
            budget is not None and self._queued_tokens >= budget
        )

    def _take(self) -> list[Entry[T]]:
        size = min(self.max_batch_size, len(self._queue))
        return [self._queue.popleft() for _ in range(size)]

    def _take_measured(self, share: int) -> list[list[Entry[T]]]:
        """A run of batches cut from the window under both bounds; the oldest item's first."""
        queue = self._queue
        size = self.max_batch_size * max(self.sort_window, share)
        window = [queue.popleft() for _ in range(min(size, len(queue)))]
        order = list(range(len(window)))
        if self.sort_window > 1:
            order.sort(key=lambda i: window[i].length)  # stable: ties keep arrival order
        groups: list[tuple[list[int], bool]] = []  # (window indices, closed by a bound)
        members: list[int] = []
        rows = longest = real = 0
        budget = self.max_batch_tokens
        for i in order:
            entry = window[i]
            grown = max(longest, entry.length)
            padded = (rows + entry.rows) * grown
            if members and (
                len(members) >= self.max_batch_size
                or (budget is not None and padded > budget)
                or real + entry.rows * entry.length < self.min_padding_efficiency * padded
            ):
                groups.append((members, True))
                members, rows, real, grown = [], 0, 0, entry.length
            members.append(i)
            rows += entry.rows
            real += entry.rows * entry.length
            longest = grown
        groups.append((members, len(members) >= self.max_batch_size))
        first = next(g for g, _ in groups if 0 in g)
        others = sorted((min(g), g) for g, closed in groups if closed and g is not first)
        chosen = [first] + [g for _, g in others[: share - 1]]
        taken = {i for g in chosen for i in g}
        queue.give_back(e for i, e in enumerate(window) if i not in taken)
        self._queued_tokens -= sum(window[i].rows * window[i].length for i in taken)
        return [[window[i] for i in sorted(g)] for g in chosen]


def _entries_of(left: Sequence[T], taken: list[list[Entry[T]]]) -> list[Entry[T]]:
    """The entries of a run's handed-back items, in their order (one item put twice: both)."""
    by_item: dict[int, list[Entry[T]]] = {}
    for batch in taken:
        for entry in batch:
            by_item.setdefault(id(entry.item), []).append(entry)
    return [by_item[id(item)].pop(0) for item in left]
