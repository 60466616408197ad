"""The worker: wiring and lifecycle (start, serve, reload, stop) of the request path's parts.

One request's path, a module a step::

    intake       consumer.getmany ─> (new schema ids looked up) ─> OffsetTracker.track ─> Source
    pipeline     Pipeline.dispatch: admission, then the tokenizer stage or lanes (every origin)
    admission    decode (any wire format) ─> limits ─> route (primary + shadow) ─> validate ─> Job
                     (or the error reply / dead-letter copy that answers it now)
    tokenizing   text jobs only: what has arrived, tokenised in one call, in its own thread
    lanes        Batcher (size, delay) ─> deadline check ─> the version's instances
                     (threads; device, precision): forward pass, pipelined (bad rows
                     isolated, out-of-memory batches split) ─> replies built by outgoing
    replies      record batches per partition (acks=all, idempotent) ─> OffsetTracker.done
    intake       commit loop ─> consumer.commit(lowest unanswered offset per partition)

Beside it, :mod:`worker.supervision` watches progress (watchdog, ``/healthz``, ``/readyz``,
lag). Every child task lives in one ``asyncio.TaskGroup``; there is no task per message. At
most ``runtime.max_in_flight`` requests are between fetch and acknowledged reply.

Stopping (:meth:`Worker.stop`, wired to SIGTERM/SIGINT by the CLI): fetching stops, every lane
answers what it holds, every reply is acknowledged, offsets are committed, the consumer leaves
the group. A rebalance waits (bounded) for the revoked partitions' requests to be answered
and commits them before the partitions move.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import structlog
import torch
from aiokafka import AIOKafkaProducer, TopicPartition

from worker.admission import Limits
from worker.audit import AuditLog
from worker.direct import Direct
from worker.errors import DrainTimeoutError
from worker.formats import Codecs
from worker.grpc_api import serve_grpc
from worker.http import Probes, serve_http
from worker.intake import Intake
from worker.kafka import ensure_topics, make_producer
from worker.lanes import Lanes
from worker.metrics import Metrics
from worker.outgoing import Destinations, Outgoing, Source, Stage, dead_letter
from worker.pipeline import Pipeline, router
from worker.replies import Replier, TopicCache
from worker.repository import ModelRepository
from worker.rest import V2Api, serve_rest, server_version
from worker.schema_registry import SchemaRegistry
from worker.settings import Settings
from worker.supervision import Progress, Supervisor
from worker.tokenizing import Tokenizing

__all__ = ["Worker"]

log = structlog.get_logger(__name__)


class Worker:
    """Serves inference requests from Kafka until :meth:`stop` is called."""

    def __init__(self, settings: Settings, repository: ModelRepository) -> None:
        self.settings = settings
        self.repository = repository
        self.metrics = Metrics()
        self.http_port: int | None = None
        """The port of the metrics and health endpoint, once it listens."""
        self.rest_port: int | None = None
        """The V2 REST endpoint's port, once it listens (``WORKER_REST__ENABLED``)."""
        self.grpc_port: int | None = None
        """The gRPC endpoint's port, once it listens (``WORKER_GRPC__ENABLED``)."""
        self._stopping = asyncio.Event()
        self._reload = asyncio.Event()
        self._progress = Progress()
        kafka, runtime = settings.kafka, settings.runtime
        self._destinations = Destinations(
            replies_topic=kafka.replies_topic,
            dead_letter_topic=kafka.dead_letter_topic,
            group_id=kafka.group_id,
            audit_topic=settings.audit.topic,
            requests_topic=kafka.requests_topic,
            reply_topics=tuple(kafka.reply_topics),
        )
        self._limits = Limits(
            runtime.max_request_bytes, runtime.max_request_elements, runtime.default_timeout_ms
        )
        self._intake = Intake(kafka, runtime, metrics=self.metrics, progress=self._progress)
        self._supervisor = Supervisor(
            self._intake,
            self._progress,
            self._stopping,
            metrics=self.metrics,
            watchdog_timeout_s=runtime.watchdog_timeout_s,
        )
        self._audit_log = AuditLog()
        self._direct: Direct | None = None
        self._serving = False
        """The endpoints are up (readiness without Kafka)."""
        self._registry: SchemaRegistry | None = None
        """The schema registry client while running (``WORKER_SCHEMA_REGISTRY__URL`` set)."""

    @property
    def assigned(self) -> frozenset[TopicPartition]:
        """The partitions of the requests topic assigned to this worker now."""
        return frozenset(self._intake.assigned)

    @property
    def in_flight(self) -> int:
        """Requests fetched and not yet answered (reply or dead-letter copy acknowledged)."""
        return self._intake.tracker.pending

    def healthy(self) -> tuple[bool, str]:
        """Liveness (``/healthz``): False once there was work and no progress for too long."""
        return self._supervisor.healthy()

    def ready(self) -> tuple[bool, str]:
        """Readiness (``/readyz``): the group joined and not stopping; where each model runs."""
        if self.settings.kafka.enabled:
            ok, detail = self._supervisor.ready()
        else:
            ok = self._serving and not self._stopping.is_set()
            detail = "ok: REST/gRPC only" if ok else "stopping" if self._serving else "starting"
        placed = ", ".join(
            f"{m.name} v{m.version} on {m.device} {m.execution.precision} x{m.execution.instances}"
            for m in self.repository.all()
        )
        return ok, f"{detail}; models: {placed}"

    @property
    def direct_in_flight(self) -> int:
        """REST and gRPC requests admitted and not yet answered."""
        return self._direct.pending if self._direct is not None else 0

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
        settings = self.settings
        kafka = settings.kafka
        # torch's own default (a thread per core) starves the event loop and the Kafka client
        # of CPU: measured on 2 cores, one torch thread served ~25% more requests than two.
        torch.set_num_threads(settings.models.threads)
        async with contextlib.AsyncExitStack() as stack:
            if settings.http.enabled:
                probes = Probes(self.metrics.render, self.healthy, self.ready)
                self.http_port = await stack.enter_async_context(
                    serve_http(probes, settings.http.host, settings.http.port)
                )
            replier = None
            if kafka.enabled:
                replier = await self._connect(stack)
            shadow_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow")
            tokenizer_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
            for pool in (shadow_executor, tokenizer_executor):
                # wait=False: a model call stuck forever must not keep the worker from exiting.
                stack.callback(pool.shutdown, wait=False, cancel_futures=True)
            log.info(
                "worker started",
                topic=kafka.requests_topic if kafka.enabled else None,
                group=kafka.group_id if kafka.enabled else None,
                rest=settings.rest.enabled,
                grpc=settings.grpc.enabled,
                models=_names(self.repository),
            )
            _freeze_heap()
            stack.callback(gc.unfreeze)  # let exit-time collection see everything again
            async with asyncio.TaskGroup() as group:
                route = router(
                    audit_topic=self._destinations.audit_topic,
                    acknowledged=self._acknowledged,
                    publish=replier.submit if replier is not None else None,
                )
                lanes = Lanes(
                    group,
                    threads=settings.models.threads,
                    shadow_executor=shadow_executor,
                    batching=settings.batching,
                    destinations=self._destinations,
                    submit=route,
                    metrics=self.metrics,
                    shadow_queue_limit=settings.runtime.max_in_flight,
                )
                stack.callback(lanes.close)  # each version's instances (threads)
                lanes.open(self.repository)
                tokenizing = Tokenizing(
                    tokenizer_executor,
                    forward=lanes.put,
                    answer=route,
                    destinations=self._destinations,
                )
                await self._serve(group, lanes, tokenizing, replier, route)
        log.info("worker stopped cleanly")

    async def _connect(self, stack: contextlib.AsyncExitStack) -> Replier:
        """Kafka: topics, the schema registry (if any), the producer, the group consumer."""
        settings, kafka = self.settings, self.settings.kafka
        await ensure_topics(kafka, settings.topics())
        if settings.schema_registry.url:  # registers the reply schema: fails start if it can't
            self._registry = await stack.enter_async_context(
                SchemaRegistry(
                    settings.schema_registry,
                    reply_subject=f"{kafka.replies_topic}-value",
                    lookups=self.metrics.schema_lookups,
                )
            )
            self._destinations = replace(self._destinations, codecs=Codecs(self._registry))
        producer = make_producer(kafka)
        stack.push_async_callback(producer.stop)  # before start: closed even if it fails
        await producer.start()
        await stack.enter_async_context(self._intake.running())
        return self._make_replier(producer)

    async def _serve(
        self,
        group: asyncio.TaskGroup,
        lanes: Lanes,
        tokenizing: Tokenizing,
        replier: Replier | None,
        route: Callable[[Sequence[Outgoing]], None],
    ) -> None:
        intake, supervisor = self._intake, self._supervisor
        replying = group.create_task(replier.run()) if replier is not None else None
        tokenizer = group.create_task(tokenizing.run())
        background = [group.create_task(self._reload_loop(lanes))]
        if replier is not None:
            background += [
                group.create_task(intake.commit_loop()),
                group.create_task(supervisor.watchdog()),
                group.create_task(supervisor.lag_loop()),
            ]

        pipeline = Pipeline(
            lambda: self.repository, self._limits, self._destinations, tokenizing, lanes, route
        )
        dispatch = pipeline.dispatch

        def unparseable(source: Source, error: Exception) -> None:
            route([dead_letter(self._destinations, source, Stage.FETCH, error)])

        prepare = self._registry.prepare if self._registry is not None else None
        direct = Direct(
            dispatch,
            records_in_flight=lambda: intake.tracker.pending,
            max_in_flight=self.settings.runtime.max_in_flight,
        )
        intake.others_in_flight = lambda: direct.pending
        self._direct = direct
        async with self._endpoints(direct):
            if replier is not None:
                await intake.consume(self._stopping, dispatch, unparseable, prepare)
            else:
                await self._stopping.wait()
            await self._drain(
                intake=intake, lanes=lanes, tokenizing=tokenizing, tokenizer=tokenizer,
                replier=replier, replying=replying, background=background, direct=direct,
            )  # fmt: skip

    @contextlib.asynccontextmanager
    async def _endpoints(self, direct: Direct) -> AsyncIterator[None]:
        """The REST and gRPC endpoints, as enabled, while open."""
        settings = self.settings
        api = V2Api(lambda: self.repository, lambda: self.ready()[0], direct, server_version())
        async with contextlib.AsyncExitStack() as stack:
            if settings.rest.enabled:
                self.rest_port = await stack.enter_async_context(serve_rest(api, settings.rest))
            if settings.grpc.enabled:
                self.grpc_port = await stack.enter_async_context(serve_grpc(api, settings.grpc))
            self._serving = True
            yield

    async def _drain(
        self,
        *,
        intake: Intake,
        lanes: Lanes,
        tokenizing: Tokenizing,
        tokenizer: asyncio.Task[None],
        replier: Replier | None,
        replying: asyncio.Task[None] | None,
        background: list[asyncio.Task[None]],
        direct: Direct,
    ) -> None:
        """After fetching stopped: answer everything held, publish, commit (bounded)."""
        direct.closing = True  # new direct requests: UNAVAILABLE
        try:
            async with asyncio.timeout(self.settings.runtime.shutdown_timeout_s):
                tokenizing.close()
                await tokenizer
                await lanes.drain()
                if replier is not None and replying is not None:
                    replier.close()
                    await replying
        except TimeoutError:
            log.error(  # noqa: TRY400 - the timeout's traceback says nothing useful
                "shutdown timeout passed with requests unanswered; they will be served "
                "again by the next owner of their partitions",
                pending=intake.tracker.pending,
                timeout_s=self.settings.runtime.shutdown_timeout_s,
            )
            raise DrainTimeoutError(
                "drain did not finish within shutdown_timeout_s; what was done is committed"
            ) from None
        finally:
            for task in background:
                task.cancel()
            if replier is not None:
                await intake.commit()

    def _make_replier(self, producer: AIOKafkaProducer) -> Replier:
        async def existing_topics() -> set[str]:
            return set((await producer.client.fetch_all_metadata()).topics())

        return Replier(
            producer,
            self._intake.tracker,
            self._acknowledged,
            destinations=self._destinations,
            retries=self.settings.runtime.reply_retries,
            topic_exists=TopicCache(existing_topics).exists,
        )

    def _acknowledged(self, items: Sequence[Outgoing]) -> None:
        """Everything for a group of records is acknowledged: count, audit, note progress."""
        now_ms = time.time() * 1000
        self.metrics.acknowledged(items, now_ms)
        if self.settings.audit.log:
            self._audit_log.acknowledged(items, now_ms)
        self.metrics.in_flight.set(self._intake.tracker.pending + self.direct_in_flight)
        self._progress.note()

    async def _reload_loop(self, lanes: Lanes) -> None:
        """Apply repository changes on request (SIGHUP) or, if enabled, when files change.

        A reload never stops the worker: whatever fails, the current state keeps serving and
        the reload counts as ``failed``.
        """
        interval = self.settings.models.poll_interval_s
        seen = await asyncio.to_thread(self.repository.fingerprint)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval or None):
                    await self._reload.wait()
            requested = self._reload.is_set()
            self._reload.clear()
            current = await asyncio.to_thread(self.repository.fingerprint)
            if current == seen and not requested:
                continue
            seen = current
            errors: list[Exception]
            try:
                repository, config_errors = await asyncio.to_thread(self.repository.reload)
                lanes.open(repository)  # builds every new lane before it changes any
                errors = list(config_errors)
            except Exception as exc:
                log.exception("model reload failed; the current models keep serving")
                errors, repository = [exc], self.repository
            for error in errors:
                log.error(
                    "model reload failed; the model keeps its current versions",
                    error=str(error)[:500],
                )
            self.metrics.reloads.labels("failed" if errors else "ok").inc()
            self.repository = repository
            _freeze_heap()
            log.info("model repository reloaded", models=_names(repository), failed=len(errors))


def _names(repository: ModelRepository) -> list[str]:
    return sorted(f"{m.name}:{m.version}" for m in repository.all())


def _freeze_heap() -> None:
    """Exempt what exists now (torch, the models, the clients) from garbage collection.

    With torch loaded, Python tracks ~400,000 objects; a full collection walks them all and
    stops the event loop for ~0.4 s (measured on the development machine), a latency spike
    for every request in flight. Frozen objects are never walked again; objects made later
    are collected as usual, and frozen ones still die by reference counting.
    """
    gc.collect()
    gc.freeze()
