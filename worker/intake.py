"""Intake: the consumer, its fetch loop with flow control, offset commits and rebalances.

:class:`Intake` owns the group consumer, the :class:`~worker.offsets.OffsetTracker` and the
assignment. It fetches records, tracks each, and hands it on as a
:class:`~worker.origins.Record` to the pipeline (:meth:`~worker.pipeline.Pipeline.dispatch`);
the replier marks records done once their replies are acknowledged, and the commit loop
commits, per partition, the lowest offset not yet answered (exactly-once: the owner of
:mod:`worker.handover` commits it in its transactions). At the in-flight bound (records and
calls together: :class:`~worker.inflight.InFlight`) it pauses its partitions (no background
buffering either) until answers catch up.

On a rebalance (eager: every partition is revoked first), it abandons queued requests, waits
(bounded) for running ones to be answered, commits, and forgets the partitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from functools import partial
from typing import Any, Protocol

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from worker.errors import WorkerError
from worker.handover import Handover
from worker.headers import Headers
from worker.inflight import InFlight
from worker.kafka import is_fenced, make_consumer
from worker.membership import MemberIds
from worker.metrics import Metrics
from worker.offsets import OffsetTracker
from worker.origins import Record
from worker.progress import Progress
from worker.settings import KafkaSettings, RuntimeSettings
from worker.unparseable import recover

__all__ = ["FETCH_RETRY_S", "Dispatcher", "Intake"]

HAND_ON_CHUNK = 64
"""Records dispatched before the event loop serves anything else: a fetch of 500 records is
tens of ms of decoding, which a waiting REST or gRPC request would otherwise sit behind."""

FETCH_RETRY_S = 0.5
"""Pause after a failed fetch before the next one."""

log = structlog.get_logger(__name__)


class Dispatcher(Protocol):
    """Where intake hands records: the pipeline (:class:`worker.pipeline.Pipeline`)."""

    def dispatch(self, origin: Record, /) -> None:
        """Take one fetched record (it is tracked until its answer is acknowledged)."""

    def unparseable(self, record: Record, error: Exception, /) -> None:
        """Dead-letter the place of a record the Kafka client could not parse."""

    def abandon(self, partitions: Collection[TopicPartition], /) -> int:
        """Take revoked partitions' queued requests out; how many were taken."""


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
        self.epoch = 0
        """Counts rebalance callbacks and take-ups (exactly-once seeks each partition taken up):
        positions saved, and records fetched, before a change of it are stale."""
        self._members = MemberIds(kafka)
        """Static membership: does a twin keep fencing this worker (:mod:`worker.membership`)."""
        self._dispatcher: Dispatcher | None = None
        """Where records go; set while :meth:`consume` runs (a rebalance abandons to it)."""
        self.joined = False
        """True once the consumer has joined its group and received an assignment."""
        self.handover: Handover | None = None
        """Exactly-once: partitions are taken up through the owner of their transactions, which
        also commits their offsets (:mod:`worker.handover`; none: :meth:`commit` does)."""

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Intake]:
        """Subscribed and started while open; on exit the consumer leaves the group."""
        self.consumer = make_consumer(self._kafka)
        self.consumer.subscribe([self._kafka.requests_topic], listener=_Listener(self))
        try:
            try:
                await self.consumer.start()
            except KafkaError as exc:
                if is_fenced(exc):
                    raise self._members.error() from exc
                raise
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
        stepped past (:mod:`worker.unparseable`): each offset skipped goes to
        ``pipeline.unparseable`` (bytes unknown) and is committed like an answered record once
        that is done. ``prepare`` is awaited with each
        fetched batch's (value, headers) before any of it is dispatched (schema lookups);
        records of partitions revoked meanwhile are left to their new owner.
        """
        consumer = self.consumer
        self._dispatcher = pipeline
        max_records = self._kafka.fetch_max_records
        paused = False
        while not stopping.is_set():
            self._check()
            room = self._in_flight.room_for_records()
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
            epoch = self.epoch
            before = {tp: await consumer.position(tp) for tp in consumer.assignment()}
            try:
                fetched = await consumer.getmany(timeout_ms=100, max_records=min(room, max_records))
            except KafkaError as exc:  # transient (a rebalance, a reset); the watchdog bounds it
                if is_fenced(exc):
                    raise self._members.error() from exc
                self._metrics.fetch_errors.inc()
                log.warning("fetch failed; retrying", error=repr(exc)[:500])
                await asyncio.sleep(FETCH_RETRY_S)
                continue
            except Exception as exc:  # noqa: BLE001 - a record the client cannot parse
                self._metrics.fetch_errors.inc()
                await recover(
                    consumer, exc, before if self.epoch == epoch else {},
                    fetch_max_records=max_records,
                    hand_on=partial(self._hand_on, pipeline=pipeline),
                    skipped=partial(self._skipped, pipeline),
                    moved=partial(self._moved_since, self.epoch),
                )  # fmt: skip
                continue
            epoch = self.epoch
            if prepare is not None and fetched:
                await prepare([(r.value, r.headers) for rs in fetched.values() for r in rs])
            same = partial(lambda epoch: self.epoch == epoch, epoch)
            hand_on = partial(self._hand_on, pipeline=pipeline)
            await _in_chunks(fetched, self._in_flight, same, hand_on)

    def _check(self) -> None:
        """Raise what makes going on impossible: a twin's fencing, a failed take-up."""
        if self._members.fenced:
            raise self._members.error()
        failure = self.handover.failure if self.handover is not None else None
        if failure is not None:
            raise WorkerError(
                f"assigned partitions could not be taken up: {failure!r}"
            ) from failure

    def _hand_on(self, tp: TopicPartition, records: Sequence[Any], pipeline: Dispatcher) -> None:
        """Track fetched records and hand each on as a :class:`~worker.origins.Record`."""
        for r in records:
            if self.handover is not None and not self.handover.fresh(tp, r.offset):
                continue
            self.tracker.track(tp, r.offset)
            generation = self.tracker.generation(tp)
            pipeline.dispatch(
                Record(tp, r.offset, r.key, r.value, r.headers, r.timestamp, generation)
            )

    def _fresh(self, tp: TopicPartition, offset: int) -> bool:
        """Serve this record? Always, but exactly-once serves each once (:mod:`worker.handover`)."""
        return self.handover is None or self.handover.fresh(tp, offset)

    def _moved_since(self, epoch: int) -> bool:  # a rebalance since ``epoch`` was read
        return self.epoch != epoch

    def _skipped(
        self, pipeline: Dispatcher, tp: TopicPartition, offset: int, error: Exception
    ) -> None:
        """An offset stepped past unparsed: tracked, and its place dead-lettered."""
        if not self._fresh(tp, offset):
            return
        self.tracker.track(tp, offset)
        generation = self.tracker.generation(tp)
        pipeline.unparseable(Record(tp, offset, None, None, [], 0, generation), error)

    async def commit_loop(self) -> None:
        """Commit what is answered, every ``commit_interval_ms``."""
        interval = self._runtime.commit_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            await self.commit()

    async def commit(self, partitions: Sequence[TopicPartition] | None = None) -> None:
        """Commit the lowest unanswered offset of each (given) assigned partition that moved.

        Exactly-once: nothing to do, offsets are committed in the owner's transactions.
        """
        if self.handover is not None:
            return
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
        """Fast revocation: give up queued requests, finish running ones, commit, forget.

        Queued requests of the revoked partitions are taken out (never answered: their
        offsets stay uncommitted and the next owner serves them); requests already running
        or answered but not yet acknowledged are waited for, bounded by
        :meth:`revoke_timeout_s`; then what is done is committed and the partitions are
        forgotten (anything of them still running is never published).
        """
        self.epoch += 1
        started = time.monotonic()
        dispatcher = self._dispatcher
        abandoned = dispatcher.abandon(revoked) if dispatcher is not None else 0
        deadline = started + self.revoke_timeout_s()
        while self._running_in(revoked, abandoned) > 0 and time.monotonic() < deadline:
            await self._progress.wait(0.05)
        left = self._running_in(revoked, abandoned)
        if left > 0:
            log.warning(
                "partitions revoked with requests still running; they will be served again",
                running=left,
            )
        if self.handover is not None:
            # At least a second: a ready prefix is committed, not served again for nothing.
            await self.handover.owner.relinquish(revoked, max(deadline - time.monotonic(), 1.0))
            self.handover.forget(revoked)
        await self.commit(sorted(revoked))
        self.tracker.forget(revoked)
        self.assigned -= revoked
        self._metrics.partitions.set(len(self.assigned))
        self._metrics.revoke.observe(time.monotonic() - started)
        log.info(
            "partitions released",
            abandoned=abandoned,
            seconds=round(time.monotonic() - started, 3),
        )

    def _running_in(self, revoked: set[TopicPartition], abandoned: int) -> int:
        """Records of revoked partitions neither answered (handed to the owner) nor abandoned."""
        running = self.tracker.unfinished_in(revoked) - abandoned
        if self.handover is not None:
            running -= self.handover.owner.buffered(revoked)
        return running

    async def receive(self, assigned: set[TopicPartition]) -> None:
        """A rebalance ended with this assignment (exactly-once: :mod:`worker.handover`)."""
        self.epoch += 1
        self._members.note(self.consumer, time.monotonic())
        if self.handover is not None and assigned:
            try:
                positions = await self.handover.take_up(self.consumer, assigned)
            except Exception as exc:  # raised by consume, not lost in aiokafka's callback
                log.exception("assigned partitions could not be taken up")
                self.handover.failure = exc
                return
            self.handover.start(self.consumer, positions)
            # What a fetch handed on meanwhile (chunks, schema lookups) has left is stale.
            self.epoch += 1
        self.assigned |= assigned
        self.joined = True
        self._metrics.rebalances.inc()
        self._metrics.partitions.set(len(self.assigned))
        log.info("partitions assigned", partitions=_fmt_tps(assigned))

    def revoke_timeout_s(self) -> float:
        """How long a revocation waits for running requests: below the rebalance timeout."""
        return min(self._runtime.shutdown_timeout_s, self._kafka.rebalance_timeout_ms / 2000)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Commits finished work of revoked partitions before they move to another worker."""

    def __init__(self, intake: Intake) -> None:
        self._intake = intake

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            log.info("partitions revoked", partitions=_fmt_tps(revoked))
            await self._intake.release(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._intake.receive(set(assigned))


def _fmt(positions: dict[TopicPartition, int]) -> dict[str, int]:
    return {f"{tp.topic}[{tp.partition}]": pos for tp, pos in positions.items()}


def _fmt_tps(tps: set[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in tps)


def _chunks(fetched: dict[TopicPartition, list[Any]]) -> Iterator[tuple[TopicPartition, list[Any]]]:
    """A fetch's records, partition by partition, in chunks of :data:`HAND_ON_CHUNK`."""
    for tp, records in fetched.items():
        for start in range(0, len(records), HAND_ON_CHUNK):
            yield tp, records[start : start + HAND_ON_CHUNK]


async def _in_chunks(
    fetched: dict[TopicPartition, list[Any]],
    in_flight: InFlight,
    same: Callable[[], bool],
    hand_on: Callable[[TopicPartition, list[Any]], None],
) -> None:
    """Hand a fetch on chunk by chunk, the event loop free in between, while ``same()``.

    Its records count in flight (``incoming``) from the start: calls read between chunks cannot
    overfill the bound. A rebalance meanwhile (not ``same()``) stops it: the rest are read
    again from the commits.
    """
    in_flight.incoming = sum(len(records) for records in fetched.values())
    try:
        for tp, chunk in _chunks(fetched):
            if not same():
                break
            in_flight.incoming -= len(chunk)
            hand_on(tp, chunk)
            await asyncio.sleep(0)  # a call's request (REST, gRPC) is read in between
    finally:
        in_flight.incoming = 0
