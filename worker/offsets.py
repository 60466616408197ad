"""Which offsets may be committed: per partition, the lowest offset not yet fully answered.

Records of a partition are tracked in the order they were fetched; each is marked done once its
reply is acknowledged by the broker. A partition's *generation* changes each time it is
forgotten (revoked, or its offsets went backwards): a record fetched in an earlier generation
is stale, and nothing of it may be published any more. The commit position of a partition is
the first tracked offset not done yet (or one past the last tracked offset when all are done),
so a committed offset never passes a record whose reply is not acknowledged, however the
replies of a partition finish out of order. Pure bookkeeping: no Kafka, no asyncio.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import structlog

__all__ = ["OffsetTracker"]

log = structlog.get_logger(__name__)

P = TypeVar("P", bound=Hashable)


@dataclass(slots=True)
class _Partition:
    committed: int
    """The last position marked committed (at first: the first offset tracked)."""
    next_offset: int
    """One past the last offset tracked."""
    outstanding: deque[int] = field(default_factory=deque)
    finished: set[int] = field(default_factory=set)

    def position(self) -> int:
        return self.outstanding[0] if self.outstanding else self.next_offset


class OffsetTracker(Generic[P]):
    """Tracks fetched and answered offsets of many partitions."""

    def __init__(self) -> None:
        self._partitions: dict[P, _Partition] = {}
        self._pending = 0
        self._generations: dict[P, int] = {}

    @property
    def pending(self) -> int:
        """Records tracked and not yet done, over all partitions."""
        return self._pending

    def unfinished_in(self, partitions: Iterable[P]) -> int:
        """Records not yet done in the given partitions (those done out of order excluded)."""
        return sum(
            len(p.outstanding) - len(p.finished)
            for tp in partitions
            if (p := self._partitions.get(tp))
        )

    def generation(self, partition: P) -> int:
        """The partition's generation now: records tracked from now on belong to it."""
        return self._generations.get(partition, 0)

    def current(self, partition: P, generation: int) -> bool:
        """True unless the partition was forgotten since a record of ``generation`` was fetched."""
        return self._generations.get(partition, 0) == generation

    def track(self, partition: P, offset: int) -> None:
        """Note a fetched record.

        Offsets of a partition normally increase; one lower than the last (the log was
        truncated, the position reset) starts the partition afresh.
        """
        part = self._partitions.get(partition)
        if part is not None and offset < part.next_offset:
            # The position moved back (log truncation, an offset reset): start the partition
            # afresh; records still in flight from before are served again from here.
            log.warning(
                "offsets went backwards; tracking the partition afresh",
                partition=str(partition),
                offset=offset,
                previous=part.next_offset - 1,
            )
            self.forget([partition])
            part = None
        if part is None:
            # The group's position is already at (or before) the first record fetched.
            part = self._partitions[partition] = _Partition(offset, offset)
        part.outstanding.append(offset)
        part.next_offset = offset + 1
        self._pending += 1

    def done(self, partition: P, offset: int) -> None:
        """Note that a record's reply is acknowledged; unknown partitions are ignored."""
        part = self._partitions.get(partition)
        if (
            part is None
            or not part.outstanding
            or not part.outstanding[0] <= offset < part.next_offset  # not tracked (now)
        ):
            return
        if offset in part.finished:
            return
        part.finished.add(offset)
        while part.outstanding and part.outstanding[0] in part.finished:
            part.finished.discard(part.outstanding.popleft())
            self._pending -= 1

    def prefix(self, partition: P, answered: Container[int]) -> tuple[list[int], int] | None:
        """The oldest unfinished records of a partition, as far as all are ``answered``.

        Returns their offsets in order and the commit position just past them (the next
        unfinished record, or one past the last tracked); None when the oldest unfinished
        record is not answered (or the partition is not tracked). Exactly-once delivery commits
        exactly such a prefix with its replies, so no reply beyond the commit becomes visible.
        """
        part = self._partitions.get(partition)
        if part is None:
            return None
        offsets: list[int] = []
        for offset in part.outstanding:
            if offset in part.finished:
                continue
            if offset not in answered:
                return (offsets, offset) if offsets else None
            offsets.append(offset)
        return (offsets, part.next_offset) if offsets else None

    def committed(self, partition: P) -> int | None:
        """The last position marked committed (or the first tracked offset), if tracked."""
        part = self._partitions.get(partition)
        return None if part is None else part.committed

    def committable(self, partitions: Iterable[P] | None = None) -> dict[P, int]:
        """Commit positions that moved since they were last marked committed."""
        chosen = self._partitions if partitions is None else partitions
        positions = {}
        for tp in chosen:
            part = self._partitions.get(tp)
            if part is not None and part.position() > part.committed:
                positions[tp] = part.position()
        return positions

    def mark_committed(self, positions: dict[P, int]) -> None:
        """Record that these positions were committed."""
        for tp, position in positions.items():
            part = self._partitions.get(tp)
            if part is not None:
                part.committed = max(part.committed, position)

    def forget(self, partitions: Iterable[P]) -> None:
        """Drop partitions (revoked); their unfinished records no longer count as pending."""
        for tp in partitions:
            part = self._partitions.pop(tp, None)
            if part is not None:
                self._pending -= len(part.outstanding)
                self._generations[tp] = self._generations.get(tp, 0) + 1
