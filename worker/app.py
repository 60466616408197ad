"""The worker: wiring and lifecycle of consumer, batchers, model calls, replies and commits.

One request's path::

    consumer.getmany ─> decode (codec) ─> resolve + validate (models) ─> Batcher.put
        Batcher ─> executor thread: stack, forward pass, split ─> encode replies
        Replier ─> producer.send (acks=all, idempotent) ─> ack ─> OffsetTracker.done
        commit loop ─> consumer.commit(lowest unanswered offset per partition)

Requests that cannot be served (bad bytes, unknown model, wrong dtype or shape) skip the
batcher and go straight to the replier as coded error replies. Every child task lives in one
``asyncio.TaskGroup``; there is no task per message. At most ``runtime.max_in_flight`` requests
are between fetch and acknowledged reply; at the bound the worker stops fetching.

Stopping (:meth:`Worker.stop`, wired to SIGTERM/SIGINT by the CLI): fetching stops, every
batcher flushes what it holds, every reply is acknowledged, offsets are committed, the consumer
leaves the group. A rebalance waits (bounded) for the revoked partitions' requests to be
answered and commits them before the partitions move.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt
import structlog
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from worker.batching import Batcher
from worker.codec import (
    ErrorInfo,
    InferenceRequest,
    InferenceResponse,
    Tensor,
    Timing,
    decode_request,
    encode_response,
)
from worker.errors import DecodeError, ErrorCode, RequestError, WorkerError
from worker.kafka import Headers, ensure_topics, header, make_consumer, make_producer
from worker.models import LoadedModel, ModelRepository, split_outputs, stack_inputs
from worker.offsets import OffsetTracker
from worker.settings import Settings

__all__ = ["ECHOED_HEADERS", "REPLY_TOPIC_HEADERS", "Worker"]

log = structlog.get_logger(__name__)

REPLY_TOPIC_HEADERS = ("reply_to", "kafka_replyTopic")
"""Request headers naming the reply topic (ours, then Spring's), in order of preference."""
ECHOED_HEADERS = ("traceparent", "tracestate", "kafka_correlationId")
"""Request headers copied unchanged onto the reply."""


@dataclass(frozen=True, slots=True)
class _Source:
    """Where a request came from: its record's partition, offset, key and headers."""

    tp: TopicPartition
    offset: int
    key: bytes | None
    headers: Headers


@dataclass(slots=True)
class _Job:
    """A decoded, validated request waiting for its batch."""

    source: _Source
    request: InferenceRequest
    arrays: list[npt.NDArray[Any]]
    enqueued: float


@dataclass(slots=True)
class _Outgoing:
    """An encoded reply and the record it answers."""

    source: _Source
    correlation_id: str
    topic: str
    value: bytes
    headers: list[tuple[str, bytes]]


class _Replier:
    """Publishes replies in groups and marks their records done once acknowledged."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        tracker: OffsetTracker[TopicPartition],
        on_progress: Callable[[], None],
    ) -> None:
        self._producer = producer
        self._tracker = tracker
        self._on_progress = on_progress
        self._queue: deque[_Outgoing] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False

    def submit(self, items: Sequence[_Outgoing]) -> None:
        self._queue.extend(items)
        self._wakeup.set()

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            while not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            items = list(self._queue)
            self._queue.clear()
            await self._publish(items)

    async def _publish(self, items: list[_Outgoing]) -> None:
        pending: list[asyncio.Future[Any]] = []
        for item in items:
            try:
                fut = await self._producer.send(
                    item.topic, item.value, key=item.source.key, headers=item.headers
                )
            except KafkaError as exc:
                fut = asyncio.get_running_loop().create_future()
                fut.set_exception(exc)
            pending.append(fut)
        results = await asyncio.gather(*pending, return_exceptions=True)
        failed = []
        for item, result in zip(items, results, strict=True):
            if isinstance(result, BaseException):
                failed.append((item, result))
            else:
                self._tracker.done(item.source.tp, item.source.offset)
        self._on_progress()
        if failed:
            for item, error in failed:
                log.error(
                    "reply not published; its request stays uncommitted",
                    correlation_id=item.correlation_id,
                    reply_topic=item.topic,
                    partition=item.source.tp.partition,
                    offset=item.source.offset,
                    error=repr(error),
                )
            raise WorkerError(
                f"{len(failed)} replies could not be published (first: {failed[0][1]!r}); "
                "stopping so that their requests are served again after restart"
            ) from failed[0][1]


class Worker:
    """Serves inference requests from Kafka until :meth:`stop` is called."""

    def __init__(self, settings: Settings, models: ModelRepository) -> None:
        self.settings = settings
        self.models = models
        self._stopping = asyncio.Event()
        self._progress = asyncio.Event()
        self._tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._batchers: dict[tuple[str, str], Batcher[_Job]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._replier: _Replier | None = None
        self.assigned: set[TopicPartition] = set()

    def stop(self) -> None:
        """Begin a graceful stop: no more fetching; finish, reply, commit, leave the group."""
        if not self._stopping.is_set():
            log.info("stop requested; draining in-flight requests")
        self._stopping.set()

    async def run(self) -> None:
        """Run until stopped; raises if the worker cannot go on (nothing is committed past it)."""
        kafka = self.settings.kafka
        if self.settings.models.torch_threads:
            torch.set_num_threads(self.settings.models.torch_threads)
        await ensure_topics(kafka, [kafka.requests_topic, kafka.replies_topic])
        consumer = make_consumer(kafka)
        producer = make_producer(kafka)
        self._consumer = consumer
        async with contextlib.AsyncExitStack() as stack:
            await producer.start()
            stack.push_async_callback(producer.stop)
            consumer.subscribe([kafka.requests_topic], listener=_RebalanceListener(self))
            await consumer.start()
            stack.push_async_callback(self._leave, consumer)
            self._executor = stack.enter_context(
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
            )
            self._replier = _Replier(producer, self._tracker, self._progress.set)
            log.info(
                "worker started",
                topic=kafka.requests_topic,
                group=kafka.group_id,
                models={m.name + ":" + m.version for m in self.models.all()},
            )
            await self._serve(consumer, self._replier)

    async def _serve(self, consumer: AIOKafkaConsumer, replier: _Replier) -> None:
        async with asyncio.TaskGroup() as group:
            batcher_tasks = []
            for model in self.models.all():
                batcher = self._make_batcher(model)
                self._batchers[(model.name, model.version)] = batcher
                batcher_tasks.append(group.create_task(batcher.run()))
            replier_task = group.create_task(replier.run())
            commits = group.create_task(self._commit_loop(replier_task))
            await self._consume(consumer)
            try:
                async with asyncio.timeout(self.settings.runtime.shutdown_timeout_s):
                    for batcher in self._batchers.values():
                        batcher.close()
                    await asyncio.gather(*batcher_tasks)
                    replier.close()
                    await replier_task
            except TimeoutError:
                log.error(  # noqa: TRY400 - the timeout's traceback says nothing useful
                    "shutdown timeout passed with requests unanswered; they will be served "
                    "again by the next owner of their partitions",
                    pending=self._tracker.pending,
                    timeout_s=self.settings.runtime.shutdown_timeout_s,
                )
                raise WorkerError("drain did not finish within shutdown_timeout_s") from None
            finally:
                commits.cancel()
                await self._commit()
        log.info("worker stopped cleanly")

    def _make_batcher(self, model: LoadedModel) -> Batcher[_Job]:
        batching = self.settings.batching
        size = model.config.max_batch_size or batching.max_batch_size
        delay_ms = model.config.max_batch_delay_ms
        if delay_ms is None:
            delay_ms = batching.max_batch_delay_ms

        async def process(jobs: list[_Job]) -> None:
            await self._run_batch(model, jobs)

        return Batcher(process, max_batch_size=size, max_batch_delay=delay_ms / 1000)

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        runtime = self.settings.runtime
        max_records = self.settings.kafka.fetch_max_records
        while not self._stopping.is_set():
            room = runtime.max_in_flight - self._tracker.pending
            if room <= 0:
                self._progress.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await self._progress.wait()
                continue
            fetched = await consumer.getmany(timeout_ms=100, max_records=min(room, max_records))
            for tp, records in fetched.items():
                for record in records:
                    self._tracker.track(tp, record.offset)
                    source = _Source(tp, record.offset, record.key, record.headers)
                    self._dispatch(source, record.value)

    def _dispatch(self, source: _Source, value: bytes | None) -> None:
        try:
            request = decode_request(value)
        except DecodeError as exc:
            self._answer_undecodable(source, exc)
            return
        try:
            model = self.models.resolve(request.model_name, request.model_version)
            arrays = model.validate(request)
        except RequestError as exc:
            self._reply_error(source, request, exc)
            return
        job = _Job(source, request, arrays, time.monotonic())
        self._batchers[(model.name, model.version)].put(job)

    def _answer_undecodable(self, source: _Source, exc: DecodeError) -> None:
        raw_id = header(source.headers, "correlation_id")
        log.warning(
            "undecodable request",
            partition=source.tp.partition,
            offset=source.offset,
            error=exc.message,
            correlation_id=raw_id.decode(errors="replace") if raw_id else None,
        )
        if raw_id is None:
            # Nobody to answer: nothing identifies the sender. (Dead-lettering comes later.)
            self._tracker.done(source.tp, source.offset)
            self._progress.set()
            return
        request = InferenceRequest(id=raw_id.decode(errors="replace"), model_name="", inputs=[])
        self._reply_error(source, request, exc)

    def _reply_error(self, source: _Source, request: InferenceRequest, exc: RequestError) -> None:
        log.info(
            "request answered with an error",
            correlation_id=request.id,
            model=request.model_name,
            code=str(exc.code),
            error=exc.message,
        )
        response = InferenceResponse(
            id=request.id,
            model_name=request.model_name,
            model_version=request.model_version,
            error=ErrorInfo(str(exc.code), exc.message),
        )
        assert self._replier is not None
        self._replier.submit([self._outgoing(source, response)])

    def _outgoing(self, source: _Source, response: InferenceResponse) -> _Outgoing:
        topic = self.settings.kafka.replies_topic
        for name in REPLY_TOPIC_HEADERS:
            value = header(source.headers, name)
            if value:
                topic = value.decode(errors="replace")
                break
        reply_headers = [("correlation_id", response.id.encode())]
        for name in ECHOED_HEADERS:
            value = header(source.headers, name)
            if value is not None:
                reply_headers.append((name, value))
        return _Outgoing(source, response.id, topic, encode_response(response), reply_headers)

    async def _run_batch(self, model: LoadedModel, jobs: list[_Job]) -> None:
        started = time.monotonic()
        rows = [int(job.arrays[0].shape[0]) for job in jobs]

        def compute() -> list[list[Tensor]]:
            inputs = stack_inputs(model, [job.arrays for job in jobs])
            return split_outputs(model, model.predict(inputs), rows)

        loop = asyncio.get_running_loop()
        try:
            per_job: list[list[Tensor]] | None = await loop.run_in_executor(self._executor, compute)
            error = None
        except Exception as exc:
            log.exception("model raised on a batch", model=model.name, version=model.version)
            per_job = None
            error = ErrorInfo(
                str(ErrorCode.INTERNAL),
                f"model {model.name} v{model.version} failed: {type(exc).__name__}: {exc}",
            )
        compute_us = int((time.monotonic() - started) * 1e6)
        outgoing = []
        for i, job in enumerate(jobs):
            response = InferenceResponse(
                id=job.request.id,
                model_name=model.name,
                model_version=model.version,
                outputs=per_job[i] if per_job is not None else [],
                error=error,
                timing=Timing(int((started - job.enqueued) * 1e6), compute_us, len(jobs)),
            )
            outgoing.append(self._outgoing(job.source, response))
        assert self._replier is not None
        self._replier.submit(outgoing)
        log.debug(
            "batch done",
            model=model.name,
            version=model.version,
            size=len(jobs),
            compute_us=compute_us,
        )

    async def _commit_loop(self, replier: asyncio.Task[None]) -> None:
        interval = self.settings.runtime.commit_interval_ms / 1000
        while not replier.done():
            await asyncio.sleep(interval)
            await self._commit()

    async def _commit(self, partitions: Sequence[TopicPartition] | None = None) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        assigned = consumer.assignment()
        positions = {
            tp: pos for tp, pos in self._tracker.committable(partitions).items() if tp in assigned
        }
        if not positions:
            return
        try:
            await consumer.commit(positions)
        except KafkaError as exc:
            log.warning("commit failed; will retry", error=repr(exc), positions=_fmt(positions))
            return
        self._tracker.mark_committed(positions)
        log.debug("committed", positions=_fmt(positions))

    async def _drain_partitions(self, revoked: set[TopicPartition]) -> None:
        """Wait (bounded) for revoked partitions' requests to be answered, then commit them."""
        deadline = time.monotonic() + self.settings.runtime.shutdown_timeout_s
        while self._tracker.pending_in(revoked) and time.monotonic() < deadline:
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await self._progress.wait()
        left = self._tracker.pending_in(revoked)
        if left:
            log.warning(
                "partitions revoked with requests in flight; they will be served again",
                in_flight=left,
            )
        await self._commit(sorted(revoked))
        self._tracker.forget(revoked)

    async def _leave(self, consumer: AIOKafkaConsumer) -> None:
        await consumer.stop()
        self.assigned.clear()


class _RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Commits finished work of revoked partitions before they move to another worker."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            log.info("partitions revoked", partitions=_fmt_tps(revoked))
            await self._worker._drain_partitions(set(revoked))
        self._worker.assigned -= set(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._worker.assigned |= set(assigned)
        log.info("partitions assigned", partitions=_fmt_tps(assigned))


def _fmt(positions: dict[TopicPartition, int]) -> dict[str, int]:
    return {f"{tp.topic}[{tp.partition}]": pos for tp, pos in positions.items()}


def _fmt_tps(tps: set[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in tps)
