"""An inbox: items put from the event loop, taken all at once by the one task that serves it.

The replier and the tokenizer stage each drain one: whatever has arrived is handled as a group
(one publish round, one tokenizer call), and closing lets the task finish what is queued.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

__all__ = ["Inbox"]

T = TypeVar("T")


class Inbox(Generic[T]):
    """A closable queue whose reader takes everything waiting in one go."""

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        """Items waiting."""
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        """The items waiting, in order (they stay queued)."""
        return iter(self._items)

    def extend(self, items: Iterable[T]) -> None:
        """Queue items (in order)."""
        self._items.extend(items)
        self._wakeup.set()

    def withdraw(self, unwanted: Callable[[T], bool]) -> list[T]:
        """Take every queued item that is ``unwanted`` out; the rest keep their order."""
        out = [item for item in self._items if unwanted(item)]
        if out:
            self._items = deque(item for item in self._items if not unwanted(item))
        return out

    def close(self) -> None:
        """No more items will come: :meth:`take_all` returns ``[]`` once the queue is empty."""
        self._closed = True
        self._wakeup.set()

    async def take_all(self) -> list[T]:
        """Everything queued, waiting until there is something; ``[]`` when closed and empty."""
        while not self._items:
            if self._closed:
                return []
            self._wakeup.clear()
            await self._wakeup.wait()
        taken = list(self._items)
        self._items.clear()
        return taken
