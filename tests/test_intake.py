"""Unit tests of intake flow control (worker.intake): pause at the bound, resume; no broker."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from worker.handover import Handover
from worker.inflight import InFlight
from worker.intake import Intake
from worker.metrics import Metrics
from worker.origins import Record
from worker.progress import Progress
from worker.settings import KafkaSettings, RuntimeSettings

from .conftest import wait_for

PARTITIONS = [TopicPartition("requests", 0), TopicPartition("requests", 1)]


@dataclass
class ConsumerRecord:
    """The fields of a consumer record that intake reads."""

    offset: int
    key: bytes | None = None
    value: bytes | None = b"v"
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp: int = 0


@dataclass
class FakeConsumer:
    """An endless backlog on two partitions that logs every fetch, pause and resume.

    Like aiokafka, a paused partition yields nothing; unlike aiokafka, a fetch while a
    partition is paused is logged as an error, so the test sees the loop never asks.
    """

    next_offset: dict[TopicPartition, int] = field(
        default_factory=lambda: dict.fromkeys(PARTITIONS, 0)
    )
    paused_now: set[TopicPartition] = field(default_factory=set)
    log: list[tuple[str, Any]] = field(default_factory=list)

    def assignment(self) -> set[TopicPartition]:
        return set(PARTITIONS)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_now)

    async def position(self, tp: TopicPartition) -> int:
        return self.next_offset[tp]

    def pause(self, *tps: TopicPartition) -> None:
        self.paused_now |= set(tps)
        self.log.append(("pause", set(tps)))

    def resume(self, *tps: TopicPartition) -> None:
        self.paused_now -= set(tps)
        self.log.append(("resume", set(tps)))

    async def getmany(
        self,
        *,
        timeout_ms: int,  # noqa: ARG002 - aiokafka's signature
        max_records: int,
    ) -> dict[Any, list[ConsumerRecord]]:
        self.log.append(("fetch while paused" if self.paused_now else "fetch", max_records))
        await asyncio.sleep(0)
        out: dict[Any, list[ConsumerRecord]] = {}
        budget = max_records
        for tp in PARTITIONS:
            take = min(budget, 3)
            if take and tp not in self.paused_now:
                first = self.next_offset[tp]
                out[tp] = [ConsumerRecord(first + i) for i in range(take)]
                self.next_offset[tp] = first + take
                budget -= take
        return out


def intake_over(consumer: FakeConsumer, max_in_flight: int) -> tuple[Intake, Progress, Metrics]:
    """An Intake reading from ``consumer`` with the given in-flight bound."""
    progress, metrics = Progress(), Metrics()
    intake = Intake(
        KafkaSettings(fetch_max_records=4),
        RuntimeSettings(max_in_flight=max_in_flight),
        InFlight(max_in_flight),
        metrics=metrics,
        progress=progress,
    )
    intake.consumer = consumer
    return intake, progress, metrics


@dataclass
class Handed:
    """A scripted pipeline: keeps what intake hands it."""

    records: list[Record]

    def dispatch(self, origin: Record, /) -> None:
        self.records.append(origin)

    def unparseable(self, record: Record, error: Exception, /) -> None:
        raise AssertionError(f"no record here is unparseable: {record.where()} {error!r}")

    def abandon(self, partitions: Collection[TopicPartition], /) -> int:
        raise AssertionError(f"no partition is revoked here: {partitions}")


async def test_fetching_pauses_every_partition_at_the_bound_and_resumes_when_answered() -> None:
    """At max_in_flight the loop pauses all partitions and stops fetching until replies land."""
    consumer = FakeConsumer()
    intake, progress, metrics = intake_over(consumer, max_in_flight=10)
    stopping = asyncio.Event()
    handed: list[Record] = []
    async with asyncio.TaskGroup() as group:
        group.create_task(intake.consume(stopping, Handed(handed)))
        await wait_for(lambda: bool(consumer.paused_now), timeout=5, what="a pause")
        assert len(handed) == 10, "never more than max_in_flight records handed out"
        assert consumer.paused_now == set(PARTITIONS)
        assert all(max_records <= 4 for kind, max_records in consumer.log if "fetch" in kind)
        # Answer three: the loop resumes and fetches at most the room there is.
        for source in handed[:3]:
            intake.tracker.done(source.tp, source.offset)
        progress.note()
        await wait_for(lambda: len(handed) == 13, timeout=5, what="three more records")
        await wait_for(lambda: bool(consumer.paused_now), timeout=5, what="the second pause")
        stopping.set()
        progress.note()
    kinds = [kind for kind, _ in consumer.log]
    assert "fetch while paused" not in kinds
    assert kinds.count("pause") == 2
    assert kinds.count("resume") == 1
    assert metrics.value("inference_fetch_pauses_total") == 2
    assert intake.tracker.pending == 10


@dataclass
class OnePartition:
    """A consumer of one partition: where it reads now, its commit, the seeks made."""

    position_now: int = 0
    committed_at: int = 0
    seeks: list[int] = field(default_factory=list)

    def assignment(self) -> set[TopicPartition]:
        return {PARTITIONS[0]}

    def paused(self) -> set[TopicPartition]:
        return set()

    async def position(self, _tp: TopicPartition) -> int:
        return self.position_now

    async def committed(self, _tp: TopicPartition) -> int:
        return self.committed_at

    def seek(self, _tp: TopicPartition, offset: int) -> None:
        self.seeks.append(offset)
        self.position_now = offset


@dataclass
class RebalancingConsumer(OnePartition):
    """One partition read to 40, committed at 4; the first fetch spans a rebalance, then fails.

    The rebalance hands the partition back (the listener bumps the intake's epoch).
    """

    intake: Intake | None = None
    position_now: int = 40
    committed_at: int = 4
    fetches: int = 0

    async def getmany(self, *_tps: TopicPartition, **_: Any) -> dict[Any, list[ConsumerRecord]]:
        self.fetches += 1
        await asyncio.sleep(0.01)
        if self.fetches == 1:
            assert self.intake is not None
            self.intake.epoch += 2  # revoked (queued requests abandoned) and assigned back
            self.position_now = 4  # the new assignment reads from the commit...
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a header key")  # ...and fails
        return {}


async def test_a_fetch_failing_after_a_rebalance_rewinds_to_the_commit_not_the_old_position() -> (
    None
):
    """A failed fetch across a rebalance rewinds to the commit, not the stale saved position."""
    consumer = RebalancingConsumer()
    intake, _, _ = intake_over(consumer, max_in_flight=100)  # type: ignore[arg-type]
    consumer.intake = intake
    stopping = asyncio.Event()
    handed: list[Record] = []
    async with asyncio.TaskGroup() as group:
        group.create_task(intake.consume(stopping, Handed(handed)))
        await wait_for(lambda: consumer.fetches >= 3, timeout=5, what="fetching on")
        stopping.set()
    assert 40 not in consumer.seeks, "the position from before the rebalance is never restored"
    assert consumer.seeks
    assert consumer.seeks[0] == 4, "back to the commit: the abandoned requests are read again"


@dataclass
class SlowOwner:
    """Exactly-once's owner whose producers start only once the first fetch has returned."""

    fetched: asyncio.Event = field(default_factory=asyncio.Event)

    async def acquire(self, _partitions: Collection[TopicPartition], /) -> None:
        await self.fetched.wait()

    def buffered(self, _partitions: Collection[TopicPartition], /) -> int:
        return 0

    async def relinquish(self, _partitions: Collection[TopicPartition], _timeout: float, /) -> None:
        return None


@dataclass
class TakingUpConsumer(OnePartition):
    """One partition of 1,000 records, committed at 0; reads from where it was last sought."""

    owner: SlowOwner = field(default_factory=SlowOwner)

    async def getmany(self, **_: Any) -> dict[Any, list[ConsumerRecord]]:
        await asyncio.sleep(0)
        first, self.position_now = self.position_now, min(self.position_now + 300, 1000)
        self.owner.fetched.set()
        return {PARTITIONS[0]: [ConsumerRecord(o) for o in range(first, self.position_now)]}


async def test_a_fetch_handed_on_across_an_exactly_once_take_up_skips_no_record() -> None:
    """A fetch spanning the take-up's seek is dropped from there: every offset served once."""
    consumer = TakingUpConsumer()
    owner = consumer.owner
    intake, _, _ = intake_over(consumer, max_in_flight=10_000)  # type: ignore[arg-type]
    intake.handover = Handover(owner)
    intake.assigned = {PARTITIONS[0]}
    stopping = asyncio.Event()
    handed: list[Record] = []
    async with asyncio.TaskGroup() as group:
        group.create_task(intake.consume(stopping, Handed(handed)))
        group.create_task(intake.receive({PARTITIONS[0]}))  # taken up while the fetch is handed on
        await wait_for(lambda: len(handed) >= 1000 or stopping.is_set(), timeout=5, what="all")
        stopping.set()
    offsets = [record.offset for record in handed]
    assert offsets == list(range(1000)), f"served from {offsets[:1]}, {len(offsets)} in all"
