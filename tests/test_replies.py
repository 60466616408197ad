"""Unit tests of the replier's helpers that need no broker: the topic cache."""

from __future__ import annotations

from aiokafka.errors import KafkaConnectionError

from worker.replies import TopicCache


async def test_topic_cache_fetches_at_most_once_per_interval() -> None:
    """Known topics need no fetch; unknown names share one fetch per interval, however many."""
    calls = 0
    topics = {"a"}
    now = 0.0

    async def fetch() -> set[str]:
        nonlocal calls
        calls += 1
        return set(topics)

    cache = TopicCache(fetch, refresh_s=5.0, clock=lambda: now)
    assert await cache.exists("a")
    assert await cache.exists("a")
    assert calls == 1
    for i in range(1000):
        assert not await cache.exists(f"missing-{i}")
    assert calls == 1, "one fetch per interval whatever the number of unknown names"
    topics.add("b")
    assert not await cache.exists("b"), "a new topic is seen at the next refresh"
    now = 5.0
    assert await cache.exists("b")
    assert calls == 2


async def test_topic_cache_survives_a_failing_fetch() -> None:
    """A metadata fetch that raises a Kafka error answers 'unknown' and retries later."""
    now = 0.0
    fail = True

    async def fetch() -> set[str]:
        if fail:
            raise KafkaConnectionError("broker gone")
        return {"a"}

    cache = TopicCache(fetch, refresh_s=1.0, clock=lambda: now)
    assert not await cache.exists("a")
    fail, now = False, 1.0
    assert await cache.exists("a")
