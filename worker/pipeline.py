"""The request path, stated once: from a request's arrival to where its answer goes.

::

    a Kafka record (worker.intake) or a call (worker.direct: REST, gRPC)
      │  counted in InFlight (worker.inflight) until its answer is acknowledged
      └─ Pipeline.dispatch ─> admission.admit ─┬─ Answered ───────────────────────────┐
                                               ├─ Admitted, its outputs cached ───────┤
                                               └─ Admitted ─┬─ strings pending ─┐     │
                                                            │   Tokenizing      │     │
                                                            └─> Lanes <─────────┘     │
                             Lanes: batch, run the model, answer (worker.answering)  │
      Pipeline.deliver(answers) <─────────────────────────────────────────────────────┘
        ├─ a record's: outgoing.messages (reply encoded in its wire format, audit record,
        │   dead-letter copy) ─> publish (worker.replies) ─> acknowledged, committed
        └─ a call's: its caller's respond (never encoded for Kafka) ─> acknowledged now;
            its audit record ─> publish (not tracked: a call has no offset)

Every stage ends a request with an :class:`~worker.answers.Answer` and hands it to
:meth:`Pipeline.deliver`, the one place that knows origins and sinks. When partitions are
revoked, :meth:`Pipeline.abandon` takes their queued requests out (their next owner serves
them), and an answer to a record of a revoked partition is never published. The worker
(:mod:`worker.app`) opens one :class:`Pipeline` when it starts serving; tests open the same one
around the same stages with a scripted ``publish``, so the whole path runs without Kafka.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType

from aiokafka import TopicPartition

from worker.admission import Admitted, Job, Limits, admit
from worker.answers import (
    Answer,
    ReplyMeta,
    Settled,
    Stage,
    failed_response,
    reply_meta,
    safe_text,
)
from worker.caching import CacheGauges, lookup
from worker.errors import detached
from worker.formats import Codecs
from worker.headers import header
from worker.inflight import InFlight
from worker.lanes import Lanes
from worker.metrics import Metrics
from worker.origins import Call, Origin, Record
from worker.outgoing import Destinations, Outgoing, audit_message, messages
from worker.repository import ModelRepository
from worker.settings import Settings
from worker.tokenizing import Tokenizing
from worker.tracing import continue_trace

__all__ = ["Pipeline", "Returned"]


@dataclass(frozen=True, slots=True)
class Returned:
    """A call's answer, handed to its caller: what metrics and the audit trail see of it."""

    origin: Call
    meta: ReplyMeta
    correlation_id: str
    stage: Stage | None = None
    topic: str | None = None
    """Always None: a call's answer goes to its caller, not to a topic."""


class Pipeline:
    """Admission, the tokenizer stage and the lanes, joined; every answer goes to its sink.

    ``publish``: the replier's submit (all messages of one record in one call); None without
    Kafka (REST/gRPC only). ``acknowledged``: answers done (published, or handed to their
    caller), for metrics, the audit log and progress. Open it (``async with``) to start the
    tokenizer stage and the lanes in ``group``; :meth:`drain` answers all they hold.
    """

    def __init__(
        self,
        group: asyncio.TaskGroup,
        settings: Settings,
        *,
        repository: Callable[[], ModelRepository],
        destinations: Destinations,
        codecs: Codecs,
        in_flight: InFlight,
        metrics: Metrics,
        publish: Callable[[list[Outgoing]], None] | None,
        acknowledged: Callable[[Sequence[Settled]], None],
    ) -> None:
        runtime = settings.runtime
        self.repository = repository
        """The repository serving now (a reload replaces it)."""
        self.limits = Limits(
            runtime.max_request_bytes, runtime.max_request_elements, runtime.default_timeout_ms
        )
        self.destinations = destinations
        self.codecs = codecs
        self.in_flight = in_flight
        self._metrics = metrics
        self._publish = publish
        self._acknowledged = acknowledged
        self._group = group
        self._pools = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
            for name in ("shadow", "tokenize")
        ]
        self.lanes = Lanes(
            group,
            threads=settings.models.threads,
            shadow_executor=self._pools[0],
            batching=settings.batching,
            deliver=self.deliver,
            metrics=metrics,
            shadow_queue_limit=runtime.max_in_flight,
        )
        self.tokenizing = Tokenizing(self._pools[1], forward=self.lanes.put, deliver=self.deliver)
        self._tokenizer: asyncio.Task[None] | None = None
        self._caches = CacheGauges(metrics)

    async def __aenter__(self) -> Pipeline:
        self.lanes.open(self.repository())
        self._caches.open(self.repository())
        self._tokenizer = self._group.create_task(self.tokenizing.run())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._tokenizer is not None:
            self._tokenizer.cancel()
        self.lanes.close()  # each version's instances (threads)
        for pool in self._pools:
            # wait=False: a model call stuck forever must not keep the worker from exiting.
            pool.shutdown(wait=False, cancel_futures=True)

    def dispatch(self, origin: Origin) -> None:
        """Admit one request; queue its job, or deliver its answer now."""
        outcome = admit(
            origin, self.repository(), self.limits, self.destinations, self.codecs,
            now=time.monotonic(), tokenize=False,
        )  # fmt: skip
        if not isinstance(outcome, Admitted):
            self.deliver(outcome.answers)
        elif (hit := lookup(outcome.job, self._metrics)) is not None:  # no batch, no shadow
            self.deliver([hit])
        elif outcome.job.prepared.pending:  # a text model's strings: tokenised batch-wise
            self.tokenizing.put(outcome)
        else:
            self.lanes.put(outcome)

    def unparseable(self, record: Record, error: Exception) -> None:
        """A record the Kafka client could not parse (bytes unknown): dead-letter its place."""
        self.deliver([Answer(record, failed=Stage.FETCH, error=detached(error))])

    def deliver(self, answers: Sequence[Answer]) -> None:
        """Send each answer where its origin says: a record's to Kafka, a call's to its caller."""
        published: list[Outgoing] = []
        returned: list[Returned] = []
        records = self.in_flight.records
        for answer in answers:
            origin = answer.origin
            if isinstance(origin, Record):
                if not records.current(origin.tp, origin.generation):  # revoked meanwhile
                    self._metrics.abandoned.inc()
                    continue
                published += messages(self.destinations, self.codecs, answer)
            else:
                returned.append(_return(origin, answer))
        if returned:
            self._acknowledged(returned)
            if self.destinations.audit_topic:
                published += [audit_message(self.destinations, r) for r in returned]
        if published and self._publish is not None:
            self._publish(published)

    def abandon(self, partitions: Collection[TopicPartition]) -> int:
        """Take the queued requests of revoked ``partitions`` out: they are never run or answered.

        Their offsets stay uncommitted, so the partitions' next owner serves them. Requests
        already running are not touched (their answers are published while the partitions are
        still ours). Returns how many records were taken out.
        """

        def revoked(job: Job) -> bool:
            return isinstance(job.origin, Record) and job.origin.tp in partitions

        jobs = [a.job for a in self.tokenizing.withdraw(revoked)]
        jobs += [job for job in self.lanes.withdraw(revoked) if not job.is_shadow]
        self._metrics.abandoned.inc(len(jobs))
        return len(jobs)

    def reload(self, repository: ModelRepository) -> None:
        """Serve ``repository`` from now on: new lanes built first, changed ones retired.

        Response caches of versions no longer served, or reloaded with a changed program or
        ``[cache]``, are dropped (:mod:`worker.caching`).
        """
        self.lanes.open(repository)
        self._caches.open(repository)

    async def drain(self) -> None:
        """Answer everything the tokenizer stage and the lanes hold, then let them end."""
        self.tokenizing.close()
        if self._tokenizer is not None:
            await self._tokenizer
        await self.lanes.drain()


def _return(call: Call, answer: Answer) -> Returned:
    """Hand a call its answer (with the continued trace context); what was handed."""
    response = answer.response
    if response is None:  # only a failure (a bug answering it): the caller gets INTERNAL
        response = failed_response(call, answer.failed or Stage.BATCH)
    response = safe_text(response)  # JSON and protobuf carry it, whatever a model raised
    trace = continue_trace(header(call.headers, "traceparent"))
    call.respond(response, [("traceparent", trace.traceparent)])
    return Returned(call, reply_meta(answer, response, trace), response.id)
