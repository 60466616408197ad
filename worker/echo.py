"""The echo worker: the transport limit the benchmark compares the real worker with.

``python -m worker echo`` consumes the requests topic and publishes every value unchanged to
the reply topic, keeping key and headers: a plain aiokafka loop with the same safety settings
as the worker (group consumer without auto-commit, acks=all idempotent producer, commits after
the acks). No decoding, no model: whatever the real worker does beyond this costs throughput.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition

from worker.kafka import ensure_topics, make_consumer, make_producer
from worker.settings import Settings

__all__ = ["run_echo"]


async def run_echo(settings: Settings, stop: asyncio.Event) -> None:
    """Echo requests to replies until ``stop`` is set."""
    kafka = settings.kafka
    await ensure_topics(kafka, [kafka.requests_topic, kafka.replies_topic])
    consumer = make_consumer(kafka)
    producer = make_producer(kafka)
    await producer.start()
    consumer.subscribe([kafka.requests_topic])
    await consumer.start()
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=kafka.fetch_max_records)
            futures: list[asyncio.Future[Any]] = []
            positions: dict[TopicPartition, int] = {}
            for tp, records in batches.items():
                futures += [
                    await producer.send(
                        kafka.replies_topic, r.value, key=r.key, headers=list(r.headers)
                    )
                    for r in records
                ]
                positions[tp] = records[-1].offset + 1
            if futures:
                await asyncio.gather(*futures)
                await consumer.commit(positions)
    finally:
        await consumer.stop()
        await producer.stop()
