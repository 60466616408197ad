"""The one bound on requests in flight: Kafka records and direct calls together.

A request is in flight from the moment it is taken in (a record fetched, a call's place taken
before its body is read) until its answer is acknowledged (a record's reply or dead-letter
copy on its topic) or produced (a call's). At ``limit`` the intake stops fetching
(:mod:`worker.intake`) and a new call is refused with RESOURCE_EXHAUSTED (:mod:`worker.direct`).

``reserved`` places are the calls' alone: records may hold at most ``limit - reserved`` (fewer
while calls hold more than the reserve), so a Kafka backlog, which fills every place it may,
leaves a call room to be queued; a call may take any free place. The worker reserves
``WORKER_RUNTIME__RESERVED_FOR_CALLS`` of the bound while a REST or gRPC endpoint is enabled.
"""

from __future__ import annotations

from aiokafka import TopicPartition

from worker.offsets import OffsetTracker

__all__ = ["InFlight"]


class InFlight:
    """Records (tracked by offset, for commits) and calls in flight, and their bound."""

    def __init__(self, limit: int, reserved: int = 0) -> None:
        if not 0 <= reserved < limit:
            raise ValueError("reserved must be from 0 to limit - 1: records need a place")
        self.limit = limit
        """``WORKER_RUNTIME__MAX_IN_FLIGHT``."""
        self.reserved = reserved
        """Places records may never take (kept for calls)."""
        self.records: OffsetTracker[TopicPartition] = OffsetTracker()
        """Records fetched and not yet answered, by partition and offset."""
        self.calls = 0
        """Direct calls holding a place (see :class:`worker.direct.Place`)."""
        self.incoming = 0
        """Records of a fetch not yet handed on (the intake hands a fetch on in chunks)."""

    @property
    def count(self) -> int:
        """Requests in flight now, of every origin."""
        return self.records.pending + self.calls

    def room(self) -> int:
        """How many more calls may be taken in now (0 or less: none)."""
        return self.limit - self.records.pending - self.incoming - self.calls

    def room_for_records(self) -> int:
        """How many more records may be fetched now: never into the calls' reserve."""
        pending = self.records.pending + self.incoming
        return self.limit - pending - max(self.calls, self.reserved)

    @classmethod
    def reserving(cls, limit: int, share: float) -> InFlight:
        """A bound of ``limit`` whose ``share`` (0 to 1) is kept for calls (records keep 1)."""
        return cls(limit, min(int(limit * share), limit - 1))
