"""Unit tests of the replier's helpers that need no broker: the topic cache."""

from __future__ import annotations

from worker.replies import TopicCache


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
