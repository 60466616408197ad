"""Unit tests of the inbox (worker.inbox) that the replier and the tokenizer stage drain."""

from __future__ import annotations

import asyncio

from worker.inbox import Inbox


async def test_the_reader_takes_everything_waiting_and_stops_once_closed_and_empty() -> None:
    """take_all waits for items, returns all queued in order, and [] after close and drain."""
    inbox: Inbox[int] = Inbox()
    waiting = asyncio.create_task(inbox.take_all())
    await asyncio.sleep(0)
    assert not waiting.done(), "nothing queued: the reader waits"
    inbox.extend([1, 2])
    inbox.extend([3])
    assert await waiting == [1, 2, 3]
    assert len(inbox) == 0
    inbox.extend([4])
    inbox.close()
    assert await inbox.take_all() == [4], "what was queued before close is still taken"
    assert await inbox.take_all() == []
