"""Sending outgoing messages on one producer, and what replaces a message that cannot be sent.

:class:`Publisher` publishes a list of :class:`~worker.outgoing.Outgoing` messages as one record
batch per partition and says, per message, what failed (retriable errors are retried
``retries`` times with backoff). :func:`remedy` is the policy for a message that finally
failed, shared by both delivery modes (:mod:`worker.replies` for at-least-once,
:mod:`worker.transactions` for exactly-once):

- an audit record: dropped with a warning (its request has its answer);
- a reply: replaced by a dead-letter copy of its request (stage ``REPLY_PUBLISH``);
- a dead-letter copy too large for its topic: replaced by a copy without the record's value and
  headers; any other failure of a dead-letter copy raises :class:`~worker.errors.WorkerError`
  (the worker stops without committing the record, which is served again later).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError
from aiokafka.partitioner import DefaultPartitioner

from worker.answers import Stage
from worker.errors import SHOWN_CHARS, WorkerError, detached
from worker.origins import Record
from worker.outgoing import Destinations, Outgoing, dead_letter, without_value

__all__ = ["TOO_LARGE", "Failed", "Publisher", "remedy", "smaller"]

TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)
"""Errors that say a record is too large for the producer or the topic."""

Failed = list[tuple[Outgoing, BaseException]]
"""Messages that were not published, each with its error."""

log = structlog.get_logger(__name__)


class Publisher:
    """Publishes messages on one producer, one record batch per partition, with retries."""

    def __init__(
        self, producer: AIOKafkaProducer, *, retries: int, retry_backoff_s: float = 0.5
    ) -> None:
        self._producer = producer
        self._retries = retries
        self._backoff = retry_backoff_s
        self._partitions: dict[str, list[int]] = {}
        self._partitioner = DefaultPartitioner()

    async def send(self, items: Sequence[Outgoing]) -> Failed:
        """Send with retries of retriable errors; return what finally failed."""
        failed: Failed = []
        pending = list(items)
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
                error = detached(result)
                for index in members:
                    errors[index] = error
        return errors

    async def _route(
        self, items: list[Outgoing], errors: list[BaseException | None]
    ) -> dict[tuple[str, int], list[int]]:
        """Item indices by (topic, partition); an item whose topic has no metadata errs."""
        by_partition: dict[tuple[str, int], list[int]] = {}
        sticky: dict[str, int] = {}
        known = self._partitions
        for index, item in enumerate(items):
            partitions = known.get(item.topic)  # an await per item only for a new topic
            if partitions is None:
                try:
                    partitions = await self._partitions_of(item.topic)
                except KafkaError as exc:
                    errors[index] = detached(exc)  # kept: not with this frame (the items)
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
            failed.set_exception(detached(exc))  # not in a cycle with the batch
            return failed

    async def _partitions_of(self, topic: str) -> list[int]:
        partitions = self._partitions.get(topic)
        if partitions is None:
            partitions = sorted(await self._producer.partitions_for(topic))
            self._partitions[topic] = partitions
        return partitions


def remedy(destinations: Destinations, item: Outgoing, error: BaseException) -> Outgoing | None:
    """What to publish instead of ``item``, which failed with ``error`` (None: nothing).

    Raises :class:`WorkerError` when a dead-letter copy cannot be published at all.
    """
    record = item.origin
    if item.topic == destinations.audit_topic and not item.is_dead_letter:
        # An audit record: its request has its answer; the record is not worth a dead-letter
        # copy (nor, for a call, possible).
        log.warning(
            "audit record not published",
            correlation_id=(item.correlation_id or "")[:SHOWN_CHARS],
            audit_topic=item.topic,
            error=repr(error)[:500],
        )
        return None
    assert isinstance(record, Record), "only a record's messages besides audit ones"
    if item.is_dead_letter:  # only a smaller copy can still go
        return smaller(item, error)
    log.error(
        "reply not published; the request is dead-lettered",
        correlation_id=(item.correlation_id or "")[:SHOWN_CHARS],
        reply_topic=item.topic,
        partition=record.tp.partition,
        offset=record.offset,
        error=repr(error)[:500],
        dead_letter_topic=destinations.dead_letter_topic,
    )
    return dead_letter(destinations, record, Stage.REPLY_PUBLISH, error)


def smaller(copy: Outgoing, error: BaseException) -> Outgoing:
    """A dead-letter copy that failed because it is too large, without the record's bytes.

    Raises :class:`WorkerError` for any other failure, or a copy already reduced: the worker
    then stops without committing the record, which is served again later.
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
