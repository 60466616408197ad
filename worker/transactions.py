"""Exactly-once publishing: a transactional producer per assigned partition of the requests topic.

With ``WORKER_KAFKA__DELIVERY=exactly_once`` this replaces the at-least-once
:class:`~worker.replies.Replier` for records (calls' audit records still go through one). Each
assigned input partition has a :class:`_Lane`: a producer whose ``transactional_id`` is made
of the group, topic and partition (:func:`transactional_id`), so the partition's next owner
fences a zombie of the previous one (aiokafka speaks transaction protocol v0 only, without
consumer-group fencing: Kafka Streams' "eos-alpha" design). A lane keeps the messages of
answered records and, every ``transaction_interval_ms`` at most, commits in one transaction the
messages of the *oldest answered records of the partition, as far as all are answered*
(:meth:`~worker.offsets.OffsetTracker.prefix`) together with the partition's next offset. A
reply therefore becomes visible to a ``read_committed`` reader exactly when its record's offset
is committed: whoever serves the partition next starts after it, and never answers it again.

A message that fails inside a transaction aborts it (nothing of it is visible); the next
transaction carries the same messages with the failed ones replaced as
:func:`~worker.publishing.remedy` says (a reply by a dead-letter copy, and so on). A commit
that fails is retried ``retries`` times, then the worker stops without committing (the records
are served again by the next owner). A fenced producer (another worker owns the partition now)
drops the lane's answers: they were never visible, the new owner serves them.

Lifecycle, driven by :class:`~worker.intake.Intake`: :meth:`Transactions.acquire` starts the
producers of newly assigned partitions (which completes or aborts the previous owner's open
transaction) before the consumer reads their committed offsets; :meth:`Transactions.relinquish`
commits what a revoked partition has ready, stops its producer and drops the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field

import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from worker.errors import WorkerError
from worker.inbox import Inbox
from worker.kafka import make_producer
from worker.metrics import Metrics
from worker.offsets import OffsetTracker
from worker.origins import Record
from worker.outgoing import Destinations, Outgoing
from worker.publishing import Failed, Publisher, remedy
from worker.replies import Replier
from worker.settings import Settings

__all__ = ["STOP_TIMEOUT_S", "Transactions", "transactional_id"]

log = structlog.get_logger(__name__)

STOP_TIMEOUT_S = 5.0
"""How long a lane's producer may take to abort its open transaction when it stops."""


def transactional_id(group_id: str, tp: TopicPartition) -> str:
    """The transactional id of a partition's producer: the same for every owner, in one group."""
    return f"{group_id}-{tp.topic}-{tp.partition}"


class _Fenced(Exception):  # noqa: N818 - a signal inside this module, never raised out of it
    """The lane's producer was fenced (or broke for good): it can never commit again."""


@dataclass(eq=False)
class _Lane:
    """One assigned partition: its producer and the messages of its answered records."""

    tp: TopicPartition
    producer: AIOKafkaProducer
    publisher: Publisher
    inbox: Inbox[Outgoing] = field(default_factory=Inbox)
    answered: dict[int, list[Outgoing]] = field(default_factory=dict)
    """Messages by record offset, until committed (those of a running transaction included)."""
    started: float = float("-inf")
    """When the last transaction began (monotonic)."""
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the lane is closed: a transaction waiting for more answers commits at once."""
    task: asyncio.Task[None] | None = None

    def close(self) -> None:
        """No more answers: commit what is ready now, then end."""
        self.inbox.close()
        self.closing.set()


class Transactions:
    """Publishes records' messages in one transaction per partition with the partition's offset."""

    def __init__(
        self,
        make_producer: Callable[[str], AIOKafkaProducer],
        tracker: OffsetTracker[TopicPartition],
        plain: Replier,
        on_published: Callable[[Sequence[Outgoing]], None],
        *,
        destinations: Destinations,
        topic_exists: Callable[[str], Awaitable[bool]],
        metrics: Metrics,
        retries: int,
        interval_s: float,
        retry_backoff_s: float = 0.5,
        start_timeout_s: float = 60.0,
    ) -> None:
        self._make_producer = make_producer
        self._tracker = tracker
        self._plain = plain
        self._destinations = destinations
        self._topic_exists = topic_exists
        self._on_published = on_published
        self._metrics = metrics
        self._retries = retries
        self._interval = interval_s
        self._backoff = retry_backoff_s
        self._start_timeout = start_timeout_s
        self._lanes: dict[TopicPartition, _Lane] = {}  # per assigned partition
        self._group: asyncio.TaskGroup | None = None
        self._running = asyncio.Event()
        self._closed = asyncio.Event()

    @classmethod
    def for_settings(
        cls,
        settings: Settings,
        tracker: OffsetTracker[TopicPartition],
        plain: Replier,
        on_published: Callable[[Sequence[Outgoing]], None],
        *,
        destinations: Destinations,
        metrics: Metrics,
    ) -> Transactions:
        """The worker's: transactional producers made as ``settings`` say."""
        kafka = settings.kafka

        def make(transactional_id: str) -> AIOKafkaProducer:
            return make_producer(
                kafka, transactional_id=transactional_id,
                transaction_timeout_ms=kafka.transaction_timeout_ms,
            )  # fmt: skip

        return cls(
            make, tracker, plain, on_published, destinations=destinations,
            topic_exists=plain.topic_exists, metrics=metrics,
            retries=settings.runtime.reply_retries,
            interval_s=kafka.transaction_interval_ms / 1000,
            start_timeout_s=2 * kafka.request_timeout_ms / 1000,
        )  # fmt: skip

    def submit(self, items: Sequence[Outgoing]) -> None:
        """Queue messages; all messages of one record must be submitted in one call."""
        calls: list[Outgoing] = []
        for item in items:
            origin = item.origin
            if not isinstance(origin, Record):
                calls.append(item)
                continue
            lane = self._lanes.get(origin.tp)
            if lane is not None and self._tracker.current(origin.tp, origin.generation):
                lane.inbox.extend((item,))
            # else: a record of a partition revoked (or fenced) since: its next owner serves it
        if calls:
            self._plain.submit(calls)

    def buffered(self, partitions: Collection[TopicPartition]) -> int:
        """Answered records of these partitions not yet committed (queued ones included)."""
        total = 0
        for tp in partitions:
            lane = self._lanes.get(tp)
            if lane is not None:
                queued = {_offset(item) for item in lane.inbox} - lane.answered.keys()
                total += len(lane.answered) + len(queued)
        return total

    def close(self) -> None:
        """Commit what is answered, then let :meth:`run` return."""
        self._closed.set()
        for lane in self._lanes.values():
            lane.close()
        self._plain.close()

    async def run(self) -> None:
        """Serve every lane (a task each) and the calls' replier until closed and drained."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                self._running.set()
                group.create_task(self._plain.run())
                await self._closed.wait()
        finally:
            self._group = None
            lanes, self._lanes = list(self._lanes.values()), {}
            for lane in lanes:
                await _stop(lane.producer)

    async def acquire(self, partitions: Collection[TopicPartition]) -> None:
        """Start the producers of newly assigned partitions (fencing their previous owners)."""
        await self._running.wait()
        if self._closed.is_set():  # stopping: nothing more is served
            return
        group_id = self._destinations.group_id
        fresh = [tp for tp in partitions if tp not in self._lanes]
        producers = {tp: self._make_producer(transactional_id(group_id, tp)) for tp in fresh}
        try:
            async with asyncio.timeout(self._start_timeout):
                await asyncio.gather(*(p.start() for p in producers.values()))
        except TimeoutError:
            for producer in producers.values():
                await _stop(producer)
            raise WorkerError(
                f"transactional producers did not start within {self._start_timeout:g} s: is "
                "the transaction coordinator available (the __transaction_state topic; "
                "transaction.state.log.replication.factor at most the number of brokers)?"
            ) from None
        except BaseException:
            for producer in producers.values():
                with contextlib.suppress(Exception):
                    await producer.stop()
            raise
        assert self._group is not None
        for tp, producer in producers.items():
            lane = _Lane(
                tp, producer,
                Publisher(producer, retries=self._retries, retry_backoff_s=self._backoff),
            )  # fmt: skip
            self._lanes[tp] = lane
            lane.task = self._group.create_task(self._serve(lane))

    async def relinquish(self, partitions: Collection[TopicPartition], timeout_s: float) -> None:
        """Commit what revoked partitions have ready (bounded), stop their producers, forget."""
        lanes = [lane for tp in partitions if (lane := self._lanes.pop(tp, None))]
        for lane in lanes:
            lane.close()
        tasks = [lane.task for lane in lanes if lane.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=max(timeout_s, 0.0))
            for task in late:  # mid-transaction: aborted below, never visible
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*late, return_exceptions=True)
        for lane in lanes:
            await _stop(lane.producer)

    async def _serve(self, lane: _Lane) -> None:
        """Commit the lane's ready prefix, one transaction per interval, until closed."""
        try:
            while taken := await lane.inbox.take_all():
                self._add(lane, taken)
                wait = lane.started + self._interval - time.monotonic()
                if wait > 0:  # collect more answers for this transaction, unless closing
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lane.closing.wait(), wait)
                    if len(lane.inbox):
                        self._add(lane, await lane.inbox.take_all())
                await self._commit_ready(lane)
        except _Fenced as exc:
            where = f"{lane.tp.topic}[{lane.tp.partition}]"
            raise WorkerError(
                f"the transactional producer of {where} was fenced: another worker owns the "
                "partition now (this one was out of its group), or the broker aborted a "
                "transaction open longer than WORKER_KAFKA__TRANSACTION_TIMEOUT_MS; stopping: "
                "nothing uncommitted was visible, and it is served again"
            ) from exc.__cause__

    def _add(self, lane: _Lane, items: list[Outgoing]) -> None:
        for item in items:
            if self._current(item):
                lane.answered.setdefault(_offset(item), []).append(item)

    def _current(self, item: Outgoing) -> bool:
        """False for a message of a record fetched before its partition was forgotten."""
        origin = item.origin
        return isinstance(origin, Record) and self._tracker.current(origin.tp, origin.generation)

    async def _commit_ready(self, lane: _Lane) -> None:
        """One transaction: the messages of the ready prefix and the offset just past it."""
        stale = [o for o, items in lane.answered.items() if not self._current(items[0])]
        for offset in stale:  # the partition started afresh: these are to be served again
            del lane.answered[offset]
        ready = self._tracker.prefix(lane.tp, lane.answered)
        if ready is None:
            return
        offsets, position = ready
        items = [item for offset in offsets for item in lane.answered[offset]]
        lane.started = time.monotonic()
        published = await self._transact(lane, items, position)
        self._metrics.transaction_time.observe(time.monotonic() - lane.started)
        for offset in offsets:
            del lane.answered[offset]
        if all(self._current(item) for item in items):
            for offset in offsets:
                self._tracker.done(lane.tp, offset)
            self._tracker.mark_committed({lane.tp: position})
        self._on_published(published)

    async def _transact(self, lane: _Lane, items: list[Outgoing], position: int) -> list[Outgoing]:
        """Commit ``items`` and ``position`` in one transaction; what was published.

        Messages that fail abort the transaction and are replaced by their remedies in the next
        one; a failing commit is retried ``retries`` times, then :class:`WorkerError`.
        """
        sending: list[Outgoing] = []
        failed: Failed = []
        for item in items:
            if await self._topic_exists(item.topic):
                sending.append(item)
            else:
                failed.append((item, KafkaError(f"topic {item.topic!r} does not exist")))
        commit_failures = 0
        while True:
            for item, reason in failed:
                copy = remedy(self._destinations, item, reason)  # raises if nothing can go
                if copy is not None:
                    sending.append(copy)
            failed, error = await _attempt(lane, sending, position, self._destinations.group_id)
            if error is None and not failed:
                self._metrics.transactions.labels("committed").inc()
                return sending
            self._metrics.transactions.labels("aborted").inc()
            if error is not None:
                commit_failures += 1
                if commit_failures > self._retries:
                    raise WorkerError(
                        f"transaction for {lane.tp.topic}[{lane.tp.partition}] not committed: "
                        f"{error!r}; stopping without committing it"
                    ) from error
                log.warning("transaction failed; retrying", error=repr(error)[:500])
                await asyncio.sleep(self._backoff * 2 ** (commit_failures - 1))
            lost = {id(item) for item, _ in failed}
            sending = [item for item in sending if id(item) not in lost]


async def _attempt(
    lane: _Lane, sending: list[Outgoing], position: int, group_id: str
) -> tuple[Failed, BaseException | None]:
    """Begin, send, add the offset, commit; on any failure abort. (failed, commit error)."""
    producer = lane.producer
    try:
        await producer.begin_transaction()
        failed = await lane.publisher.send(sending)
        if failed:
            if _fatal(producer) or any(isinstance(e, ProducerFenced) for _, e in failed):
                raise _Fenced from failed[0][1]
            await _abort(producer)
            return failed, None
        await producer.send_offsets_to_transaction({lane.tp: position}, group_id)
        await producer.commit_transaction()
    except ProducerFenced as exc:
        raise _Fenced from exc
    except KafkaError as exc:
        if _fatal(producer):
            raise _Fenced from exc
        await _abort(producer)
        return [], exc
    return [], None


async def _stop(producer: AIOKafkaProducer) -> None:
    """Abort an open transaction (bounded: readers wait on it) and stop; never raises."""
    with contextlib.suppress(Exception):  # a fenced or broken producer: nothing more to save
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await _abort(producer)
    with contextlib.suppress(Exception):
        await producer.stop()


def _offset(item: Outgoing) -> int:
    assert isinstance(item.origin, Record)
    return item.origin.offset


def _fatal(producer: AIOKafkaProducer) -> bool:
    manager = getattr(producer, "_txn_manager", None)  # aiokafka 0.14's own
    return manager is not None and bool(manager.is_fatal_error())


async def _abort(producer: AIOKafkaProducer) -> None:
    """Abort the producer's transaction if one is open (or failed); never raises Kafka errors."""
    manager = getattr(producer, "_txn_manager", None)
    state = getattr(getattr(manager, "state", None), "name", "")
    if state in ("IN_TRANSACTION", "ABORTABLE_ERROR"):
        with contextlib.suppress(KafkaError):
            await producer.abort_transaction()
