"""At-least-once publishing: what :mod:`worker.outgoing` built, records marked done once acked.

Policy when a reply cannot be published:

1. its topic does not exist (checked before sending, so a bad ``reply_to`` never stalls the
   other replies): no retry;
2. the send fails with a retriable Kafka error: retried ``retries`` times with backoff;
3. otherwise, or when the retries are spent: the *request* record is copied to the dead-letter
   topic with context headers (stage ``REPLY_PUBLISH``), and the failure is logged with the
   correlation id.

A record is marked done only when everything published for it in a group (reply, dead-letter
copy) is acknowledged. A dead-letter copy too large for the dead-letter topic goes again
without the record's value and headers (headers say their sizes and why). If a dead-letter
copy cannot be published otherwise, :class:`Replier.run` raises: the worker stops, nothing of
that record is committed, and it is served again later. (Sending and that policy:
:mod:`worker.publishing`; exactly-once publishing: :mod:`worker.transactions`.)

Dead-letter headers follow Kafka Connect's names (``__connect.errors.*``, UTF-8 strings), so
existing DLQ tooling reads them; the dead-letter record keeps the original key, value, headers
and timestamp.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from worker.inbox import Inbox
from worker.offsets import OffsetTracker
from worker.origins import Record
from worker.outgoing import Destinations, Outgoing
from worker.publishing import TOO_LARGE, Failed, Publisher, remedy

__all__ = ["TOO_LARGE", "Replier", "TopicCache"]

log = structlog.get_logger(__name__)


class Replier:
    """Publishes outgoing messages in groups; marks records done when all of theirs are acked."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        tracker: OffsetTracker[TopicPartition],
        on_published: Callable[[Sequence[Outgoing]], None],
        *,
        destinations: Destinations,
        retries: int,
        topic_exists: Callable[[str], Awaitable[bool]],
        retry_backoff_s: float = 0.5,
    ) -> None:
        self._tracker = tracker
        self._on_published = on_published
        self._destinations = destinations
        self.topic_exists = topic_exists
        """Whether a topic exists (the same answer for every delivery mode)."""
        self._publisher = Publisher(producer, retries=retries, retry_backoff_s=retry_backoff_s)
        self._inbox: Inbox[Outgoing] = Inbox()

    def submit(self, items: Sequence[Outgoing]) -> None:
        """Queue messages; all messages of one record must be submitted in one call."""
        self._inbox.extend(items)

    def close(self) -> None:
        """Publish what is queued, then let :meth:`run` return."""
        self._inbox.close()

    async def run(self) -> None:
        """Publish what has arrived, a group at a time, until closed and empty."""
        while group := await self._inbox.take_all():
            await self._publish(group)

    async def _publish(self, group: list[Outgoing]) -> None:
        group = [o for o in group if self._current(o)]  # a revoke may have passed meanwhile
        if not group:
            return
        missing = {t for t in {o.topic for o in group} if not await self.topic_exists(t)}
        failed: Failed = [
            (o, KafkaError(f"topic {o.topic!r} does not exist"))
            for o in group
            if o.topic in missing
        ]
        failed += await self._publisher.send([o for o in group if o.topic not in missing])
        copies = await self._replace(failed)
        for item in group:
            if isinstance(item.origin, Record) and self._current(item):  # calls: not tracked
                self._tracker.done(item.origin.tp, item.origin.offset)
        not_published = {id(item) for item, _ in failed}
        self._on_published([o for o in group if id(o) not in not_published] + copies)

    async def _replace(self, failed: Failed) -> list[Outgoing]:
        """Publish the remedies of failed messages (:func:`~worker.publishing.remedy`)."""
        published: list[Outgoing] = []
        while failed:
            copies = [
                copy
                for item, error in failed
                if (copy := remedy(self._destinations, item, error)) is not None
            ]
            failed = await self._publisher.send(copies)
            lost = {id(item) for item, _ in failed}
            published += [copy for copy in copies if id(copy) not in lost]
        return published

    def _current(self, item: Outgoing) -> bool:
        """False for a message about a record of a partition revoked since it was fetched."""
        origin = item.origin
        return not isinstance(origin, Record) or self._tracker.current(origin.tp, origin.generation)


class TopicCache:
    """Answers "does this topic exist?" from metadata fetched at most once per ``refresh_s``.

    However many unknown names requests bring, the broker is asked at most once per interval
    and nothing is kept per name: the only state is the cluster's own topic list. A failed
    fetch answers "unknown" for now (the reply is dead-lettered, the worker goes on).
    """

    def __init__(
        self,
        fetch_topics: Callable[[], Awaitable[set[str]]],
        *,
        refresh_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch_topics
        self._known: set[str] = set()
        self._refresh = refresh_s
        self._clock = clock
        self._fetched_at: float | None = None
        self._fetching = asyncio.Lock()

    async def exists(self, topic: str) -> bool:
        """True if the topic exists (per metadata no older than ``refresh_s`` when unknown)."""
        if topic in self._known:
            return True
        async with self._fetching:  # callers at once share one fetch (exactly-once lanes)
            if topic in self._known:
                return True
            now = self._clock()
            if self._fetched_at is not None and now - self._fetched_at < self._refresh:
                return False
            self._fetched_at = now
            try:
                self._known = set(await self._fetch())
            except KafkaError as exc:
                log.warning("topic metadata fetch failed", error=repr(exc)[:500])
                return False
            return topic in self._known
