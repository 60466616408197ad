"""The worker's lifecycle: start, serve, reload, stop. The request path is :mod:`worker.pipeline`.

Starting: the metrics endpoint, then (with Kafka) the topics, the schema registry client, the
producer and the group consumer (:mod:`worker.intake`); then the pipeline (tokenizer stage and
lanes, :mod:`worker.pipeline`), the replier (:mod:`worker.replies`), the commit loop, the
watchdog and lag gauge (:mod:`worker.supervision`), the reloader (:mod:`worker.reloading`), and
the REST and gRPC endpoints (:mod:`worker.direct`). Every child task lives in one
``asyncio.TaskGroup``; there is no task per message. At most ``runtime.max_in_flight`` requests
of every origin are between arrival and acknowledged answer (:mod:`worker.inflight`).

Stopping (:meth:`Worker.stop`, wired to SIGTERM/SIGINT by the CLI): fetching stops, new calls
are answered UNAVAILABLE, every lane answers what it holds, every reply is acknowledged,
offsets are committed, the consumer leaves the group. A rebalance waits (bounded) for the
revoked partitions' requests to be answered and commits them before the partitions move.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence

import structlog
import torch
from aiokafka import AIOKafkaProducer, TopicPartition

from worker import heap
from worker.answers import Settled
from worker.audit import AuditLog
from worker.direct import Direct
from worker.errors import DeviceLostError, DrainTimeoutError
from worker.formats import PLAIN, Codecs
from worker.grpc_api import serve_grpc
from worker.handover import Handover
from worker.http import Probes, serve_http
from worker.inflight import InFlight
from worker.intake import Intake
from worker.kafka import ensure_topics, make_producer
from worker.metrics import Metrics
from worker.outgoing import Destinations
from worker.pipeline import Pipeline
from worker.progress import Progress
from worker.reloading import Reloader, names
from worker.replies import Replier, TopicCache
from worker.repository import ModelRepository
from worker.rest import V2Api, serve_rest, server_version
from worker.schema_registry import SchemaRegistry
from worker.settings import Settings
from worker.supervision import Supervisor
from worker.transactions import Transactions

__all__ = ["Worker"]

log = structlog.get_logger(__name__)


class Worker:
    """Serves inference requests from Kafka (and REST/gRPC) until :meth:`stop` is called."""

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
        calls = settings.rest.enabled or settings.grpc.enabled
        share = runtime.reserved_for_calls if calls else 0.0
        self._in_flight = InFlight.reserving(runtime.max_in_flight, share)
        self.metrics.in_flight.set_function(lambda: self._in_flight.count)  # read when scraped
        self._intake = Intake(
            kafka, runtime, self._in_flight, metrics=self.metrics, progress=self._progress
        )
        self._supervisor = Supervisor(
            self._intake,
            self._progress,
            self._stopping,
            metrics=self.metrics,
            watchdog_timeout_s=runtime.watchdog_timeout_s,
        )
        self._audit_log = AuditLog()
        self._reloader = Reloader(
            lambda: self.repository,
            self._serve_repository,
            poll_interval_s=settings.models.poll_interval_s,
            metrics=self.metrics,
        )
        self._pipeline: Pipeline | None = None
        self._registry: SchemaRegistry | None = None
        """The schema registry client while running (``WORKER_SCHEMA_REGISTRY__URL`` set)."""
        self._serving = False
        """The endpoints are up (readiness without Kafka)."""

    @property
    def assigned(self) -> frozenset[TopicPartition]:
        """The partitions of the requests topic assigned to this worker now."""
        return frozenset(self._intake.assigned)

    @property
    def in_flight(self) -> int:
        """Records fetched and not yet answered (reply or dead-letter copy acknowledged)."""
        return self._in_flight.records.pending

    @property
    def direct_in_flight(self) -> int:
        """REST and gRPC requests admitted and not yet answered."""
        return self._in_flight.calls

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

    def request_reload(self) -> None:
        """Re-read the model repository soon (SIGHUP does this); the current one keeps serving."""
        self._reloader.request()

    def stop(self) -> None:
        """Begin a graceful stop: no more fetching; finish, reply, commit, leave the group."""
        if not self._stopping.is_set():
            log.info("stop requested; draining in-flight requests")
        self._stopping.set()

    async def run(self) -> None:
        """Run until stopped; raises if the worker cannot go on (nothing is committed past it)."""
        settings, kafka = self.settings, self.settings.kafka
        # torch's own default (a thread per core) starves the event loop and the Kafka client
        # of CPU: measured on 2 cores, one torch thread served ~25% more requests than two.
        torch.set_num_threads(settings.models.threads)
        async with contextlib.AsyncExitStack() as stack:
            if settings.http.enabled:
                probes = Probes(self.metrics.render, self.healthy, self.ready)
                self.http_port = await stack.enter_async_context(serve_http(probes, settings.http))
            replier = await self._connect(stack) if kafka.enabled else None
            if replier is not None:  # before the consumer leaves: commit if a device failed
                stack.push_async_exit(self._commit_if_device_lost)
            codecs = Codecs(self._registry) if self._registry is not None else PLAIN
            log.info(
                "worker started",
                topic=kafka.requests_topic if kafka.enabled else None,
                group=kafka.group_id if kafka.enabled else None,
                rest=settings.rest.enabled,
                grpc=settings.grpc.enabled,
                models=names(self.repository),
            )
            stack.enter_context(heap.serving())  # the heap frozen, young collections deferred
            async with asyncio.TaskGroup() as group:
                pipeline = Pipeline(
                    group, settings, repository=lambda: self.repository,
                    destinations=self._destinations, codecs=codecs, in_flight=self._in_flight,
                    metrics=self.metrics,
                    publish=replier.submit if replier is not None else None,
                    acknowledged=self._acknowledged,
                )  # fmt: skip
                async with pipeline:
                    self._pipeline = pipeline
                    await self._serve(group, pipeline, replier)
        log.info("worker stopped cleanly")

    async def _commit_if_device_lost(self, *exc_info: object) -> bool:
        """A device failed for good (the worker exits, #25): commit what was answered first."""
        error = exc_info[1]
        if isinstance(error, BaseExceptionGroup) and error.subgroup(DeviceLostError):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.runtime.shutdown_timeout_s):
                    await self._intake.commit()
        return False

    async def _connect(self, stack: contextlib.AsyncExitStack) -> Replier | Transactions:
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
        producer = make_producer(kafka)
        stack.push_async_callback(producer.stop)  # before start: closed even if it fails
        await producer.start()
        replier: Replier | Transactions = self._make_replier(producer)
        if kafka.delivery == "exactly_once":
            assert isinstance(replier, Replier)
            replier = Transactions.for_settings(
                self.settings, self._intake.tracker, replier, self._acknowledged,
                destinations=self._destinations, metrics=self.metrics,
            )  # fmt: skip
            self._intake.handover = Handover(replier)
        await stack.enter_async_context(self._intake.running())
        return replier

    async def _serve(
        self, group: asyncio.TaskGroup, pipeline: Pipeline, replier: Replier | Transactions | None
    ) -> None:
        """Fetch and serve until stopped, then drain: answer, publish, commit (bounded)."""
        intake, supervisor = self._intake, self._supervisor
        replying = group.create_task(replier.run()) if replier is not None else None
        background = [group.create_task(self._reloader.run())]
        if replier is not None:
            background += [
                group.create_task(intake.commit_loop()),
                group.create_task(supervisor.watchdog()),
                group.create_task(supervisor.lag_loop()),
            ]
        direct = Direct(pipeline.dispatch, self._in_flight)
        async with self._endpoints(direct):
            if replier is not None:
                prepare = self._registry.prepare if self._registry is not None else None
                await intake.consume(self._stopping, pipeline, prepare)
            else:
                await self._stopping.wait()
            direct.closing = True  # new calls: UNAVAILABLE
            try:
                async with asyncio.timeout(self.settings.runtime.shutdown_timeout_s):
                    await pipeline.drain()
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

    def _acknowledged(self, items: Sequence[Settled]) -> None:
        """Answers are done (published, or handed to their callers): count, audit, progress."""
        now_ms = time.time() * 1000
        self.metrics.acknowledged(items, now_ms)
        if self.settings.audit.log:
            self._audit_log.acknowledged(items, now_ms)
        self._progress.note()

    def _serve_repository(self, repository: ModelRepository) -> None:
        """Serve a reloaded repository (the pipeline first: if it raises, nothing changed)."""
        if self._pipeline is not None:
            self._pipeline.reload(repository)
        self.repository = repository
        heap.freeze()
