"""Operations against the real broker: /metrics counts, readiness, audit topic, trace ids."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest
from aiokafka import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from worker.answers import UNSERVED
from worker.app import Worker
from worker.client import InferenceClient
from worker.domain import Tensor
from worker.heap import YOUNG_GC_THRESHOLD
from worker.kafka import make_producer
from worker.metrics import Metrics
from worker.model import LoadedModel
from worker.repository import ModelRepository
from worker.settings import Settings
from worker.supervision import Supervisor

from .conftest import ROOT, changed, reply_reader, running_worker, wait_for

pytestmark = pytest.mark.kafka

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


async def get(worker: Worker, path: str) -> tuple[int, str]:
    """GET a path of the worker's HTTP endpoint."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{worker.http_port}{path}") as response,
    ):
        return response.status, await response.text()


async def scrape(worker: Worker) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by name and sorted labels."""
    status, text = await get(worker, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels_of(version: str) -> dict[str, str]:
    return {"model": "digits", "version": version}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_what_was_sent_and_lag_returns_to_zero(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """/metrics: N ok, errors by code, dead-lettered records, batches, commits; lag back to 0."""
    pixels = testset[0][:50]
    async with (
        running_worker(settings, repository) as worker,
        InferenceClient(settings.kafka) as client,
    ):
        ok = await asyncio.gather(
            *(client.infer("digits", {"pixels": pixels[i : i + 1]}) for i in range(50))
        )
        missing = await asyncio.gather(
            *(client.infer("nope", {"pixels": pixels[:1]}) for _ in range(3))
        )
        invalid = await asyncio.gather(
            *(client.infer("digits", {"pixels": pixels[:1, :5]}) for _ in range(2))
        )
        producer = make_producer(settings.kafka)
        await producer.start()
        try:
            await producer.send_and_wait(settings.kafka.requests_topic, b"\x01garbage")
        finally:
            await producer.stop()

        async def settled() -> bool:
            samples = await scrape(worker)
            lags = [v for (n, _), v in samples.items() if n == "inference_consumer_lag"]
            return (
                value(samples, "inference_dead_lettered_total", stage="DECODE") == 1
                and len(lags) == settings.kafka.topic_partitions
                and not any(lags)
            )

        await wait_for(settled, timeout=30, what="the dead-letter count and lag 0 in /metrics")
        samples = await scrape(worker)
    version = repository.route("digits", None, "").primary.version
    assert all(r.error is None for r in ok)
    assert {r.error.code for r in missing if r.error} == {"NOT_FOUND"}
    assert {r.error.code for r in invalid if r.error} == {"INVALID_ARGUMENT"}
    requests = "inference_requests_total"
    assert value(samples, requests, model="digits", version=version, outcome="ok") == 50
    unserved = {"model": UNSERVED, "version": UNSERVED}
    assert value(samples, requests, **unserved, outcome="NOT_FOUND") == 3
    assert value(samples, requests, **labels_of(version), outcome="INVALID_ARGUMENT") == 2
    labels = {"model": "digits", "version": version}
    # Replies from the served version, the two it refused included.
    assert value(samples, "inference_request_latency_seconds_count", **labels) == 52
    assert value(samples, "inference_queue_wait_seconds_count", **labels) == 50
    batches = value(samples, "inference_batch_size_count", **labels)
    assert 1 <= batches <= 50
    assert value(samples, "inference_batch_size_sum", **labels) == 50
    assert value(samples, "inference_batch_compute_seconds_count", **labels) == batches
    assert value(samples, "inference_requests_in_flight") == 0
    assert value(samples, "inference_commits_total", result="ok") >= 1


async def test_unknown_model_names_do_not_grow_the_metrics(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """1,000 distinct unknown model names and versions add no metric series (bounded labels)."""
    row = {"pixels": testset[0][:1]}
    async with (
        running_worker(settings, repository) as worker,
        InferenceClient(settings.kafka) as client,
    ):
        first = await asyncio.gather(*(client.infer(f"first-{i}", row) for i in range(10)))
        before = await scrape(worker)
        many = await asyncio.gather(
            *(client.infer(f"name-{i}", row, version=str(i)) for i in range(1000)),
            *(client.infer("digits", row, version=f"9{i}") for i in range(100)),
        )
        after = await scrape(worker)
    assert {r.error.code for r in [*first, *many] if r.error} == {"NOT_FOUND"}
    assert all(r.error for r in many)

    def per_request(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> set[Any]:
        return {key for key in samples if key[0].startswith("inference_request")}

    assert per_request(after) == per_request(before), "no series per unknown name or version"
    requests = "inference_requests_total"
    assert value(after, requests, model=UNSERVED, version=UNSERVED, outcome="NOT_FOUND") == 1110
    assert not any("name-" in str(labels) for _, labels in after)


async def test_readiness_flips_to_ready_only_after_the_assignment(
    settings: Settings, repository: ModelRepository
) -> None:
    """/readyz answers 503 until the group assignment arrives, then 200; /healthz is 200."""
    worker = Worker(settings, repository)
    async with asyncio.TaskGroup() as group:
        task = group.create_task(worker.run())
        await wait_for(lambda: worker.http_port is not None, timeout=30, what="the endpoint")
        first = await get(worker, "/readyz")
        last = first
        while last[0] != 200:
            assert not task.done()
            await asyncio.sleep(0.01)  # the probe's polling interval, not synchronisation
            last = await get(worker, "/readyz")
        health = await get(worker, "/healthz")
        worker.stop()
    assert first[0] == 503
    assert first[1].startswith("waiting for the consumer group assignment; models: ")
    assert last[0] == 200
    assert last[1].startswith(f"ok: {settings.kafka.topic_partitions} partition(s); models: ")
    assert "digits v2 on cpu fp32 x1" in last[1], "where each version runs"
    assert health == (200, "ok\n")


async def test_serving_freezes_the_heap_and_defers_young_collections(
    settings: Settings, repository: ModelRepository
) -> None:
    """While serving: heap frozen, young threshold YOUNG_GC_THRESHOLD; both undone on stop."""
    before = gc.get_threshold()
    assert before[0] != YOUNG_GC_THRESHOLD, "the test process starts at another threshold"
    async with running_worker(settings, repository):
        serving, frozen = gc.get_threshold(), gc.get_freeze_count()
    assert serving == (YOUNG_GC_THRESHOLD, *before[1:])
    assert frozen > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


async def test_probes_while_stalled_and_while_stopping(
    settings: Settings,
    repository: ModelRepository,
    testset: TestSet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hung model: /healthz turns 503 after the watchdog timeout; stopping: /readyz 503."""
    settings = changed(settings, "runtime", watchdog_timeout_s=1.0, shutdown_timeout_s=30.0)
    release = threading.Event()
    real = LoadedModel.upload

    def upload(self: LoadedModel, inputs: Any) -> Any:
        release.wait(60)
        return real(self, inputs)

    async def no_watchdog(self: Supervisor) -> None:
        """The watchdog would end the worker as /healthz turns; its exit is tested elsewhere."""

    monkeypatch.setattr(LoadedModel, "upload", upload)
    monkeypatch.setattr(Supervisor, "watchdog", no_watchdog)
    worker = Worker(settings, repository)
    async with asyncio.TaskGroup() as group:
        task = group.create_task(worker.run())
        await wait_for(lambda: bool(worker.assigned), timeout=60, what="the assignment")
        async with InferenceClient(settings.kafka) as client:
            try:
                pending = group.create_task(
                    client.infer("digits", {"pixels": testset[0][:1]}, timeout=60)
                )
                await wait_for(lambda: worker.in_flight == 1, timeout=30, what="one in flight")

                async def unhealthy() -> bool:
                    return (await get(worker, "/healthz"))[0] == 503

                await wait_for(unhealthy, timeout=30, what="/healthz 503 while stalled")
                health = await get(worker, "/healthz")
                worker.stop()
                ready = await get(worker, "/readyz")
            finally:
                release.set()
            reply = await pending
        await task
    assert health[0] == 503
    assert "no progress for" in health[1]
    assert "1 in flight" in health[1]
    assert ready[0] == 503
    assert ready[1].startswith("stopping; models: ")
    assert reply.error is None, "the drain answered the request once the model returned"


async def test_audit_topic_holds_one_record_per_request_with_the_trace_id(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """With an audit topic, each request leaves one JSON record; trace ids flow through."""
    audit_topic = f"{settings.kafka.requests_topic}.audit"
    settings = changed(settings, "audit", topic=audit_topic)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01".encode()
    pixels = testset[0][:30]
    async with (
        running_worker(settings, repository),
        reply_reader(settings, audit_topic) as audit,
        reply_reader(settings) as replies,
        InferenceClient(settings.kafka) as client,
    ):
        answers = await asyncio.gather(
            *(
                client.infer(
                    "digits",
                    [Tensor.from_numpy("pixels", pixels[i : i + 1])],
                    headers=[("traceparent", traceparent)] if i == 0 else [],
                )
                for i in range(30)
            ),
            client.infer("digits", {"pixels": pixels[:1]}, version="42"),
        )
        await wait_for(lambda: len(audit) >= 31, timeout=30, what="31 audit records")
        await wait_for(lambda: len(replies) >= 31, timeout=30, what="31 replies")
    records: list[dict[str, Any]] = [json.loads(r.value) for r in audit]
    assert len(records) == 31
    assert sorted(r["correlation_id"] for r in records) == sorted(a.id for a in answers)
    by_id = {r["correlation_id"]: r for r in records}
    traced = by_id[answers[0].id]
    assert traced["trace_id"] == trace_id
    assert traced["outcome"] == "ok"
    assert traced["model"] == "digits"
    assert traced["batch_id"]
    assert traced["topic"] == settings.kafka.requests_topic
    assert isinstance(traced["partition"], int)
    assert isinstance(traced["offset"], int)
    assert traced["latency_ms"] >= 0
    assert by_id[answers[-1].id]["outcome"] == "NOT_FOUND"
    reply_trace = {
        r.headers["correlation_id"].decode(): r.headers["traceparent"].decode().split("-")[1]
        for r in replies
    }
    assert reply_trace[answers[0].id] == trace_id, "the reply continues the request's trace"
    assert all(by_id[cid]["trace_id"] == tid for cid, tid in reply_trace.items())


def test_every_metric_the_worker_exports_is_documented() -> None:
    """docs/operations.md names each metric of the registry (with its _total suffix if any)."""
    text = (ROOT / "docs" / "operations.md").read_text()
    names = set()
    for family in Metrics().registry.collect():
        suffix = "_total" if family.type == "counter" else ""
        names.add(family.name + suffix)
    missing = sorted(name for name in names if f"`{name}" not in text)
    assert names, "the registry has metrics"
    assert missing == [], f"not in docs/operations.md: {missing}"


def test_the_in_flight_gauge_counts_records_and_calls(
    settings: Settings, repository: ModelRepository
) -> None:
    """inference_requests_in_flight reads the one bound when scraped: records and calls."""
    worker = Worker(settings, repository)
    in_flight = worker._in_flight
    in_flight.records.track(TopicPartition("requests", 0), 7)
    in_flight.calls += 2
    assert worker.metrics.value("inference_requests_in_flight") == 3
    in_flight.calls -= 2
    assert worker.metrics.value("inference_requests_in_flight") == 1
