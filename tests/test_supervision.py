"""Unit tests of supervision (worker.supervision): health, readiness, watchdog; no broker."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, cast

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import IllegalStateError

from worker.errors import WatchdogError
from worker.metrics import Metrics
from worker.offsets import OffsetTracker
from worker.progress import Progress
from worker.supervision import Supervisor

from .conftest import wait_for

if TYPE_CHECKING:
    from worker.intake import Intake

TP = TopicPartition("requests", 0)


class FakeConsumer:
    """The three consumer calls supervision makes, over fixed positions."""

    def __init__(self, highwater: int, position: int, *, revoked: bool = False) -> None:
        self._highwater = highwater
        self._position = position
        self._revoked = revoked
        self.polls = 0

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def highwater(self, _tp: TopicPartition) -> int:
        return self._highwater

    async def position(self, _tp: TopicPartition) -> int:
        self.polls += 1
        if self._revoked:  # what aiokafka raises for a partition revoked meanwhile
            raise IllegalStateError("No current assignment for partition")
        return self._position


class FakeIntake:
    """What supervision reads of an intake."""

    def __init__(self, *, highwater: int = 0, position: int = 0, revoked: bool = False) -> None:
        self.tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self.assigned: set[TopicPartition] = set()
        self.joined = False
        self.consumer = FakeConsumer(highwater, position, revoked=revoked)


def supervisor(
    intake: FakeIntake, timeout: float, stopping: asyncio.Event | None = None
) -> tuple[Supervisor, Progress]:
    progress = Progress()
    watched = cast("Intake", intake)
    events = stopping or asyncio.Event()
    return Supervisor(
        watched, progress, events, metrics=Metrics(), watchdog_timeout_s=timeout
    ), progress


async def test_healthy_until_work_waits_longer_than_the_timeout() -> None:
    """No work: healthy however long; work and no progress past the timeout: unhealthy."""
    intake = FakeIntake()
    sup, progress = supervisor(intake, timeout=10)
    progress.last = time.monotonic() - 60
    assert sup.healthy() == (True, "ok")
    intake.tracker.track(TP, 0)
    healthy, why = sup.healthy()
    assert not healthy
    assert "1 in flight" in why
    progress.note()
    assert sup.healthy()[0]


async def test_ready_after_assignment_until_stopping() -> None:
    """Not ready before the group assigns partitions, ready after, not ready once stopping."""
    intake = FakeIntake()
    stopping = asyncio.Event()
    sup, _ = supervisor(intake, timeout=10, stopping=stopping)
    assert not sup.ready()[0]
    intake.joined = True
    intake.assigned = {TP}
    assert sup.ready() == (True, "ok: 1 partition(s)")
    stopping.set()
    assert sup.ready() == (False, "stopping")


async def test_watchdog_raises_when_records_wait_and_nothing_moves() -> None:
    """Records waiting in an assigned partition (highwater > position), no progress: exit."""
    sup, _ = supervisor(FakeIntake(highwater=10, position=3), timeout=0.2)
    async with asyncio.timeout(10):
        with pytest.raises(WatchdogError, match=r"WATCHDOG_TIMEOUT_S=0\.2"):
            await sup.watchdog()


async def test_watchdog_stays_quiet_without_work() -> None:
    """Nothing in flight and nothing waiting: the watchdog never fires."""
    intake = FakeIntake(highwater=3, position=3)
    sup, _ = supervisor(intake, timeout=0.2)
    task = asyncio.create_task(sup.watchdog())
    # 16 polls, 0.05 s apart: four timeouts' worth.
    await wait_for(lambda: intake.consumer.polls >= 16, timeout=10, what="16 watchdog polls")
    assert not task.done()
    task.cancel()


async def test_watchdog_survives_a_partition_revoked_while_it_asks() -> None:
    """position() raising IllegalStateError (a rebalance race) is skipped, not fatal."""
    intake = FakeIntake(highwater=10, revoked=True)
    sup, _ = supervisor(intake, timeout=0.2)
    task = asyncio.create_task(sup.watchdog())
    await wait_for(lambda: intake.consumer.polls >= 16 or task.done(), timeout=10, what="polls")
    assert not task.done(), "the watchdog must keep running"
    task.cancel()


async def test_progress_wait_returns_at_the_next_note() -> None:
    """A waiter wakes when progress is noted, well before its timeout."""
    progress = Progress()
    waiter = asyncio.create_task(progress.wait(30))
    await asyncio.sleep(0)
    progress.note()
    async with asyncio.timeout(5):
        await waiter
