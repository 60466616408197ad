"""Exactly-once publishing without a broker: prefixes, aborts, remedies, fencing, revocation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, ProducerFenced, TopicAuthorizationFailedError
from hypothesis import given
from hypothesis import strategies as st

from worker.answers import Answer
from worker.domain import InferenceRequest, InferenceResponse
from worker.errors import WorkerError
from worker.formats import PLAIN
from worker.metrics import Metrics
from worker.offsets import OffsetTracker
from worker.origins import Call, Record
from worker.outgoing import Destinations, Outgoing, messages
from worker.replies import Replier
from worker.transactions import Transactions, transactional_id

from .conftest import wait_for
from .test_replies import FakeBatch, FakeProducer

DEST = Destinations(
    "replies", "dlq", "g", audit_topic="audit", requests_topic="requests", reply_topics=("missing",)
)
TP = TopicPartition("requests", 0)


class FakeTransactionalProducer:
    """A transactional producer that keeps committed transactions and scripted failures."""

    def __init__(
        self,
        sends: list[BaseException | None] | None = None,
        commits: list[BaseException | None] | None = None,
    ) -> None:
        self.sends = sends or []
        self.commits = commits or []
        self.committed: list[tuple[list[tuple[str, bytes | None]], dict[Any, int]]] = []
        self.aborted = 0
        self.stopped = False
        self.hang = False
        self._current: list[tuple[str, bytes | None]] = []
        self._offsets: dict[Any, int] = {}
        self._txn_manager = SimpleNamespace(
            state=SimpleNamespace(name="READY"), is_fatal_error=lambda: False
        )

    def _state(self, name: str) -> None:
        self._txn_manager.state = SimpleNamespace(name=name)

    async def start(self) -> None:
        """Nothing to connect."""

    async def stop(self) -> None:
        self.stopped = True

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def partitions_for(self, _topic: str) -> set[int]:
        return {0}

    async def begin_transaction(self) -> None:
        assert self._txn_manager.state.name == "READY", "one transaction at a time"
        self._state("IN_TRANSACTION")
        self._current, self._offsets = [], {}

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> Any:
        assert self._txn_manager.state.name == "IN_TRANSACTION"
        assert partition == 0
        error = self.sends.pop(0) if self.sends else None
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if error is None:
            self._current += [(topic, value) for value in batch.records]
            done.set_result(None)
        else:
            done.set_exception(error)
        return done

    async def send_offsets_to_transaction(self, offsets: dict[Any, int], group_id: str) -> None:
        assert group_id == DEST.group_id
        self._offsets = dict(offsets)

    async def commit_transaction(self) -> None:
        if self.hang:
            await asyncio.Event().wait()  # a commit that never answers (the broker is gone)
        error = self.commits.pop(0) if self.commits else None
        if error is not None:
            self._state("ABORTABLE_ERROR")
            raise error
        self.committed.append((self._current, self._offsets))
        self._state("READY")

    async def abort_transaction(self) -> None:
        self.aborted += 1
        self._state("READY")


class Setup:
    """Transactions over fake producers, with what was acknowledged."""

    def __init__(
        self, producer: FakeTransactionalProducer, plain: FakeProducer, interval_s: float = 0.0
    ) -> None:
        self.tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self.acknowledged: list[Outgoing] = []
        self.plain_published: list[Outgoing] = []
        self.producer = producer
        self.made: list[str] = []
        self.metrics = Metrics()

        async def exists(topic: str) -> bool:
            return topic != "missing"

        def make(tid: str) -> Any:
            self.made.append(tid)
            return producer

        replier = Replier(
            plain, self.tracker, self.plain_published.extend, destinations=DEST, retries=0,
            topic_exists=exists, retry_backoff_s=0.001,
        )  # fmt: skip
        self.tx = Transactions(
            make, self.tracker, replier, self.acknowledged.extend, destinations=DEST,
            topic_exists=exists, metrics=self.metrics, retries=2, interval_s=interval_s,
            retry_backoff_s=0.001,
        )  # fmt: skip

    def answer(self, offset: int, reply_to: str | None = None) -> None:
        """Submit the reply to the tracked record at ``offset``."""
        headers = [("reply_to", reply_to.encode())] if reply_to else []
        record = Record(TP, offset, b"k", b"req", headers, 0, self.tracker.generation(TP))
        response = InferenceResponse(f"r-{offset}", "m")
        self.tx.submit(messages(DEST, PLAIN, Answer(record, response)))

    def count(self, result: str) -> float:
        return self.metrics.value("inference_transactions_total", result=result)


@asynccontextmanager
async def running(
    producer: FakeTransactionalProducer, plain: FakeProducer | None = None
) -> AsyncIterator[Setup]:
    """Transactions running, partition ``TP`` acquired; closed and drained at the end."""
    setup = Setup(producer, plain or FakeProducer([]))
    task = asyncio.create_task(setup.tx.run())
    try:
        await setup.tx.acquire([TP])
        yield setup
        setup.tx.close()
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()


async def stopped_by_one_answer(setup: Setup, offset: int) -> pytest.ExceptionInfo[ExceptionGroup]:
    """Run, answer the record at ``offset``; the error the run ends with (it must end)."""
    task = asyncio.create_task(setup.tx.run())
    await setup.tx.acquire([TP])
    setup.tracker.track(TP, offset)
    setup.answer(offset)
    with pytest.raises(ExceptionGroup) as raised:
        await asyncio.wait_for(task, 10)
    return raised


async def test_only_the_oldest_answered_records_are_committed_with_the_next_offset() -> None:
    """An unanswered record holds back the answers after it; its answer releases them all."""
    producer = FakeTransactionalProducer()
    async with running(producer) as s:
        for offset in (10, 11, 12):
            s.tracker.track(TP, offset)
        s.answer(10)
        s.answer(12)
        await wait_for(lambda: len(producer.committed) == 1, timeout=5, what="transaction 1")
        sent, offsets = producer.committed[0]
        assert [topic for topic, _ in sent] == ["replies", "audit"], "reply and audit together"
        assert offsets == {TP: 11}
        assert s.tx.buffered([TP]) == 1, "12 waits for 11"
        s.answer(11)
        await wait_for(lambda: len(producer.committed) == 2, timeout=5, what="transaction 2")
        messages_2, offsets_2 = producer.committed[1]
        assert offsets_2 == {TP: 13}
        assert len(messages_2) == 4
        assert s.tracker.pending == 0
        assert s.tracker.committable() == {}, "committed in the transaction, not by the consumer"
    assert s.made == [transactional_id("g", TP)] == ["g-requests-0"]
    assert s.count("committed") == 2
    replies = [o.correlation_id for o in s.acknowledged if o.topic == "replies"]
    assert replies == ["r-10", "r-11", "r-12"]


async def test_a_failed_send_aborts_and_the_next_transaction_carries_a_dead_letter_copy() -> None:
    """Nothing of a transaction with a failed message is visible; its remedy goes in the next."""
    producer = FakeTransactionalProducer(sends=[TopicAuthorizationFailedError()])
    async with running(producer) as s:
        s.tracker.track(TP, 5)
        s.answer(5)
        await wait_for(lambda: bool(producer.committed), timeout=5, what="a transaction")
    assert producer.aborted == 1
    ((sent, offsets),) = producer.committed
    assert sorted(sent) == sorted(
        [("dlq", b"req"), ("audit", sent[0][1] if sent[0][0] == "audit" else sent[1][1])]
    )
    assert offsets == {TP: 6}
    assert s.count("aborted") == 1
    assert s.count("committed") == 1
    assert s.tracker.pending == 0


async def test_a_reply_to_a_missing_topic_is_dead_lettered_in_the_same_transaction() -> None:
    """A reply topic that does not exist costs no abort: the dead-letter copy goes instead."""
    producer = FakeTransactionalProducer()
    async with running(producer) as s:
        for offset in (1, 2):
            s.tracker.track(TP, offset)
        s.answer(1, reply_to="missing")
        s.answer(2)
        await wait_for(lambda: s.tracker.pending == 0, timeout=5, what="both committed")
    assert producer.aborted == 0
    topics = sorted(topic for committed, _ in producer.committed for topic, _ in committed)
    assert topics == ["audit", "audit", "dlq", "replies"]


async def test_a_commit_that_keeps_failing_stops_without_marking_anything_done() -> None:
    """After the retries a failing commit raises WorkerError; the record stays unanswered."""
    failures: list[BaseException | None] = [KafkaConnectionError()] * 3
    producer = FakeTransactionalProducer(commits=failures)
    setup = Setup(producer, FakeProducer([]))
    raised = await stopped_by_one_answer(setup, 7)
    assert raised.group_contains(WorkerError, match="not committed")
    assert producer.committed == []
    assert producer.aborted == 3
    assert setup.tracker.pending == 1


async def test_a_commit_that_fails_once_is_retried_with_the_same_messages() -> None:
    """A transient commit failure aborts; the retry commits the same reply, once."""
    producer = FakeTransactionalProducer(commits=[KafkaConnectionError()])
    async with running(producer) as s:
        s.tracker.track(TP, 3)
        s.answer(3)
        await wait_for(lambda: bool(producer.committed), timeout=5, what="the retry")
    ((sent, offsets),) = producer.committed
    assert [topic for topic, _ in sent] == ["replies", "audit"]
    assert offsets == {TP: 4}


@pytest.mark.parametrize("where", ["send", "commit"])
async def test_a_fenced_producer_stops_the_worker_without_publishing_anything(where: str) -> None:
    """Fenced at a send or at the commit: nothing visible, nothing dead-lettered, a clear stop."""
    fenced: list[BaseException | None] = [ProducerFenced()]
    producer = (
        FakeTransactionalProducer(sends=fenced)
        if where == "send"
        else FakeTransactionalProducer(commits=fenced)
    )
    setup = Setup(producer, FakeProducer([]))
    raised = await stopped_by_one_answer(setup, 1)
    assert raised.group_contains(WorkerError, match="fenced")
    assert producer.committed == []
    assert setup.tracker.pending == 1, "served again by the partition's owner"
    assert setup.count("committed") == 0


async def test_closing_commits_at_once_however_long_the_interval() -> None:
    """A transaction collecting answers for a long interval commits as soon as it is closed."""
    producer = FakeTransactionalProducer()
    setup = Setup(producer, FakeProducer([]), interval_s=3600.0)
    task = asyncio.create_task(setup.tx.run())
    await setup.tx.acquire([TP])
    for offset in (1, 2):
        setup.tracker.track(TP, offset)
    setup.answer(1)
    await wait_for(lambda: bool(producer.committed), timeout=5, what="the first transaction")
    setup.answer(2)  # the next transaction now waits up to an hour for more answers
    setup.tx.close()
    await asyncio.wait_for(task, 10)
    assert [offsets for _, offsets in producer.committed] == [{TP: 2}, {TP: 3}]


async def test_a_revoked_partition_commits_what_is_ready_and_stops_its_producer() -> None:
    """Relinquish: the ready prefix is committed, the rest dropped, the producer stopped."""
    producer = FakeTransactionalProducer()
    async with running(producer) as s:
        for offset in (1, 2, 3):
            s.tracker.track(TP, offset)
        s.answer(1)
        s.answer(3)
        await s.tx.relinquish([TP], 5.0)
        assert producer.stopped
        s.answer(2)
        assert s.tx.buffered([TP]) == 0
    assert [offsets for _, offsets in producer.committed] == [{TP: 2}]


async def test_a_transaction_still_running_at_the_revoke_bound_is_aborted_not_left_open() -> None:
    """Past the revoke bound a hanging transaction is cancelled, aborted, its producer stopped."""
    producer = FakeTransactionalProducer()
    producer.hang = True
    async with running(producer) as s:
        s.tracker.track(TP, 1)
        s.answer(1)
        await wait_for(
            lambda: producer._txn_manager.state.name == "IN_TRANSACTION", timeout=5, what="a commit"
        )
        await s.tx.relinquish([TP], 0.05)
        assert producer.aborted == 1, "left open, it would hold every read_committed reader back"
        assert producer.stopped
    assert producer.committed == []
    assert s.tracker.pending == 1, "served again by the next owner"


async def test_closing_stops_every_partitions_producer() -> None:
    """A graceful stop commits what is answered and stops the transactional producers."""
    producer = FakeTransactionalProducer()
    async with running(producer) as s:
        s.tracker.track(TP, 1)
        s.answer(1)
    assert [offsets for _, offsets in producer.committed] == [{TP: 2}]
    assert producer.stopped
    assert producer.aborted == 0, "nothing open to abort"


async def test_calls_audit_records_go_through_the_plain_replier() -> None:
    """A call's audit record is not a record's message: it is published outside transactions."""
    plain = FakeProducer([])
    async with running(FakeTransactionalProducer(), plain) as s:
        request = InferenceRequest("c-1", "m", [])
        call = Call("rest", 1, request, [], 0, lambda _response, _headers: None)
        audit = Outgoing(call, "c-1", "audit", b"{}", [])
        s.tx.submit([audit])
    assert [topic for topic, _ in plain.sent] == ["audit"]


@given(
    gaps=st.lists(st.integers(1, 3), min_size=1, max_size=30),
    answered_mask=st.lists(st.booleans(), min_size=30, max_size=30),
)
def test_the_prefix_is_the_longest_run_of_answered_records_from_the_oldest(
    gaps: list[int], answered_mask: list[bool]
) -> None:
    """prefix() returns the leading answered offsets and the next unanswered (or end) offset."""
    tracker: OffsetTracker[str] = OffsetTracker()
    offsets, offset = [], 100
    for gap in gaps:
        offset += gap
        offsets.append(offset)
        tracker.track("p", offset)
    answered = {o for o, yes in zip(offsets, answered_mask, strict=False) if yes}
    leading = []
    for o in offsets:
        if o not in answered:
            break
        leading.append(o)
    result = tracker.prefix("p", answered)
    if not leading:
        assert result is None
    else:
        following = offsets[len(leading)] if len(leading) < len(offsets) else offsets[-1] + 1
        assert result == (leading, following)


def test_every_consumer_the_worker_and_its_client_make_reads_committed_records() -> None:
    """Replies of aborted transactions are never read: read_committed is the default."""
    from worker.kafka import consumer_config  # noqa: PLC0415 - this test only
    from worker.settings import KafkaSettings  # noqa: PLC0415

    assert consumer_config(KafkaSettings())["isolation_level"] == "read_committed"


def test_delivery_settings_refuse_unknown_modes_and_bounds() -> None:
    """Only the two delivery modes exist; the transaction cadence and timeout are bounded."""
    from pydantic import ValidationError  # noqa: PLC0415

    from worker.settings import KafkaSettings  # noqa: PLC0415

    assert KafkaSettings().delivery == "at_least_once"
    assert KafkaSettings(delivery="exactly_once").delivery == "exactly_once"
    for bad in (
        {"delivery": "exactly-once"},
        {"delivery": "EXACTLY_ONCE"},
        {"transaction_interval_ms": -1},
        {"transaction_interval_ms": 60_001},
        {"transaction_timeout_ms": 999},
        {"transaction_timeout_ms": 900_001},
    ):
        with pytest.raises(ValidationError):
            KafkaSettings(**bad)
