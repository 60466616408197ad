"""Unit tests of the reply-side helpers that need no broker: topic cache and DLQ headers."""

from __future__ import annotations

from aiokafka import TopicPartition

from worker.errors import DecodeError
from worker.replies import DLQ_HEADER_PREFIX, Source, Stage, TopicCache, dead_letter


async def test_topic_cache_remembers_hits_and_rechecks_misses_after_ttl() -> None:
    """Known topics need no metadata call; a miss is rechecked only after its TTL."""
    calls = 0
    topics = {"a"}

    async def fetch() -> set[str]:
        nonlocal calls
        calls += 1
        return set(topics)

    cache = TopicCache(fetch, miss_ttl_s=3600)
    assert await cache.exists("a")
    assert await cache.exists("a")
    assert calls == 1
    assert not await cache.exists("b")
    topics.add("b")
    assert not await cache.exists("b"), "a fresh miss is cached"
    assert calls == 2
    expired = TopicCache(fetch, miss_ttl_s=0)
    assert await expired.exists("b")


def test_dead_letter_copy_keeps_the_record_and_adds_connect_headers() -> None:
    """The DLQ copy keeps key, value, headers and timestamp, plus __connect.errors.* context."""
    source = Source(
        TopicPartition("requests", 4), 17, b"key", b"value", [("h", b"1")], 1_700_000_000_000
    )
    copy = dead_letter(source, "dlq", Stage.DECODE, DecodeError("bad bytes"), group_id="g")
    headers = dict(copy.headers)
    assert copy.topic == "dlq"
    assert copy.value == b"value"
    assert copy.timestamp_ms == 1_700_000_000_000
    assert copy.is_dead_letter
    assert headers["h"] == b"1"
    assert headers[DLQ_HEADER_PREFIX + "topic"] == b"requests"
    assert headers[DLQ_HEADER_PREFIX + "partition"] == b"4"
    assert headers[DLQ_HEADER_PREFIX + "offset"] == b"17"
    assert headers[DLQ_HEADER_PREFIX + "stage"] == b"DECODE"
    assert headers[DLQ_HEADER_PREFIX + "connector.name"] == b"g"
    assert headers[DLQ_HEADER_PREFIX + "exception.class.name"] == b"worker.errors.DecodeError"
    assert b"bad bytes" in headers[DLQ_HEADER_PREFIX + "exception.message"]


def test_dead_letter_of_an_empty_record_still_has_a_value() -> None:
    """A record with neither key nor value is copied with an empty value (Kafka needs one)."""
    source = Source(TopicPartition("t", 0), 0, None, None, [], 0)
    copy = dead_letter(source, "dlq", Stage.DECODE, DecodeError("empty"), group_id="g")
    assert copy.value == b""
