"""Static membership (KIP-345): telling a twin with this worker's instance id from bad luck.

The broker answers a fenced static member's heartbeats and commits UNKNOWN_MEMBER_ID
(aiokafka's requests carry no instance id), and aiokafka rejoins under the same id, fencing the
other in turn: the two take the group from each other forever. Within one process a static
member's id changes only when it was put out of the group, so :data:`FENCED_AFTER_CHANGES`
changes within two session timeouts mean a twin (or a session that keeps expiring).
"""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer

from worker.errors import FencedError
from worker.kafka_settings import KafkaSettings

__all__ = ["FENCED_AFTER_CHANGES", "MemberIds"]

FENCED_AFTER_CHANGES = 3
"""A static member whose member id changes this often within two session timeouts has a twin."""


class MemberIds:
    """Watches a static member's member id; :attr:`fenced` once it keeps changing."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self._kafka = kafka
        self._member_id: str | None = None
        self._changes: list[float] = []
        self.fenced = False
        """A static member kept being put out of its group: a twin has its instance id."""

    def note(self, consumer: AIOKafkaConsumer, now: float) -> None:
        """Look at the consumer's member id after a join (``now``: monotonic seconds)."""
        if self._kafka.group_instance_id is None:
            return
        coordinator = getattr(consumer, "_coordinator", None)  # aiokafka 0.14's own
        member_id = getattr(coordinator, "member_id", None)
        if not isinstance(member_id, str) or member_id == self._member_id:
            return
        if self._member_id is not None:
            window = 2 * self._kafka.session_timeout_ms / 1000
            self._changes = [t for t in self._changes if now - t < window]
            self._changes.append(now)
            if len(self._changes) >= FENCED_AFTER_CHANGES:
                self.fenced = True
        self._member_id = member_id

    def error(self) -> FencedError:
        """The error that stops a fenced worker."""
        kafka = self._kafka
        return FencedError(
            f"another worker joined group {kafka.group_id!r} with this worker's "
            f"WORKER_KAFKA__GROUP_INSTANCE_ID={kafka.group_instance_id!r}; each worker needs "
            "its own (static membership)"
        )
