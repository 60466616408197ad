"""Faults under load on the real broker: workers joining and leaving, the broker going away."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt
import pytest

from worker.kafka import ensure_topics
from worker.repository import ModelRepository
from worker.settings import Settings

from .conftest import (
    ROOT,
    WorkerProcess,
    changed,
    publish_digits,
    reply_reader,
    running_worker,
    settle,
    wait_for,
)

sys.path.insert(0, str(ROOT / "dev"))
from local_kafka import LocalBroker

pytestmark = pytest.mark.kafka

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


async def test_workers_joining_and_leaving_under_load_lose_nothing(
    settings: Settings,
    testset: TestSet,
    worker_processes: Callable[[Settings], WorkerProcess],
) -> None:
    """Three workers join and two leave (SIGTERM) under load: none lost, no duplicates."""
    kafka = settings.kafka
    await ensure_topics(kafka, [kafka.requests_topic, kafka.replies_topic, kafka.dead_letter_topic])
    total = 6000
    load_done = asyncio.Event()
    async with reply_reader(settings) as replies, asyncio.TaskGroup() as group:
        publisher = group.create_task(
            publish_digits(
                settings, testset[0], total, prefix="load", per_second=600, until=load_done
            )
        )
        first = worker_processes(settings)
        await wait_for(lambda: len(replies) >= 500, timeout=90, what="first worker's replies")
        second = worker_processes(settings)
        await wait_for(second.serving, timeout=90, what="the second worker to join")
        await wait_for(lambda: len(replies) >= 2500, timeout=90, what="replies with two workers")
        third = worker_processes(settings)
        await wait_for(third.serving, timeout=90, what="the third worker to join")
        await wait_for(lambda: len(replies) >= 4500, timeout=90, what="replies with three workers")
        second.signal(signal.SIGTERM)
        assert await second.wait(timeout=60) == 0
        await wait_for(lambda: len(replies) >= 6000, timeout=90, what="replies after a leave")
        assert not publisher.done(), "the load runs until the last leave"
        third.signal(signal.SIGTERM)
        assert await third.wait(timeout=60) == 0
        load_done.set()
        ids = await publisher
        answered = await settle(settings, replies, ids)
        assert first.proc.poll() is None, "the first worker served throughout"
    duplicates = {k: v for k, v in answered.items() if v > 1}
    print(f"rebalances under load: {len(answered)} answered, {len(duplicates)} duplicated")
    assert set(answered) == set(ids)
    assert duplicates == {}, "graceful joins and leaves commit finished work: no duplicates"


@pytest.fixture
def outage_broker() -> Iterator[LocalBroker]:
    """A broker of this test's own (ports 19192/19193), which the test stops and restarts."""
    broker = LocalBroker.named("outage", 19192, 19193)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def outage_settings(settings: Settings, outage_broker: LocalBroker) -> Settings:
    """The test's settings, pointed at the outage broker."""
    return changed(settings, "kafka", bootstrap_servers=outage_broker.bootstrap)


async def test_worker_recovers_when_the_broker_is_down_for_ten_seconds(
    outage_settings: Settings,
    outage_broker: LocalBroker,
    repository: ModelRepository,
    testset: TestSet,
) -> None:
    """Broker stopped ~10 s mid-stream and started again: the worker recovers, all answered."""
    settings = outage_settings
    kafka = settings.kafka
    await ensure_topics(kafka, [kafka.requests_topic, kafka.replies_topic, kafka.dead_letter_topic])
    async with (
        reply_reader(settings) as replies,
        running_worker(settings, repository) as worker,
        asyncio.TaskGroup() as group,
    ):
        publisher = group.create_task(
            publish_digits(settings, testset[0], 3000, prefix="load", per_second=200)
        )
        await wait_for(lambda: len(replies) >= 300, timeout=60, what="replies before the outage")
        await asyncio.to_thread(outage_broker.stop)
        before = len(replies)
        await asyncio.sleep(10)  # the fault itself: the broker stays down this long
        await asyncio.to_thread(outage_broker.start)
        ids = await publisher
        answered = await settle(settings, replies, ids)
        assert worker.in_flight == 0
    print(
        f"broker outage: {before} answered before it, {sum(answered.values()) - len(answered)} "
        "duplicates"
    )
    assert before < len(ids), "the outage must land mid-stream"
    assert set(answered) == set(ids)
