"""Intake: the consumer, its fetch loop with flow control, offset commits and rebalances.

:class:`Intake` owns the group consumer, the :class:`~worker.offsets.OffsetTracker` and the
assignment. It fetches records, tracks each, and hands it on as a
:class:`~worker.origins.Record` to the pipeline (:meth:`~worker.pipeline.Pipeline.dispatch`);
the replier marks records done
once their replies are acknowledged, and the commit loop commits, per partition, the lowest
offset not yet answered. At the in-flight bound (records and calls together:
:class:`~worker.inflight.InFlight`) it pauses its partitions (no background buffering either)
until answers catch up.

On a rebalance (eager: every partition is revoked first), it waits, bounded by the shutdown
timeout, for the revoked partitions' requests to be answered, commits them, and forgets them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from worker.headers import Headers
from worker.inflight import InFlight
from worker.kafka import make_consumer
from worker.metrics import Metrics
from worker.offsets import OffsetTracker
from worker.origins import Record
from worker.progress import Progress
from worker.settings import KafkaSettings, RuntimeSettings

__all__ = ["FETCH_RETRY_S", "Dispatcher", "Intake"]

FETCH_RETRY_S = 0.5
"""Pause after a failed fetch before the next one."""

log = structlog.get_logger(__name__)


class Dispatcher(Protocol):
    """Where intake hands records: the pipeline (:class:`worker.pipeline.Pipeline`)."""

    def dispatch(self, origin: Record, /) -> None:
        """Take one fetched record (it is tracked until its answer is acknowledged)."""

    def unparseable(self, record: Record, error: Exception, /) -> None:
        """Dead-letter the place of a record the Kafka client could not parse."""


class Intake:
    """Fetches request records for the pipeline; commits what is answered."""

    def __init__(
        self,
        kafka: KafkaSettings,
        runtime: RuntimeSettings,
        in_flight: InFlight,
        *,
        metrics: Metrics,
        progress: Progress,
    ) -> None:
        self._kafka = kafka
        self._runtime = runtime
        self._in_flight = in_flight
        self._metrics = metrics
        self._progress = progress
        self.tracker: OffsetTracker[TopicPartition] = in_flight.records
        self.consumer: AIOKafkaConsumer
        """The group consumer; made by :meth:`running` (aiokafka needs the running loop)."""
        self.assigned: set[TopicPartition] = set()
        """Partitions assigned now."""
        self.joined = False
        """True once the consumer has joined its group and received an assignment."""

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Intake]:
        """Subscribed and started while open; on exit the consumer leaves the group."""
        self.consumer = make_consumer(self._kafka)
        self.consumer.subscribe([self._kafka.requests_topic], listener=_Listener(self))
        try:
            await self.consumer.start()
            yield self
        finally:
            await self.consumer.stop()
            self.assigned.clear()

    async def consume(
        self,
        stopping: asyncio.Event,
        pipeline: Dispatcher,
        prepare: Callable[[list[tuple[bytes | None, Headers]]], Awaitable[None]] | None = None,
    ) -> None:
        """Fetch records and hand each to ``pipeline`` until ``stopping`` is set.

        Records the Kafka client cannot parse (a header key that is not UTF-8, say) are
        stepped past: each offset skipped goes to ``pipeline.unparseable`` (bytes unknown) and is
        committed like an answered record once that is done. ``prepare`` is awaited with each
        fetched batch's (value, headers) before any of it is dispatched (schema lookups);
        records of partitions revoked meanwhile are left to their new owner.
        """
        consumer = self.consumer
        max_records = self._kafka.fetch_max_records
        paused = False
        while not stopping.is_set():
            room = self._in_flight.room()
            if room <= 0:
                if not paused:
                    # Stop the background fetcher too, not just our reads: no buffering.
                    consumer.pause(*consumer.assignment())
                    paused = True
                    self._metrics.fetch_pauses.inc()
                await self._progress.wait(0.5)
                continue
            if paused:
                consumer.resume(*consumer.paused())
                paused = False
            # Where each partition stands before the fetch: a fetch that fails to parse one
            # partition has already moved the others past records it never returned.
            before = {tp: await consumer.position(tp) for tp in consumer.assignment()}
            try:
                fetched = await consumer.getmany(timeout_ms=100, max_records=min(room, max_records))
            except KafkaError as exc:  # transient (a rebalance, a reset); the watchdog bounds it
                self._metrics.fetch_errors.inc()
                log.warning("fetch failed; retrying", error=repr(exc)[:500])
                await asyncio.sleep(FETCH_RETRY_S)
                continue
            except Exception as exc:  # noqa: BLE001 - a record the client cannot parse
                self._metrics.fetch_errors.inc()
                await self._rewind(before)
                await self._step_past(exc, pipeline)
                continue
            if prepare is not None and fetched:
                await prepare([(r.value, r.headers) for rs in fetched.values() for r in rs])
                assigned = consumer.assignment()
                fetched = {tp: rs for tp, rs in fetched.items() if tp in assigned}
            for tp, records in fetched.items():
                self._hand_on(tp, records, pipeline)

    def _hand_on(self, tp: TopicPartition, records: Sequence[Any], pipeline: Dispatcher) -> None:
        """Track fetched records and hand each on as a :class:`~worker.origins.Record`."""
        for r in records:
            self.tracker.track(tp, r.offset)
            pipeline.dispatch(Record(tp, r.offset, r.key, r.value, r.headers, r.timestamp))

    async def _rewind(self, before: dict[TopicPartition, int]) -> None:
        """Put every assigned partition back where it stood before a fetch that failed.

        A partition assigned during the fetch goes back to its committed offset (or the start,
        as the group's reset policy says): nothing of it was handed on yet.
        """
        consumer = self.consumer
        for tp in consumer.assignment():
            offset = before.get(tp)
            if offset is None:
                offset = await consumer.committed(tp)
            if offset is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, offset)

    async def _step_past(self, error: Exception, pipeline: Dispatcher) -> None:
        """Find the partitions whose next records cannot be parsed, and step past those records.

        Each partition is fetched on its own; a healthy one is rewound (the main loop fetches
        it again). In a failing one, the records before the unparseable one are fetched one at
        a time and dispatched; then offsets are skipped one by one until a fetch parses again.
        The client parses a whole record batch, so the rest of the failing record's batch is
        skipped too. Each skipped offset is tracked and handed to ``pipeline.unparseable``, so it is
        committed only once that is done.
        """
        consumer = self.consumer
        for tp in sorted(consumer.assignment()):
            start = await consumer.position(tp)
            try:
                await consumer.getmany(
                    tp, timeout_ms=1000, max_records=self._kafka.fetch_max_records
                )
            except KafkaError:
                raise
            except Exception:  # noqa: BLE001 - this partition holds it
                consumer.seek(tp, start)
                await self._skip_unparseable(tp, error, pipeline)
            else:
                consumer.seek(tp, start)

    async def _skip_unparseable(
        self, tp: TopicPartition, error: Exception, pipeline: Dispatcher
    ) -> None:
        consumer = self.consumer
        while True:  # the good records before it, one at a time (at most one fetch's worth)
            try:
                fetched = await consumer.getmany(tp, timeout_ms=1000, max_records=1)
            except KafkaError:
                raise
            except Exception:  # noqa: BLE001 - reached it
                break
            if not fetched:
                return
            self._hand_on(tp, fetched.get(tp, []), pipeline)
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
            except Exception:  # noqa: BLE001, S112 - still inside the unparseable batch
                continue
            consumer.seek(tp, offset)  # parses again from here: the main loop goes on
            break
        log.error(
            "records the Kafka client cannot parse were skipped and dead-lettered",
            partition=f"{tp.topic}[{tp.partition}]",
            offsets=f"{start}..{offset - 1}",
            error=repr(error)[:500],
        )
        for skipped in range(start, offset):
            self.tracker.track(tp, skipped)
            pipeline.unparseable(Record(tp, skipped, None, None, [], 0), error)

    async def commit_loop(self) -> None:
        """Commit what is answered, every ``commit_interval_ms``."""
        interval = self._runtime.commit_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            await self.commit()

    async def commit(self, partitions: Sequence[TopicPartition] | None = None) -> None:
        """Commit the lowest unanswered offset of each (given) assigned partition that moved."""
        assigned = self.consumer.assignment()
        positions = {
            tp: pos for tp, pos in self.tracker.committable(partitions).items() if tp in assigned
        }
        if not positions:
            return
        try:
            await self.consumer.commit(positions)
        except KafkaError as exc:
            self._metrics.commits.labels("failed").inc()
            log.warning("commit failed; will retry", error=repr(exc), positions=_fmt(positions))
            return
        self._metrics.commits.labels("ok").inc()
        self.tracker.mark_committed(positions)
        log.debug("committed", positions=_fmt(positions))

    async def release(self, revoked: set[TopicPartition]) -> None:
        """Wait (bounded) for revoked partitions' requests to be answered, then commit them."""
        deadline = time.monotonic() + self._runtime.shutdown_timeout_s
        while self.tracker.pending_in(revoked) and time.monotonic() < deadline:
            await self._progress.wait(0.2)
        left = self.tracker.pending_in(revoked)
        if left:
            log.warning(
                "partitions revoked with requests in flight; they will be served again",
                in_flight=left,
            )
        await self.commit(sorted(revoked))
        self.tracker.forget(revoked)
        self.assigned -= revoked


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Commits finished work of revoked partitions before they move to another worker."""

    def __init__(self, intake: Intake) -> None:
        self._intake = intake

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            log.info("partitions revoked", partitions=_fmt_tps(revoked))
            await self._intake.release(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._intake.assigned |= set(assigned)
        self._intake.joined = True
        log.info("partitions assigned", partitions=_fmt_tps(assigned))


def _fmt(positions: dict[TopicPartition, int]) -> dict[str, int]:
    return {f"{tp.topic}[{tp.partition}]": pos for tp, pos in positions.items()}


def _fmt_tps(tps: set[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in tps)
