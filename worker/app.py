"""The worker: wiring and lifecycle of consumer, batchers, model calls, replies and commits.

One request's path::

    consumer.getmany ─> limits, decode (codec) ─> resolve + validate (models) ─> Batcher.put
        Batcher ─> deadline check ─> executor thread: forward pass (bad items isolated)
        Replier ─> producer.send (acks=all, idempotent) ─> ack ─> OffsetTracker.done
        commit loop ─> consumer.commit(lowest unanswered offset per partition)

Requests that cannot be served (over a limit, unknown model, wrong dtype or shape) skip the
batcher and go straight to the replier as coded error replies; records that are not requests
at all are copied to the dead-letter topic. Every child task lives in one ``asyncio.TaskGroup``;
there is no task per message. At most ``runtime.max_in_flight`` requests are between fetch and
acknowledged reply; at the bound the worker pauses its partitions until replies catch up.

Stopping (:meth:`Worker.stop`, wired to SIGTERM/SIGINT by the CLI): fetching stops, every
batcher flushes what it holds, every reply is acknowledged, offsets are committed, the consumer
leaves the group. A rebalance waits (bounded) for the revoked partitions' requests to be
answered and commits them before the partitions move. A watchdog ends the worker with
:class:`~worker.errors.WatchdogError` when it has work but makes no progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt
import structlog
import torch
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from worker.audit import AuditLog, audit_record
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
from worker.errors import DecodeError, ErrorCode, RequestError, WatchdogError, WorkerError
from worker.http import Probes, serve_http
from worker.kafka import ensure_topics, header, make_consumer, make_producer
from worker.metrics import Metrics
from worker.models import LoadedModel, run_isolated
from worker.offsets import OffsetTracker
from worker.replies import Outgoing, Replier, ReplyMeta, Source, Stage, TopicCache, dead_letter
from worker.repository import ModelRepository
from worker.settings import Settings
from worker.tracing import continue_trace

__all__ = ["ECHOED_HEADERS", "REPLY_TOPIC_HEADERS", "Worker"]

log = structlog.get_logger(__name__)

REPLY_TOPIC_HEADERS = ("reply_to", "kafka_replyTopic")
"""Request headers naming the reply topic (ours, then Spring's), in order of preference."""
ECHOED_HEADERS = ("tracestate", "kafka_correlationId")
"""Request headers copied unchanged onto the reply (``traceparent`` is continued, not copied)."""


@dataclass(slots=True)
class ShadowCounts:
    """How a model's shadow version compares with its primary (per model name)."""

    compared: int = 0
    """Requests both versions answered."""
    agreed: int = 0
    """Of those, how many gave an equal ``shadow_compare`` output."""
    failed: int = 0
    """Requests one of the two versions raised on, or whose deadline passed first."""
    dropped: int = 0
    """Copies not sent to the shadow because its queue was full (the primary is never slowed)."""


@dataclass(slots=True)
class _Comparison:
    """Primary and shadow results of one request, compared once both are in."""

    output: str
    primary_version: str
    shadow_version: str
    primary: list[Tensor] | Exception | None = None
    shadow: list[Tensor] | Exception | None = None


@dataclass(slots=True)
class _Job:
    """A decoded, validated request waiting for its batch (or a shadow copy of one)."""

    source: Source
    request: InferenceRequest
    model: LoadedModel
    arrays: list[npt.NDArray[Any]]
    enqueued: float
    deadline_ms: int | None
    comparison: _Comparison | None = None
    is_shadow: bool = False


@dataclass(slots=True)
class _Lane:
    """The batcher of one served model version, and the task running it."""

    model: LoadedModel
    batcher: Batcher[_Job]
    task: asyncio.Task[None]


class Worker:
    """Serves inference requests from Kafka until :meth:`stop` is called."""

    def __init__(self, settings: Settings, models: ModelRepository) -> None:
        self.settings = settings
        self.models = models
        self._stopping = asyncio.Event()
        self._progress = asyncio.Event()
        self._last_progress = time.monotonic()
        self._tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._retired: set[asyncio.Task[None]] = set()
        self._group: asyncio.TaskGroup | None = None
        self._reload = asyncio.Event()
        self.shadow: dict[str, ShadowCounts] = {}
        """Shadow comparison counts by model name."""
        self.reloads = 0
        """Reloads of the model repository that were applied."""
        self.metrics = Metrics()
        self.http_port: int | None = None
        """The port of the metrics and health endpoint, once it listens."""
        self.joined = False
        """True once the consumer has joined its group and received an assignment."""
        self._audit_log = AuditLog()
        self._worker_id = secrets.token_hex(4)
        self._batches = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._replier: Replier | None = None
        self.assigned: set[TopicPartition] = set()
        self.paused_times = 0
        """How often fetching was paused because ``max_in_flight`` was reached."""
        self.peak_in_flight = 0
        """The most requests ever in flight at once (never above ``max_in_flight``)."""

    @property
    def in_flight(self) -> int:
        """Requests fetched and not yet answered (reply or dead-letter copy acknowledged)."""
        return self._tracker.pending

    def healthy(self) -> tuple[bool, str]:
        """Liveness: False once there was work and no progress for the watchdog timeout."""
        timeout = self.settings.runtime.watchdog_timeout_s
        stalled = time.monotonic() - self._last_progress
        if timeout and self._tracker.pending and stalled > timeout:
            return False, f"no progress for {stalled:.0f}s with {self._tracker.pending} in flight"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """Readiness: models loaded and the group joined (an assignment received)."""
        if self._stopping.is_set():
            return False, "stopping"
        if not self.joined:
            return False, "waiting for the consumer group assignment"
        return True, f"ok: {len(self.assigned)} partition(s)"

    def request_reload(self) -> None:
        """Re-read the model repository soon (SIGHUP does this); the current one keeps serving."""
        self._reload.set()

    def stop(self) -> None:
        """Begin a graceful stop: no more fetching; finish, reply, commit, leave the group."""
        if not self._stopping.is_set():
            log.info("stop requested; draining in-flight requests")
        self._stopping.set()

    async def run(self) -> None:
        """Run until stopped; raises if the worker cannot go on (nothing is committed past it)."""
        kafka = self.settings.kafka
        # torch's own default (a thread per core) starves the event loop and the Kafka client
        # of CPU: measured on 2 cores, one torch thread served ~25% more requests than two.
        torch.set_num_threads(self.settings.models.threads)
        async with contextlib.AsyncExitStack() as stack:
            http = self.settings.http
            if http.enabled:
                probes = Probes(self.metrics.render, self.healthy, self.ready)
                self.http_port = await stack.enter_async_context(
                    serve_http(probes, http.host, http.port)
                )
            topics = [kafka.requests_topic, kafka.replies_topic, kafka.dead_letter_topic]
            await ensure_topics(kafka, [*topics, *filter(None, [self.settings.audit.topic])])
            consumer = make_consumer(kafka)
            producer = make_producer(kafka)
            self._consumer = consumer
            stack.push_async_callback(producer.stop)  # before start: closed even if it fails
            await producer.start()
            consumer.subscribe([kafka.requests_topic], listener=_RebalanceListener(self))
            await consumer.start()
            stack.push_async_callback(self._leave, consumer)
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
            # wait=False: a model call stuck forever must not keep the worker from exiting.
            stack.callback(executor.shutdown, wait=False, cancel_futures=True)
            self._executor = executor

            async def existing_topics() -> set[str]:
                return set((await producer.client.fetch_all_metadata()).topics())

            self._replier = Replier(
                producer,
                self._tracker,
                self._on_published,
                dead_letter_topic=kafka.dead_letter_topic,
                group_id=kafka.group_id,
                retries=self.settings.runtime.reply_retries,
                topic_exists=TopicCache(existing_topics).exists,
            )
            log.info(
                "worker started",
                topic=kafka.requests_topic,
                group=kafka.group_id,
                models=sorted(f"{m.name}:{m.version}" for m in self.models.all()),
            )
            _freeze_heap()
            stack.callback(gc.unfreeze)  # let exit-time collection see everything again
            await self._serve(consumer, self._replier)

    async def _serve(self, consumer: AIOKafkaConsumer, replier: Replier) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            self._open_lanes(self.models)
            replier_task = group.create_task(replier.run())
            background = [
                group.create_task(self._commit_loop()),
                group.create_task(self._watchdog(consumer)),
                group.create_task(self._reload_loop()),
                group.create_task(self._lag_loop(consumer)),
            ]
            await self._consume(consumer)
            try:
                async with asyncio.timeout(self.settings.runtime.shutdown_timeout_s):
                    for lane in self._lanes.values():
                        lane.batcher.close()
                    await asyncio.gather(*(lane.task for lane in self._lanes.values()))
                    await asyncio.gather(*self._retired)
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
                for task in background:
                    task.cancel()
                await self._commit()
        log.info("worker stopped cleanly")

    def _open_lanes(self, models: ModelRepository) -> None:
        """Start a batcher per served version that has none; retire those no longer served.

        A version whose program and batching are unchanged keeps its batcher. A retired
        batcher still answers everything it holds, with the version the request was given.
        """
        assert self._group is not None
        batching = self.settings.batching
        wanted = {(m.name, m.version): m for m in models.all()}
        for key, lane in list(self._lanes.items()):
            model = wanted.get(key)
            size = (model.config.max_batch_size or batching.max_batch_size) if model else None
            if (
                model is None
                or not lane.model.same_program(model)
                or (size != lane.batcher.max_batch_size)
            ):
                lane.batcher.close()
                self._retired.add(lane.task)
                lane.task.add_done_callback(self._retired.discard)
                del self._lanes[key]
        for key, model in wanted.items():
            if key in self._lanes:
                self._lanes[key].model = model
                continue
            delay_ms = model.config.max_batch_delay_ms
            if delay_ms is None:
                delay_ms = batching.max_batch_delay_ms
            batcher: Batcher[_Job] = Batcher(
                self._run_batch,
                max_batch_size=model.config.max_batch_size or batching.max_batch_size,
                max_batch_delay=delay_ms / 1000,
            )
            self._lanes[key] = _Lane(model, batcher, self._group.create_task(batcher.run()))

    async def _reload_loop(self) -> None:
        """Apply repository changes on request (SIGHUP) or, if enabled, when files change."""
        interval = self.settings.models.poll_interval_s
        seen = await asyncio.to_thread(self.models.fingerprint)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval or None):
                    await self._reload.wait()
            requested = self._reload.is_set()
            self._reload.clear()
            current = await asyncio.to_thread(self.models.fingerprint)
            if current == seen and not requested:
                continue
            seen = current
            models, errors = await asyncio.to_thread(self.models.reload)
            for error in errors:
                log.error(
                    "model reload failed; the model keeps its current versions", error=str(error)
                )
                self.metrics.reloads.labels("failed").inc()
            self.metrics.reloads.labels("ok").inc()
            self.models = models
            self._open_lanes(models)
            _freeze_heap()
            self.reloads += 1
            log.info(
                "model repository reloaded",
                models=sorted(f"{m.name}:{m.version}" for m in models.all()),
                failed=len(errors),
            )

    def _on_published(self, items: Sequence[Outgoing]) -> None:
        """Everything for a group of records is acknowledged: count, audit, note progress."""
        now_ms = time.time() * 1000
        metrics = self.metrics
        audit = self.settings.audit.log
        records = []
        outcomes: Counter[tuple[str, str, str]] = Counter()
        latency: dict[tuple[str, str], Any] = {}  # labelled children, looked up once per group
        for item in items:
            if item.is_dead_letter:
                metrics.dead_lettered.labels(item.stage or "").inc()
            meta = item.meta
            if meta is None:
                continue
            latency_s = max(0.0, now_ms - item.source.timestamp_ms) / 1000
            outcomes[(meta.model, meta.version, meta.outcome)] += 1
            labels = (meta.model, meta.version)
            child = latency.get(labels) or latency.setdefault(
                labels, metrics.latency.labels(*labels)
            )
            child.observe(latency_s)
            if audit:
                records.append(audit_record(item, meta, latency_s))
        for labels_outcome, count in outcomes.items():
            metrics.requests.labels(*labels_outcome).inc(count)
        self._audit_log.write(records)
        metrics.in_flight.set(self._tracker.pending)
        self._last_progress = time.monotonic()
        self._progress.set()

    async def _lag_loop(self, consumer: AIOKafkaConsumer) -> None:
        """Keep the consumer-lag gauge current: high watermark minus committed position."""
        shown: set[TopicPartition] = set()
        while True:
            await asyncio.sleep(1.0)
            assigned = consumer.assignment()
            for tp in shown - assigned:
                self.metrics.lag.remove(tp.topic, str(tp.partition))
            for tp in assigned:
                highwater = consumer.highwater(tp)
                if highwater is None:
                    continue
                committed = self._tracker.committed(tp)
                if committed is None:
                    committed = await consumer.position(tp)
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(
                    max(0, highwater - committed)
                )
            shown = set(assigned)
            self.metrics.in_flight.set(self._tracker.pending)

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        max_in_flight = self.settings.runtime.max_in_flight
        max_records = self.settings.kafka.fetch_max_records
        paused = False
        while not self._stopping.is_set():
            room = max_in_flight - self._tracker.pending
            if room <= 0:
                if not paused:
                    # Stop the background fetcher too, not just our reads: no buffering.
                    consumer.pause(*consumer.assignment())
                    paused = True
                    self.paused_times += 1
                self._progress.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await self._progress.wait()
                continue
            if paused:
                consumer.resume(*consumer.paused())
                paused = False
            fetched = await consumer.getmany(timeout_ms=100, max_records=min(room, max_records))
            for tp, records in fetched.items():
                for record in records:
                    self._tracker.track(tp, record.offset)
                    source = Source(
                        tp,
                        record.offset,
                        record.key,
                        record.value,
                        record.headers,
                        record.timestamp,
                    )
                    self._dispatch(source)
            self.peak_in_flight = max(self.peak_in_flight, self._tracker.pending)

    def _dispatch(self, source: Source) -> None:
        runtime = self.settings.runtime
        try:
            request = decode_request(source.value)
        except DecodeError as exc:
            self._dead_letter_undecodable(source, exc)
            return
        try:
            _check_limits(self.settings, source, request)
            served = self.models.get(request.model_name)
            model = served.choose(request.model_version, request.id)
            arrays = model.validate(request)
        except RequestError as exc:
            self._reply_error(source, request, exc)
            return
        deadline = request.deadline_ms
        if deadline is None and runtime.default_timeout_ms:
            deadline = source.timestamp_ms + runtime.default_timeout_ms
        job = _Job(source, request, model, arrays, time.monotonic(), deadline)
        shadow = served.shadow() if not request.model_version else None
        if shadow is not None and shadow.version != model.version:
            self._put_shadow(job, shadow)
        self._lanes[(model.name, model.version)].batcher.put(job)

    def _put_shadow(self, job: _Job, shadow: LoadedModel) -> None:
        counts = self.shadow.setdefault(shadow.name, ShadowCounts())
        lane = self._lanes[(shadow.name, shadow.version)]
        if len(lane.batcher) >= self.settings.runtime.max_in_flight:
            counts.dropped += 1
            self.metrics.shadow.labels(
                shadow.name, job.model.version, shadow.version, "dropped"
            ).inc()
            return
        output = shadow.config.routing.shadow_compare or shadow.config.outputs[-1].name
        job.comparison = _Comparison(output, job.model.version, shadow.version)
        copy = _Job(
            job.source,
            job.request,
            shadow,
            job.arrays,
            job.enqueued,
            job.deadline_ms,
            comparison=job.comparison,
            is_shadow=True,
        )
        lane.batcher.put(copy)

    def _compare(self, job: _Job, result: list[Tensor] | Exception | None) -> None:
        """Record one side of a shadow comparison; count it when both sides are in.

        ``None`` stands for "not run" (deadline passed).
        """
        comparison = job.comparison
        assert comparison is not None
        outcome: list[Tensor] | Exception = result if result is not None else TimeoutError()
        if job.is_shadow:
            comparison.shadow = outcome
        else:
            comparison.primary = outcome
        primary, shadow = comparison.primary, comparison.shadow
        if primary is None or shadow is None:
            return
        counts = self.shadow.setdefault(job.model.name, ShadowCounts())
        counter = self.metrics.shadow.labels(
            job.model.name, comparison.primary_version, comparison.shadow_version, "failed"
        )
        if isinstance(primary, Exception) or isinstance(shadow, Exception):
            counts.failed += 1
            counter.inc()
            return
        counts.compared += 1
        first = next(t for t in primary if t.name == comparison.output).to_numpy()
        second = next(t for t in shadow if t.name == comparison.output).to_numpy()
        agreed = first.shape == second.shape and bool((first == second).all())
        labels = (job.model.name, comparison.primary_version, comparison.shadow_version)
        self.metrics.shadow.labels(*labels, "agreed" if agreed else "disagreed").inc()
        if agreed:
            counts.agreed += 1
        else:
            log.info(
                "shadow disagrees with primary",
                correlation_id=job.request.id,
                model=job.model.name,
                output=comparison.output,
            )

    def _dead_letter_undecodable(self, source: Source, exc: DecodeError) -> None:
        """Copy the record to the dead-letter topic; answer it too if it names a correlation id."""
        raw_id = header(source.headers, "correlation_id")
        log.warning(
            "undecodable record dead-lettered",
            partition=source.tp.partition,
            offset=source.offset,
            error=exc.message,
            correlation_id=raw_id.decode(errors="replace") if raw_id else None,
        )
        kafka = self.settings.kafka
        outgoing = [
            dead_letter(source, kafka.dead_letter_topic, Stage.DECODE, exc, group_id=kafka.group_id)
        ]
        if raw_id is not None:
            request = InferenceRequest(id=raw_id.decode(errors="replace"), model_name="", inputs=[])
            outgoing += self._outgoing(source, _error_response(request, exc))
        assert self._replier is not None
        self._replier.submit(outgoing)

    def _reply_error(self, source: Source, request: InferenceRequest, exc: RequestError) -> None:
        log.info(
            "request answered with an error",
            correlation_id=request.id,
            model=request.model_name,
            code=str(exc.code),
            error=exc.message,
        )
        assert self._replier is not None
        self._replier.submit(self._outgoing(source, _error_response(request, exc)))

    def _outgoing(
        self,
        source: Source,
        response: InferenceResponse,
        batch_id: str | None = None,
    ) -> list[Outgoing]:
        """The reply to a record (and its audit record, if audit goes to a topic)."""
        headers = dict(source.headers)  # one pass; the last value of a header wins
        topic = self.settings.kafka.replies_topic
        for name in REPLY_TOPIC_HEADERS:
            value = headers.get(name)
            if value:
                topic = value.decode(errors="replace")
                break
        trace = continue_trace(headers.get("traceparent"))
        reply_headers = [
            ("correlation_id", response.id.encode()),
            ("traceparent", trace.traceparent),
        ]
        for name in ECHOED_HEADERS:
            value = headers.get(name)
            if value is not None:
                reply_headers.append((name, value))
        timing = response.timing
        meta = ReplyMeta(
            model=response.model_name,
            version=response.model_version or "",
            outcome=response.error.code if response.error else "ok",
            trace_id=trace.trace_id,
            batch_id=batch_id,
            queue_s=timing.queue_us / 1e6 if timing else None,
            compute_s=timing.compute_us / 1e6 if timing else None,
        )
        reply = Outgoing(
            source, response.id, topic, encode_response(response), reply_headers, meta=meta
        )
        audit_topic = self.settings.audit.topic
        if not audit_topic:
            return [reply]
        latency_s = max(0.0, time.time() * 1000 - source.timestamp_ms) / 1000
        record = audit_record(reply, meta, latency_s)
        return [reply, Outgoing(source, response.id, audit_topic, json.dumps(record).encode(), [])]

    async def _run_batch(self, jobs: list[_Job]) -> None:
        model = jobs[0].model
        now_ms = time.time() * 1000
        expired = [j for j in jobs if j.deadline_ms is not None and j.deadline_ms < now_ms]
        live = [j for j in jobs if j.deadline_ms is None or j.deadline_ms >= now_ms]
        outgoing: list[Outgoing] = []
        for job in expired:
            if job.comparison is not None:
                self._compare(job, None)
            if not job.is_shadow:
                outgoing += self._outgoing(job.source, _expired_response(job, now_ms))
        if live:
            self._batches += 1
            batch_id = f"{self._worker_id}-{self._batches}"
            started = time.monotonic()
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(
                self._executor, run_isolated, model, [job.arrays for job in live]
            )
            compute_s = time.monotonic() - started
            labels = (model.name, model.version)
            self.metrics.compute.labels(*labels).observe(compute_s)
            self.metrics.batch_size.labels(*labels).observe(len(live))
            queue_wait = self.metrics.queue_wait.labels(*labels)
            for job, result in zip(live, results, strict=True):
                queue_wait.observe(started - job.enqueued)
                if job.comparison is not None:
                    self._compare(job, result)
                if job.is_shadow:
                    continue
                timing = Timing(
                    int((started - job.enqueued) * 1e6), int(compute_s * 1e6), len(live)
                )
                response = _model_response(model, job, result, timing)
                outgoing += self._outgoing(job.source, response, batch_id)
            log.debug(
                "batch done",
                model=model.name,
                version=model.version,
                size=len(live),
                expired=len(expired),
                compute_s=compute_s,
            )
        assert self._replier is not None
        self._replier.submit(outgoing)

    async def _commit_loop(self) -> None:
        interval = self.settings.runtime.commit_interval_ms / 1000
        while True:
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
            self.metrics.commits.labels("failed").inc()
            log.warning("commit failed; will retry", error=repr(exc), positions=_fmt(positions))
            return
        self.metrics.commits.labels("ok").inc()
        self._tracker.mark_committed(positions)
        log.debug("committed", positions=_fmt(positions))

    async def _watchdog(self, consumer: AIOKafkaConsumer) -> None:
        """Raise :class:`WatchdogError` when there is work but no progress for too long."""
        timeout = self.settings.runtime.watchdog_timeout_s
        if not timeout:
            return
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            if not await self._has_work(consumer):
                self._last_progress = time.monotonic()
                continue
            stalled = time.monotonic() - self._last_progress
            if stalled > timeout:
                log.critical(
                    "watchdog: no progress while there is work; exiting so that a supervisor "
                    "restarts the worker",
                    stalled_s=round(stalled, 1),
                    in_flight=self._tracker.pending,
                )
                raise WatchdogError(
                    f"no reply published for {stalled:.0f}s with {self._tracker.pending} "
                    f"request(s) in flight (WORKER_RUNTIME__WATCHDOG_TIMEOUT_S={timeout:g})"
                )

    async def _has_work(self, consumer: AIOKafkaConsumer) -> bool:
        if self._tracker.pending:
            return True
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is not None and highwater > await consumer.position(tp):
                return True
        return False

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


def _freeze_heap() -> None:
    """Exempt what exists now (torch, the models, the clients) from garbage collection.

    With torch loaded, Python tracks ~400,000 objects; a full collection walks them all and
    stops the event loop for ~0.4 s (measured on the development machine), a latency spike
    for every request in flight. Frozen objects are never walked again; objects made later
    are collected as usual, and frozen ones still die by reference counting.
    """
    gc.collect()
    gc.freeze()


def _check_limits(settings: Settings, source: Source, request: InferenceRequest) -> None:
    """Raise RESOURCE_EXHAUSTED for a request over the size limits, before any allocation."""
    runtime = settings.runtime
    size = len(source.value or b"")
    if size > runtime.max_request_bytes:
        raise RequestError(
            ErrorCode.RESOURCE_EXHAUSTED,
            f"request is {size} bytes; this worker serves at most "
            f"{runtime.max_request_bytes} (WORKER_RUNTIME__MAX_REQUEST_BYTES)",
        )
    elements = sum(math.prod(t.shape) for t in request.inputs)
    if elements > runtime.max_request_elements:
        raise RequestError(
            ErrorCode.RESOURCE_EXHAUSTED,
            f"inputs declare {elements} elements in all; this worker serves at most "
            f"{runtime.max_request_elements} (WORKER_RUNTIME__MAX_REQUEST_ELEMENTS)",
        )


def _expired_response(job: _Job, now_ms: float) -> InferenceResponse:
    return _error_response(
        job.request,
        RequestError(
            ErrorCode.DEADLINE_EXCEEDED,
            f"deadline {job.deadline_ms} (Unix ms) passed "
            f"{now_ms - (job.deadline_ms or 0):.0f} ms before its batch ran; the model was not run",
        ),
    )


def _error_response(request: InferenceRequest, exc: RequestError) -> InferenceResponse:
    return InferenceResponse(
        id=request.id,
        model_name=request.model_name,
        model_version=request.model_version,
        error=ErrorInfo(str(exc.code), exc.message),
    )


def _model_response(
    model: LoadedModel, job: _Job, result: list[Tensor] | Exception, timing: Timing
) -> InferenceResponse:
    outputs: list[Tensor] = []
    error = None
    if isinstance(result, Exception):
        log.error(
            "model raised on a request",
            correlation_id=job.request.id,
            model=model.name,
            version=model.version,
            error=repr(result),
        )
        error = ErrorInfo(
            str(ErrorCode.INTERNAL),
            f"model {model.name} v{model.version} failed on this request: "
            f"{type(result).__name__}: {result}",
        )
    else:
        outputs = result
    return InferenceResponse(
        id=job.request.id,
        model_name=model.name,
        model_version=model.version,
        outputs=outputs,
        error=error,
        timing=timing,
    )


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
        self._worker.joined = True
        log.info("partitions assigned", partitions=_fmt_tps(assigned))


def _fmt(positions: dict[TopicPartition, int]) -> dict[str, int]:
    return {f"{tp.topic}[{tp.partition}]": pos for tp, pos in positions.items()}


def _fmt_tps(tps: set[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in tps)
