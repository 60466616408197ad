"""Matching reply records to the requests waiting for them, by their ``correlation_id`` header.

The worker puts the request's id in every reply's ``correlation_id`` header, so a reader can
match a reply without decoding it. :class:`ReplyMatcher` is the one way this package does it:
:class:`~worker.client.InferenceClient` decodes each matched reply for its caller, and the
benchmark keeps the raw values (decoded after its clock stops) with their arrival times.
Records for ids nobody waits for (other clients sharing the topic) are skipped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Arrival", "ReplyMatcher"]

Headers = Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Arrival:
    """A reply record as it arrived."""

    value: bytes | None
    headers: Headers
    received: float
    """``time.perf_counter()`` when the reader handed it over."""


class ReplyMatcher:
    """Futures of requests awaiting their reply, keyed by correlation id."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[Arrival]] = {}

    def __len__(self) -> int:
        """Requests still waiting."""
        return len(self._waiting)

    def expect(self, correlation_id: str) -> asyncio.Future[Arrival]:
        """A future that gets the reply carrying ``correlation_id``; one waiter per id."""
        if correlation_id in self._waiting:
            raise ValueError(f"a request with id {correlation_id!r} is already waiting")
        future: asyncio.Future[Arrival] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = future
        return future

    def forget(self, correlation_id: str) -> None:
        """Stop waiting for ``correlation_id`` (its caller gave up)."""
        self._waiting.pop(correlation_id, None)

    def deliver(self, records: Iterable[tuple[bytes | None, Headers]]) -> int:
        """Hand fetched reply records (value, headers) to their waiters; how many matched."""
        now = time.perf_counter()
        matched = 0
        for value, headers in records:
            cid = _correlation_id(headers)
            future = self._waiting.pop(cid, None) if cid is not None else None
            if future is not None and not future.done():
                future.set_result(Arrival(value, headers, now))
                matched += 1
        return matched

    def cancel_all(self) -> None:
        """Cancel every waiter (the reader is closing)."""
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()


def _correlation_id(headers: Headers) -> str | None:
    found = None
    for key, value in headers:
        if key == "correlation_id":
            found = value
    return None if found is None else found.decode(errors="replace")
