"""Exactly-once delivery on the real broker: kill -9, rebalances, bad input, a fenced zombie."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable
from functools import partial

import numpy as np
import numpy.typing as npt
import pytest
from aiokafka import TopicPartition

from worker.codec import decode_response
from worker.kafka import make_consumer, make_producer
from worker.repository import ModelRepository
from worker.settings import Settings
from worker.transactions import transactional_id

from .conftest import (
    Reply,
    WorkerProcess,
    changed,
    group_lag,
    partitions_of,
    publish_digits,
    reply_counts,
    reply_reader,
    running_worker,
    wait_for,
)

pytestmark = pytest.mark.kafka

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


def exactly_once(settings: Settings) -> Settings:
    """The test's settings in exactly-once mode."""
    return changed(settings, "kafka", delivery="exactly_once", transaction_interval_ms=50)


async def read_committed(
    settings: Settings, topic: str, count: int
) -> list[tuple[bytes | None, bytes]]:
    """The committed records of ``topic`` (key, value), read by a fresh read_committed reader.

    Reads until it has at least ``count`` records and its position reaches the last stable
    offset of every partition (transaction markers take offsets, so record counts alone cannot
    say when all is read; and a transaction's markers reach its partitions one by one, so a
    partition may still show a committed transaction as open for a moment).
    """
    consumer = make_consumer(
        settings.kafka, group_id=None, auto_offset_reset="earliest",
        isolation_level="read_committed",
    )  # fmt: skip
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await partitions_of(settings, topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen: list[tuple[bytes | None, bytes]] = []

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # past it: what was read (the caller's checks fail)
            batches = await consumer.getmany(timeout_ms=200)
            seen.extend((r.key, r.value) for rs in batches.values() for r in rs)
            ends = await consumer.end_offsets(tps)
            if len(seen) >= count and all(
                [await consumer.position(tp) >= end for tp, end in ends.items()]
            ):
                break
        return seen
    finally:
        await consumer.stop()


def enough(replies: list[Reply], count: int) -> bool:
    """At least ``count`` replies read."""
    return len(replies) >= count


async def settled_exactly_once(settings: Settings, ids: list[str]) -> Counter[str]:
    """Wait until the group committed everything; then how often a fresh reader sees each id."""

    async def committed() -> bool:
        return await group_lag(settings) == 0

    await wait_for(committed, timeout=180, what="all offsets committed")
    records = await read_committed(settings, settings.kafka.replies_topic, len(ids))
    counts = Counter(decode_response(value).id for _, value in records)
    lost = sorted(set(ids) - set(counts), key=lambda rid: int(rid.rsplit("-", 1)[1]))
    assert not lost, f"{len(lost)} ids never answered, e.g. {lost[:10]}"
    return counts


async def test_kill_9_twice_loses_nothing_and_a_committed_reader_sees_no_duplicate(
    settings: Settings,
    testset: TestSet,
    worker_processes: Callable[[Settings], WorkerProcess],
) -> None:
    """Two SIGKILLs mid-stream in 5,000 requests: each id answered once for read_committed."""
    settings = exactly_once(settings)
    total = 5000
    ids = await publish_digits(settings, testset[0], total, prefix="eos")
    async with reply_reader(settings) as replies:
        for kill_at in (total // 4, total // 2):
            worker = worker_processes(settings)
            await wait_for(partial(enough, replies, kill_at), timeout=120, what="replies")
            worker.signal(signal.SIGKILL)
            assert await worker.wait(timeout=30) == -signal.SIGKILL
            assert len(reply_counts(replies)) < total, "the kill must land mid-stream"
        worker_processes(settings)
        counts = await settled_exactly_once(settings, ids)
    duplicates = {rid: n for rid, n in counts.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} ids answered twice, e.g. {list(duplicates)[:3]}"


async def test_a_worker_joining_and_leaving_under_load_causes_no_loss_and_no_duplicate(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """Rebalances under load (a second worker joins, then leaves): exactly once per id."""
    settings = exactly_once(settings)
    stop = asyncio.Event()
    async with reply_reader(settings) as replies, running_worker(settings, repository) as first:
        publishing = asyncio.create_task(
            publish_digits(settings, testset[0], 3000, prefix="move", per_second=600, until=stop)
        )
        await wait_for(lambda: len(replies) >= 300, timeout=60, what="the first replies")
        async with running_worker(settings, repository) as second:
            await wait_for(lambda: len(second.assigned) > 0, timeout=60, what="a share for 2")
            await wait_for(
                lambda: (
                    second.metrics.value("inference_transactions_total", result="committed") > 0
                ),
                timeout=60,
                what="the second worker's first transaction",
            )
        await wait_for(lambda: len(first.assigned) == 3, timeout=60, what="all back to 1")
        stop.set()
        ids = await publishing
        counts = await settled_exactly_once(settings, ids)
        assert first.metrics.value("inference_rebalances_total") >= 3
    duplicates = {rid: n for rid, n in counts.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} ids answered twice, e.g. {list(duplicates)[:3]}"


async def test_bad_input_is_dead_lettered_once_and_audit_records_commit_with_replies(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """Undecodable records and a missing reply topic: one dead-letter copy each, none lost."""
    settings = changed(exactly_once(settings), "audit", topic=f"{settings.kafka.group_id}.audit")
    kafka = settings.kafka
    ids = await publish_digits(settings, testset[0], 50, prefix="good")
    producer = make_producer(kafka)
    await producer.start()
    try:
        for i in range(5):
            await producer.send_and_wait(kafka.requests_topic, b"\x00not avro" + bytes([i]))
    finally:
        await producer.stop()
    async with running_worker(settings, repository) as worker:
        counts = await settled_exactly_once(settings, ids)
        assert worker.metrics.value("inference_transactions_total", result="committed") > 0
    assert all(n == 1 for n in counts.values())
    dead = await read_committed(settings, kafka.dead_letter_topic, 5)
    assert sorted(value for _, value in dead) == [b"\x00not avro" + bytes([i]) for i in range(5)]
    audit = await read_committed(settings, settings.audit.topic, 50)
    assert len(audit) == 50, "an audit record per reply, committed with it"


async def test_a_zombie_of_the_previous_owner_is_fenced_and_publishes_nothing(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """The previous owner's producer cannot commit once the partition's new owner started."""
    settings = exactly_once(settings)
    ids = await publish_digits(settings, testset[0], 30, prefix="z")
    tp = TopicPartition(settings.kafka.requests_topic, 0)
    zombie = make_producer(
        settings.kafka, transactional_id=transactional_id(settings.kafka.group_id, tp)
    )
    await zombie.start()
    await zombie.begin_transaction()
    await zombie.send_and_wait(settings.kafka.replies_topic, b"zombie reply", partition=0)
    async with running_worker(settings, repository):
        await settled_exactly_once(settings, ids)
    with pytest.raises(Exception):  # noqa: B017, PT011 - ProducerFenced or its fatal state
        await zombie.commit_transaction()
    await zombie.stop()
    replies = await read_committed(settings, settings.kafka.replies_topic, len(ids))
    values = [value for _, value in replies]
    assert b"zombie reply" not in values
