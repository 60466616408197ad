"""The one bound on requests in flight: Kafka records and direct calls together.

A request is in flight from the moment it is taken in (a record fetched, a call's place taken
before its body is read) until its answer is acknowledged (a record's reply or dead-letter
copy on its topic) or produced (a call's). At ``limit`` the intake stops fetching
(:mod:`worker.intake`) and a new call is refused with RESOURCE_EXHAUSTED (:mod:`worker.direct`).
"""

from __future__ import annotations

from aiokafka import TopicPartition

from worker.offsets import OffsetTracker

__all__ = ["InFlight"]


class InFlight:
    """Records (tracked by offset, for commits) and calls in flight, and their bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        """``WORKER_RUNTIME__MAX_IN_FLIGHT``."""
        self.records: OffsetTracker[TopicPartition] = OffsetTracker()
        """Records fetched and not yet answered, by partition and offset."""
        self.calls = 0
        """Direct calls holding a place (see :class:`worker.direct.Place`)."""

    @property
    def count(self) -> int:
        """Requests in flight now, of every origin."""
        return self.records.pending + self.calls

    def room(self) -> int:
        """How many more requests may be taken in now (0 or less: none)."""
        return self.limit - self.records.pending - self.calls
