"""Worker processes stopped by SIGKILL and SIGTERM mid-stream, against the real broker."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from worker.codec import InferenceRequest, Tensor, decode_response, encode_request
from worker.kafka import ensure_topics, make_consumer, make_producer
from worker.settings import Settings

from .conftest import (
    Reply,
    WorkerProcess,
    group_lag,
    partitions_of,
    reply_reader,
    wait_for,
)

pytestmark = pytest.mark.kafka

N = 6000
KILL_AFTER = 600

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


async def publish_requests(settings: Settings, pixels: npt.NDArray[np.float32]) -> list[str]:
    """Publish N digits requests; return their ids."""
    kafka = settings.kafka
    await ensure_topics(kafka, [kafka.requests_topic, kafka.replies_topic])
    producer = make_producer(settings.kafka, linger_ms=20)
    await producer.start()
    ids = [f"sig-{i}" for i in range(N)]
    try:
        for i, request_id in enumerate(ids):
            request = InferenceRequest(
                id=request_id,
                model_name="digits",
                inputs=[Tensor.from_numpy("pixels", pixels[i % len(pixels)][None, :])],
            )
            await producer.send(
                settings.kafka.requests_topic, encode_request(request), key=request_id.encode()
            )
        await producer.flush()
    finally:
        await producer.stop()
    return ids


async def topic_size(settings: Settings, topic: str) -> int:
    """Records in ``topic`` (sum of end offsets; nothing is deleted in these tests)."""
    from aiokafka import TopicPartition  # noqa: PLC0415

    consumer = make_consumer(settings.kafka, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await partitions_of(settings, topic)]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


def reply_ids(replies: list[Reply]) -> Counter[str]:
    return Counter(decode_response(r.value).id for r in replies)


async def all_read(settings: Settings, replies: list[Reply]) -> bool:
    return len(replies) == await topic_size(settings, settings.kafka.replies_topic)


async def test_sigkill_mid_stream_then_restart_loses_nothing(
    settings: Settings,
    testset: TestSet,
    worker_processes: Callable[[Settings], WorkerProcess],
) -> None:
    """After SIGKILL mid-stream and a restart, every request is answered (duplicates allowed)."""
    ids = await publish_requests(settings, testset[0])
    async with reply_reader(settings) as replies:
        first = worker_processes(settings)
        await wait_for(lambda: len(replies) >= KILL_AFTER, timeout=120, what="first replies")
        first.signal(signal.SIGKILL)
        assert await first.wait(timeout=30) == -signal.SIGKILL
        answered_before_kill = len(set(reply_ids(replies)))
        assert answered_before_kill < N, "the kill must land mid-stream"

        worker_processes(settings)
        await wait_for(
            lambda: set(reply_ids(replies)) == set(ids), timeout=180, what="every request answered"
        )

        async def drained() -> bool:
            return await group_lag(settings) == 0

        await wait_for(drained, timeout=60, what="all offsets committed")
        await wait_for(lambda: all_read(settings, replies), timeout=60, what="reply topic read")
    counts = reply_ids(replies)
    duplicates = sum(counts.values()) - len(counts)
    print(f"SIGKILL: {answered_before_kill} answered before the kill, {duplicates} duplicates")
    assert set(counts) == set(ids)


async def test_sigterm_mid_stream_drains_and_restart_has_no_duplicates(
    settings: Settings,
    testset: TestSet,
    worker_processes: Callable[[Settings], WorkerProcess],
) -> None:
    """SIGTERM: the worker drains, commits, exits 0; a restart answers the rest exactly once."""
    ids = await publish_requests(settings, testset[0])
    async with reply_reader(settings) as replies:
        first = worker_processes(settings)
        await wait_for(lambda: len(replies) >= KILL_AFTER, timeout=120, what="first replies")
        first.signal(signal.SIGTERM)
        assert await first.wait(timeout=60) == 0
        await wait_for(lambda: all_read(settings, replies), timeout=60, what="reply topic read")
        answered_before_stop = len(replies)
        assert answered_before_stop < N, "the stop must land mid-stream"
        assert await group_lag(settings) == N - answered_before_stop, (
            "a drained worker commits exactly what it answered"
        )

        worker_processes(settings)
        await wait_for(
            lambda: set(reply_ids(replies)) == set(ids), timeout=180, what="every request answered"
        )

        async def drained() -> bool:
            return await group_lag(settings) == 0

        await wait_for(drained, timeout=60, what="all offsets committed")
        await wait_for(lambda: all_read(settings, replies), timeout=60, what="reply topic read")
    counts = reply_ids(replies)
    duplicates = {k: v for k, v in counts.items() if v > 1}
    assert set(counts) == set(ids)
    assert duplicates == {}
