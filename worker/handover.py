"""Exactly-once intake: taking partitions up through their owner, each record served once.

With exactly-once delivery (:mod:`worker.transactions`) a partition changes hands like this:
the new owner's transactional producer starts first (fencing the previous owner and ending its
open transaction), then the partition's committed offset is read (final only now) and the
consumer seeks to it. :class:`Handover` does this for :class:`~worker.intake.Intake`, and
serves each record of a partition at most once, from that offset on: a fetch begun before the
seek may return records from an older position, and after the seek they come again.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition

__all__ = ["Handover", "Owner"]


class Owner(Protocol):
    """Exactly-once delivery's side of a rebalance (:class:`worker.transactions.Transactions`)."""

    async def acquire(self, partitions: Collection[TopicPartition], /) -> None:
        """Get ready to publish for newly assigned partitions (fencing their last owner)."""

    def buffered(self, partitions: Collection[TopicPartition], /) -> int:
        """Records of these partitions answered and not yet committed."""

    async def relinquish(self, partitions: Collection[TopicPartition], timeout_s: float, /) -> None:
        """Commit what revoked partitions have ready (bounded), then forget them."""


class Handover:
    """Takes assigned partitions up through the owner; says which fetched records to serve."""

    def __init__(self, owner: Owner) -> None:
        self.owner = owner
        self._next: dict[TopicPartition, int] = {}
        """Per partition taken up: the lowest offset still to be served."""
        self.failure: BaseException | None = None
        """An assignment that could not be taken up: the intake raises it (the worker stops)."""

    async def take_up(
        self, consumer: AIOKafkaConsumer, assigned: Collection[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """Start the owner's producers; then where each partition is to be read from."""
        await self.owner.acquire(assigned)
        positions: dict[TopicPartition, int] = {}
        unread: list[TopicPartition] = []
        for tp in sorted(assigned):
            committed = await consumer.committed(tp)
            if committed is None:
                unread.append(tp)
            else:
                positions[tp] = committed
        if unread:  # a new group starts from the earliest record (as auto_offset_reset says)
            positions |= await consumer.beginning_offsets(unread)
        return positions

    def start(self, consumer: AIOKafkaConsumer, positions: dict[TopicPartition, int]) -> None:
        """Read each partition from its position (no await: nothing fetched slips between)."""
        for tp, position in positions.items():
            consumer.seek(tp, position)
            self._next[tp] = position

    def fresh(self, tp: TopicPartition, offset: int) -> bool:
        """Serve this record? Only from the partition's start on, and never one twice.

        A partition still being taken up has no start yet: its records are not served (it is
        read again from its commit once it has).
        """
        start = self._next.get(tp)
        if start is None or offset < start:
            return False
        self._next[tp] = offset + 1
        return True

    def forget(self, partitions: Collection[TopicPartition]) -> None:
        """Revoked partitions: nothing of them is served until taken up again."""
        for tp in partitions:
            self._next.pop(tp, None)
