"""Kafka glue: clients built with explicit, safe settings, and the worker's topics.

aiokafka's defaults do not suit a worker that must not lose requests, so every setting that
matters is spelt out here:

- consumer: ``enable_auto_commit=False`` (auto-commit commits what was handed out, not what was
  answered; the worker commits explicit offsets itself), ``auto_offset_reset="earliest"`` (a new
  group answers requests published before any worker started), ``isolation_level=
  "read_committed"`` (requests from aborted producer transactions are never served);
- producer: ``acks="all"`` and ``enable_idempotence=True`` (a reply is acknowledged only once it
  is on every in-sync replica, and retries do not duplicate it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from worker.errors import ConfigError
from worker.settings import KafkaSettings

__all__ = [
    "Headers",
    "assign_all",
    "consumer_config",
    "ensure_topics",
    "header",
    "make_consumer",
    "make_producer",
    "producer_config",
]

log = structlog.get_logger(__name__)

Headers = Sequence[tuple[str, bytes]]

_TOPIC_ALREADY_EXISTS = 36


def header(headers: Headers | None, name: str) -> bytes | None:
    """The last value of header ``name``, or None."""
    found = None
    for key, value in headers or ():
        if key == name:
            found = value
    return found


def _common(settings: KafkaSettings) -> dict[str, Any]:
    return {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "request_timeout_ms": settings.request_timeout_ms,
    }


def consumer_config(settings: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for the worker's group consumer."""
    return {
        **_common(settings),
        "group_id": settings.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        "max_poll_interval_ms": settings.max_poll_interval_ms,
        "max_poll_records": settings.fetch_max_records,
    }


def producer_config(settings: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for the reply producer."""
    return {
        **_common(settings),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": settings.linger_ms,
    }


def make_consumer(settings: KafkaSettings, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer with :func:`consumer_config` (not started, not subscribed)."""
    return AIOKafkaConsumer(**{**consumer_config(settings), **overrides})


def make_producer(settings: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    """A producer with :func:`producer_config` (not started)."""
    return AIOKafkaProducer(**{**producer_config(settings), **overrides})


async def assign_all(
    consumer: AIOKafkaConsumer, topic: str, partitions: Iterable[int], *, from_end: bool
) -> None:
    """Assign every partition of ``topic`` to a group-less consumer, from its end or beginning.

    Positions are resolved before returning, so nothing published afterwards is missed.
    """
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    if from_end:
        await consumer.seek_to_end(*tps)
    else:
        await consumer.seek_to_beginning(*tps)
    for tp in tps:
        await consumer.position(tp)


async def ensure_topics(settings: KafkaSettings, topics: Iterable[str]) -> None:
    """Create missing ``topics``; raise :class:`ConfigError` if topics are managed elsewhere."""
    wanted = sorted(set(topics))
    admin = AIOKafkaAdminClient(**_common(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if not missing:
            return
        if not settings.manage_topics:
            raise ConfigError(
                f"topic(s) {', '.join(missing)} do not exist on {settings.bootstrap_servers}; "
                "create them, or set WORKER_KAFKA__MANAGE_TOPICS=true to let the worker do it"
            )
        response = await admin.create_topics(
            [
                NewTopic(t, settings.topic_partitions, settings.topic_replication_factor)
                for t in missing
            ]
        )
        for topic, code, *rest in response.topic_errors:
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                message = rest[0] if rest else ""
                raise ConfigError(f"cannot create topic {topic!r}: error {code} {message}")
        log.info("topics created", topics=missing, partitions=settings.topic_partitions)
    finally:
        await admin.close()
