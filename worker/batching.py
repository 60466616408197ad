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
  at most ``max_batch_size`` items, in arrival order.

Every item put before :meth:`Batcher.close` is passed to ``process`` exactly once: ``run``
returns only when the queue is empty and every run it started has finished. ``process`` must
answer every item of its run; an exception it lets escape ends ``run``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["Batcher", "BatcherClosedError"]

T = TypeVar("T")


class BatcherClosedError(RuntimeError):
    """``put`` was called after ``close``."""


class Batcher(Generic[T]):
    """Groups items into batches by size and by the age of the oldest item."""

    def __init__(
        self,
        process: Callable[[list[list[T]]], Awaitable[None]],
        *,
        max_batch_size: int,
        max_batch_delay: float,
        max_concurrent_batches: int = 1,
        max_batches_per_run: int = 1,
        start_when_idle: bool = False,
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
        self._process = process
        self.max_batch_size = max_batch_size
        self.max_batch_delay = max_batch_delay
        self.max_batches_per_run = max_batches_per_run
        self.start_when_idle = start_when_idle
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        self._running = 0
        self._idle_start = False
        self._clock = clock
        self._queue: deque[tuple[float, T]] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        """Items waiting for a batch (not counting batches being processed)."""
        return len(self._queue)

    def put(self, item: T) -> None:
        """Queue one item; it will be part of exactly one batch."""
        if self._closed:
            raise BatcherClosedError("batcher is closed; no more items are accepted")
        if not self._queue and not self._running:
            self._idle_start = True  # the model is idle and nothing waits: no reason to delay
        self._queue.append((self._clock(), item))
        self._wakeup.set()

    def close(self) -> None:
        """Accept no more items; what is queued is batched at once (no more waiting)."""
        self._closed = True
        self._wakeup.set()

    async def run(self) -> None:
        """Form and process batches until closed and drained."""
        async with asyncio.TaskGroup() as group:
            while True:
                await self._slots.acquire()
                batches = await self._next_run()
                if not batches:
                    self._slots.release()
                    return
                self._running += 1
                group.create_task(self._run(batches))

    async def _run(self, batches: list[list[T]]) -> None:
        try:
            await self._process(batches)
        finally:
            self._running -= 1
            self._slots.release()

    async def _wait(self, timeout: float | None) -> bool:
        """Wait for a put or close; False if ``timeout`` passed first."""
        self._wakeup.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._wakeup.wait()
        except TimeoutError:
            return False
        return True

    async def _next_run(self) -> list[list[T]]:
        while not self._queue:
            if self._closed:
                return []
            await self._wait(None)
        if not (self._idle_start and self.start_when_idle):
            oldest = self._queue[0][0]
            while len(self._queue) < self.max_batch_size and not self._closed:
                remaining = oldest + self.max_batch_delay - self._clock()
                if remaining <= 0 or not await self._wait(remaining):
                    break
        self._idle_start = False
        batches = [self._take()]
        while len(batches) < self.max_batches_per_run and len(self._queue) >= self.max_batch_size:
            batches.append(self._take())
        return batches

    def _take(self) -> list[T]:
        size = min(self.max_batch_size, len(self._queue))
        return [self._queue.popleft()[1] for _ in range(size)]
