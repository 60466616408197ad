"""Publishing what :mod:`worker.outgoing` built, and marking records done once acknowledged.

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
that record is committed, and it is served again later.

Dead-letter headers follow Kafka Connect's names (``__connect.errors.*``, UTF-8 strings), so
existing DLQ tooling reads them; the dead-letter record keeps the original key, value, headers
and timestamp.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError
from aiokafka.partitioner import DefaultPartitioner

from worker.answers import Stage
from worker.errors import SHOWN_CHARS, WorkerError
from worker.inbox import Inbox
from worker.offsets import OffsetTracker
from worker.origins import Record
from worker.outgoing import Destinations, Outgoing, dead_letter, without_value

__all__ = ["TOO_LARGE", "Replier", "TopicCache"]

TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)
"""Errors that say a record is too large for the producer or the topic."""

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
        self._producer = producer
        self._tracker = tracker
        self._on_published = on_published
        self._destinations = destinations
        self._retries = retries
        self._topic_exists = topic_exists
        self._backoff = retry_backoff_s
        self._inbox: Inbox[Outgoing] = Inbox()
        self._partitions: dict[str, list[int]] = {}
        self._partitioner = DefaultPartitioner()

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
        missing = {t for t in {o.topic for o in group} if not await self._topic_exists(t)}
        ready = [o for o in group if o.topic not in missing]
        failed = [
            (o, KafkaError(f"topic {o.topic!r} does not exist"))
            for o in group
            if o.topic in missing
        ]
        failed += await self._send(ready)
        copies = []
        for item, error in failed:
            record = item.origin
            if item.topic == self._destinations.audit_topic and not item.is_dead_letter:
                # An audit record: its request has its answer; the record is not worth a
                # dead-letter copy (nor, for a call, possible).
                log.warning(
                    "audit record not published",
                    correlation_id=(item.correlation_id or "")[:SHOWN_CHARS],
                    audit_topic=item.topic,
                    error=repr(error)[:500],
                )
                continue
            assert isinstance(record, Record), "only a record's messages besides audit ones"
            if item.is_dead_letter:  # a DECODE-stage copy: only a smaller copy can still go
                copies.append(self._smaller(item, error))
                continue
            log.error(
                "reply not published; the request is dead-lettered",
                correlation_id=(item.correlation_id or "")[:SHOWN_CHARS],
                reply_topic=item.topic,
                partition=record.tp.partition,
                offset=record.offset,
                error=repr(error),
                dead_letter_topic=self._destinations.dead_letter_topic,
            )
            copies.append(dead_letter(self._destinations, record, Stage.REPLY_PUBLISH, error))
        if copies:
            lost = await self._send(copies)
            if lost:
                smaller = [self._smaller(item, error) for item, error in lost]
                unsent = await self._send(smaller)
                if unsent:
                    item, error = unsent[0]
                    raise WorkerError(
                        f"dead-letter copy of {item.origin.where()} not published to "
                        f"{item.topic!r}: {error!r}; stopping without committing it"
                    ) from error
                lost_ids = {id(item) for item, _ in lost}
                copies = [c for c in copies if id(c) not in lost_ids] + smaller
        for item in group:
            if isinstance(item.origin, Record) and self._current(item):  # calls: not tracked
                self._tracker.done(item.origin.tp, item.origin.offset)
        not_published = {id(item) for item, _ in failed}
        self._on_published([o for o in group if id(o) not in not_published] + copies)

    def _current(self, item: Outgoing) -> bool:
        """False for a message about a record of a partition revoked since it was fetched."""
        origin = item.origin
        return not isinstance(origin, Record) or self._tracker.current(origin.tp, origin.generation)

    @staticmethod
    def _smaller(copy: Outgoing, error: BaseException) -> Outgoing:
        """A dead-letter copy that failed because it is too large, without the record's bytes.

        Raises :class:`WorkerError` for any other failure, or a copy already reduced: the
        worker then stops without committing the record, which is served again later.
        """
        if copy.value_dropped or not isinstance(error, TOO_LARGE):
            raise WorkerError(
                f"dead-letter copy of {copy.origin.where()} not published to {copy.topic!r}: "
                f"{error!r}; stopping without committing it"
            ) from error
        log.error(
            "dead-letter copy too large; publishing it without the record's value and headers",
            origin=copy.origin.where(),
            error=repr(error)[:500],
        )
        return without_value(copy, error)

    async def _send(self, items: list[Outgoing]) -> list[tuple[Outgoing, BaseException]]:
        """Send with retries of retriable errors; return what finally failed."""
        failed: list[tuple[Outgoing, BaseException]] = []
        pending = items
        while pending:
            errors = await self._send_batches(pending)
            retry = []
            for item, error in zip(pending, errors, strict=True):
                if error is None:
                    continue
                if getattr(error, "retriable", False) and item.attempts < self._retries:
                    item.attempts += 1
                    retry.append(item)
                else:
                    failed.append((item, error))
            if retry:
                self._partitions.clear()  # metadata may have moved on
                delay = self._backoff * 2 ** (retry[0].attempts - 1)
                log.warning("retrying publish", count=len(retry), delay_s=delay)
                await asyncio.sleep(delay)
            pending = retry
        return failed

    async def _send_batches(self, items: list[Outgoing]) -> list[BaseException | None]:
        """Publish as one record batch per partition (``send_batch``); an error per item.

        Per-message ``send()`` costs a metadata check, a partitioner call and a future per
        record; a batch per partition costs them once. Keyed records go to the partition the
        Java client's murmur2 partitioner would pick; unkeyed ones of a group share a
        partition (as Kafka's sticky partitioner does).
        """
        errors: list[BaseException | None] = [None] * len(items)
        sends: list[tuple[list[int], asyncio.Future[Any]]] = []
        for (topic, partition), indices in (await self._route(items, errors)).items():
            batch = self._producer.create_batch()
            members: list[int] = []
            for index in indices:
                item = items[index]
                if self._append(batch, item) is None:
                    if members:
                        sends.append((members, await self._submit(batch, topic, partition)))
                    batch, members = self._producer.create_batch(), []
                    if self._append(batch, item) is None:
                        errors[index] = MessageSizeTooLargeError(
                            f"a {len(item.value or b'')}-byte record does not fit a batch"
                        )
                        continue
                members.append(index)
            if members:
                sends.append((members, await self._submit(batch, topic, partition)))
        results = await asyncio.gather(*(f for _, f in sends), return_exceptions=True)
        for (members, _), result in zip(sends, results, strict=True):
            if isinstance(result, BaseException):
                for index in members:
                    errors[index] = result
        return errors

    async def _route(
        self, items: list[Outgoing], errors: list[BaseException | None]
    ) -> dict[tuple[str, int], list[int]]:
        """Item indices by (topic, partition); an item whose topic has no metadata errs."""
        by_partition: dict[tuple[str, int], list[int]] = {}
        sticky: dict[str, int] = {}
        for index, item in enumerate(items):
            try:
                partitions = await self._partitions_of(item.topic)
            except KafkaError as exc:
                errors[index] = exc
                continue
            key = item.key
            if key is None:
                partition = sticky.setdefault(item.topic, random.choice(partitions))  # noqa: S311
            else:
                partition = self._partitioner(key, partitions, partitions)
            by_partition.setdefault((item.topic, partition), []).append(index)
        return by_partition

    @staticmethod
    def _append(batch: Any, item: Outgoing) -> Any:
        return batch.append(
            key=item.key, value=item.value, timestamp=item.timestamp_ms,
            headers=item.headers,
        )  # fmt: skip

    async def _submit(self, batch: Any, topic: str, partition: int) -> asyncio.Future[Any]:
        try:
            return await self._producer.send_batch(  # type: ignore[no-any-return]
                batch, topic, partition=partition
            )
        except KafkaError as exc:
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed

    async def _partitions_of(self, topic: str) -> list[int]:
        partitions = self._partitions.get(topic)
        if partitions is None:
            partitions = sorted(await self._producer.partitions_for(topic))
            self._partitions[topic] = partitions
        return partitions


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

    async def exists(self, topic: str) -> bool:
        """True if the topic exists (per metadata no older than ``refresh_s`` when unknown)."""
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
