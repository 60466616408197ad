"""Stepping past records the Kafka client cannot parse (a header key that is not UTF-8, say).

aiokafka raises while parsing a fetch and, by then, may have moved other partitions past
records it never returned. :func:`rewind` puts every partition back where it stood;
:func:`step_past` then finds the partitions holding unparseable records and steps past them:
the good records before one are handed on one at a time, then offsets are skipped one by one
until a fetch parses again (the client parses a whole record batch, so the rest of the failing
record's batch is skipped too). Each skipped offset is handed to ``skipped``, which tracks it
and dead-letters its place, so it is committed only once that is done. A rebalance while
stepping (``moved``) ends it: every partition goes back to its committed offset, and the main
loop fetches again from there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

__all__ = ["rewind", "step_past"]

log = structlog.get_logger(__name__)

HandOn = Callable[[TopicPartition, Sequence[Any]], None]
"""Track fetched records of a partition and hand them on (the intake's)."""
Skipped = Callable[[TopicPartition, int, Exception], None]
"""Track an offset stepped past and dead-letter its place (the intake's)."""


async def rewind(consumer: AIOKafkaConsumer, before: dict[TopicPartition, int]) -> None:
    """Put every assigned partition back where it stood before a fetch that failed.

    A partition assigned during the fetch goes back to its committed offset (or the start, as
    the group's reset policy says): nothing of it was handed on yet.
    """
    for tp in consumer.assignment():
        offset = before.get(tp)
        if offset is None:
            offset = await consumer.committed(tp)
        if offset is None:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, offset)


async def recover(
    consumer: AIOKafkaConsumer,
    error: Exception,
    before: dict[TopicPartition, int],
    *,
    fetch_max_records: int,
    hand_on: HandOn,
    skipped: Skipped,
    moved: Callable[[], bool],
) -> None:
    """A fetch failed to parse a record: rewind to ``before`` (empty: the commits), step past.

    After a rebalance the positions saved before the fetch are stale (the partitions may have
    come back, to be read from their commits): pass ``{}`` then.
    """
    await rewind(consumer, before)
    await step_past(
        consumer, error, fetch_max_records=fetch_max_records, hand_on=hand_on,
        skipped=skipped, moved=moved,
    )  # fmt: skip


async def step_past(
    consumer: AIOKafkaConsumer,
    error: Exception,
    *,
    fetch_max_records: int,
    hand_on: HandOn,
    skipped: Skipped,
    moved: Callable[[], bool],
) -> None:
    """Find the partitions whose next records cannot be parsed, and step past those records.

    Each partition is fetched on its own; a healthy one is rewound (the main loop fetches it
    again); a failing one is stepped past (see the module docstring).
    """
    for tp in sorted(consumer.assignment()):
        start = await consumer.position(tp)
        try:
            await consumer.getmany(tp, timeout_ms=1000, max_records=fetch_max_records)
        except KafkaError:
            raise
        except Exception:  # noqa: BLE001 - this partition holds it
            if moved():
                await rewind(consumer, {})
                return
            consumer.seek(tp, start)
            await _skip(consumer, tp, error, hand_on=hand_on, skipped=skipped, moved=moved)
        else:
            if moved():
                await rewind(consumer, {})
                return
            consumer.seek(tp, start)
        if moved():
            await rewind(consumer, {})
            return


async def _skip(
    consumer: AIOKafkaConsumer,
    tp: TopicPartition,
    error: Exception,
    *,
    hand_on: HandOn,
    skipped: Skipped,
    moved: Callable[[], bool],
) -> None:
    while True:  # the good records before it, one at a time (at most one fetch's worth)
        try:
            fetched = await consumer.getmany(tp, timeout_ms=1000, max_records=1)
        except KafkaError:
            raise
        except Exception:  # noqa: BLE001 - reached it
            break
        if moved():  # what was fetched belongs to the partition's next reading
            await rewind(consumer, {})
            return
        if not fetched:
            return
        hand_on(tp, fetched.get(tp, []))
    start = await consumer.position(tp)
    end = (await consumer.end_offsets([tp]))[tp]
    offset = start
    while offset < end:
        offset += 1
        consumer.seek(tp, offset)
        try:
            await consumer.getmany(tp, timeout_ms=1000, max_records=1)
        except KafkaError:
            raise
        except Exception:  # noqa: BLE001 - still inside the unparseable batch
            if moved():
                await rewind(consumer, {})
                return
            continue
        if moved():
            await rewind(consumer, {})
            return
        consumer.seek(tp, offset)  # parses again from here: the main loop goes on
        break
    log.error(
        "records the Kafka client cannot parse were skipped and dead-lettered",
        partition=f"{tp.topic}[{tp.partition}]",
        offsets=f"{start}..{offset - 1}",
        error=repr(error)[:500],
    )
    for offset_skipped in range(start, offset):
        skipped(tp, offset_skipped, error)
