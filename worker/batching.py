"""Dynamic batching, in pure asyncio: no Kafka, no torch.

A :class:`Batcher` collects items put by the caller and hands them to ``process`` in batches.
A batch closes when it holds ``max_batch_size`` items, or when its *oldest* item has waited
``max_batch_delay`` seconds, whichever comes first. At most ``max_concurrent_batches`` batches
are processed at once; while they run, the next batch gathers, so a busy model always takes
the fullest batch available as soon as it is free (as Triton's dynamic batcher does).

Every item put before :meth:`Batcher.close` is passed to ``process`` exactly once: ``run``
returns only when the queue is empty and every batch it started has finished. ``process``
must answer every item of its batch; an exception it lets escape ends ``run``.
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
        process: Callable[[list[T]], Awaitable[None]],
        *,
        max_batch_size: int,
        max_batch_delay: float,
        max_concurrent_batches: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_batch_delay < 0:
            raise ValueError("max_batch_delay must not be negative")
        if max_concurrent_batches < 1:
            raise ValueError("max_concurrent_batches must be at least 1")
        self._process = process
        self.max_batch_size = max_batch_size
        self.max_batch_delay = max_batch_delay
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        self._clock = clock
        self._queue: deque[tuple[float, T]] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        """Items waiting for a batch (not counting batches being processed)."""
        return len(self._queue)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def put(self, item: T) -> None:
        """Queue one item; it will be part of exactly one batch."""
        if self._closed:
            raise BatcherClosedError("batcher is closed; no more items are accepted")
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
                batch = await self._next_batch()
                if not batch:
                    self._slots.release()
                    return
                group.create_task(self._run_batch(batch))

    async def _run_batch(self, batch: list[T]) -> None:
        try:
            await self._process(batch)
        finally:
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

    async def _next_batch(self) -> list[T]:
        while not self._queue:
            if self._closed:
                return []
            await self._wait(None)
        oldest = self._queue[0][0]
        while len(self._queue) < self.max_batch_size and not self._closed:
            remaining = oldest + self.max_batch_delay - self._clock()
            if remaining <= 0 or not await self._wait(remaining):
                break
        size = min(self.max_batch_size, len(self._queue))
        return [self._queue.popleft()[1] for _ in range(size)]
