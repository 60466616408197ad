"""Progress: when a group of answers was last acknowledged, and a way to wait for the next.

Noted by the worker each time answers are acknowledged; read by the watchdog and liveness
(:mod:`worker.supervision`) and waited on by the intake's flow control (:mod:`worker.intake`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

__all__ = ["Progress"]


class Progress:
    """Replies being acknowledged: when it last happened, and a way to wait for the next."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self._event = asyncio.Event()

    def note(self) -> None:
        """Something was acknowledged just now."""
        self.last = time.monotonic()
        self._event.set()

    async def wait(self, timeout: float) -> None:
        """Return at the next :meth:`note`, or after ``timeout`` seconds."""
        self._event.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._event.wait()
