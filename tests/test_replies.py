"""Unit tests of the replier without a broker: publish retries, dead-lettering, topic cache."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import (
    KafkaConnectionError,
    NotLeaderForPartitionError,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
)

from worker.answers import Answer, Stage
from worker.domain import InferenceResponse
from worker.errors import WorkerError
from worker.formats import PLAIN
from worker.offsets import OffsetTracker
from worker.origins import Record
from worker.outgoing import Destinations, Outgoing, messages
from worker.replies import Replier, TopicCache


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


async def test_topic_cache_callers_at_once_share_one_fetch() -> None:
    """Callers asking while a fetch runs wait for it: none is told 'unknown' meanwhile."""
    release = asyncio.Event()
    calls = 0

    async def fetch() -> set[str]:
        nonlocal calls
        calls += 1
        await release.wait()
        return {"a"}

    cache = TopicCache(fetch, refresh_s=5.0, clock=lambda: 0.0)
    asking = [asyncio.create_task(cache.exists("a")) for _ in range(3)]
    await asyncio.sleep(0)  # let them all ask (no condition to wait for: the fetch is held)
    release.set()
    assert await asyncio.gather(*asking) == [True, True, True]
    assert calls == 1


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


class FakeBatch:
    """A record batch that holds whatever is appended."""

    def __init__(self) -> None:
        self.records: list[bytes | None] = []

    def append(self, *, key: Any, value: bytes | None, timestamp: Any, headers: Any) -> object:  # noqa: ARG002 - aiokafka's signature
        self.records.append(value)
        return object()


class FakeProducer:
    """Answers each ``send_batch`` with the next error of a script (None: acknowledged)."""

    def __init__(self, script: list[BaseException | None]) -> None:
        self.script = script
        self.sent: list[tuple[str, list[bytes | None]]] = []

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def partitions_for(self, _topic: str) -> set[int]:
        return {0}

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> Any:
        assert partition == 0
        self.sent.append((topic, batch.records))
        error = self.script.pop(0) if self.script else None
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
        return done


DEST = Destinations("replies", "dlq", "g", requests_topic="requests")
TP = TopicPartition("requests", 0)


def replier_over(
    producer: FakeProducer,
    tracker: OffsetTracker[TopicPartition],
    published: list[Outgoing],
    destinations: Destinations = DEST,
    retries: int = 0,
) -> Replier:
    """A Replier over a scripted producer whose every topic exists."""

    async def exists(_topic: str) -> bool:
        return True

    return Replier(
        producer, tracker, published.extend, destinations=destinations, retries=retries,
        topic_exists=exists, retry_backoff_s=0.001,
    )  # fmt: skip


async def publish_one(
    script: list[BaseException | None],
    retries: int = 2,
    tracker: OffsetTracker[TopicPartition] | None = None,
) -> tuple[FakeProducer, OffsetTracker[TopicPartition], list[Outgoing]]:
    """Publish one reply through a Replier over a scripted producer."""
    producer = FakeProducer(script)
    tracker = tracker or OffsetTracker()
    tracker.track(TP, 5)
    published: list[Outgoing] = []
    replier = replier_over(producer, tracker, published, retries=retries)
    source = Record(TP, 5, b"k", b"request", [], 0)
    replier.submit(messages(DEST, PLAIN, Answer(source, InferenceResponse("r-1", "m"))))
    replier.close()
    await replier.run()
    return producer, tracker, published


async def test_a_retriable_publish_error_is_retried_until_acknowledged() -> None:
    """Retriable send errors are retried; the reply then goes out once, and the record is done."""
    producer, tracker, published = await publish_one(
        [NotLeaderForPartitionError(), RequestTimedOutError()], retries=2
    )
    assert [topic for topic, _ in producer.sent] == ["replies"] * 3
    assert [o.topic for o in published] == ["replies"]
    assert tracker.pending == 0


async def test_spent_retries_dead_letter_the_request() -> None:
    """When the retries are spent, the request record goes to the dead-letter topic instead."""
    producer, tracker, published = await publish_one([NotLeaderForPartitionError()] * 3, retries=2)
    assert [topic for topic, _ in producer.sent] == ["replies"] * 3 + ["dlq"]
    assert producer.sent[-1][1] == [b"request"]
    assert [(o.topic, o.stage) for o in published] == [("dlq", Stage.REPLY_PUBLISH)]
    assert tracker.pending == 0


async def test_a_non_retriable_publish_error_is_not_retried() -> None:
    """A non-retriable error dead-letters the request at once."""
    producer, _, published = await publish_one([TopicAuthorizationFailedError()], retries=5)
    assert [topic for topic, _ in producer.sent] == ["replies", "dlq"]
    assert [o.topic for o in published] == ["dlq"]


async def test_an_unpublishable_dead_letter_copy_stops_without_marking_done() -> None:
    """If the dead-letter copy fails too, the replier raises and the record stays pending."""
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    denied = [TopicAuthorizationFailedError(), TopicAuthorizationFailedError()]
    with pytest.raises(WorkerError, match="not published"):
        await publish_one(denied, tracker=tracker)
    assert tracker.pending == 1
    assert tracker.committable() == {}


async def test_an_audit_record_that_cannot_be_published_dead_letters_nothing() -> None:
    """The reply is out; its audit record failing (a deleted audit topic) costs only that."""
    producer = FakeProducer([None, TopicAuthorizationFailedError()])
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    tracker.track(TP, 5)
    published: list[Outgoing] = []
    audited = Destinations("replies", "dlq", "g", audit_topic="audit", requests_topic="requests")
    replier = replier_over(producer, tracker, published, audited)
    source = Record(TP, 5, b"k", b"request", [], 0)
    replier.submit(messages(audited, PLAIN, Answer(source, InferenceResponse("r-1", "m"))))
    replier.close()
    await replier.run()
    assert [topic for topic, _ in producer.sent] == ["replies", "audit"], "no dead-letter copy"
    assert [o.topic for o in published] == ["replies"]
    assert tracker.pending == 0, "the record is done"


async def test_messages_of_a_partition_revoked_since_are_never_published() -> None:
    """A reply queued before its partition was revoked is dropped, and marks no offset done."""
    producer = FakeProducer([])
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    tracker.track(TP, 5)
    stale = Record(TP, 5, b"k", b"request", [], 0, tracker.generation(TP))
    tracker.forget([TP])  # revoked...
    tracker.track(TP, 5)  # ...and handed back: offset 5 is to be served again
    published: list[Outgoing] = []
    replier = replier_over(producer, tracker, published)
    replier.submit(messages(DEST, PLAIN, Answer(stale, InferenceResponse("r-1", "m"))))
    replier.close()
    await replier.run()
    assert producer.sent == []
    assert published == []
    assert tracker.pending == 1, "the new generation's offset 5 is still to be answered"
