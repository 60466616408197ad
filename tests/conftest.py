"""Shared fixtures: the real Kafka broker, per-test topics, and workers in- and out-of-process.

The broker is the one named by ``WORKER_KAFKA__BOOTSTRAP_SERVERS``; when that is unset, the
local Apache Kafka of ``dev/local_kafka.py`` is started (and stopped again at the end if this
session started it). There is no fallback: no broker means the integration tests fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from worker.app import Worker
from worker.codec import decode_response, encode_request
from worker.domain import InferenceRequest, Tensor
from worker.kafka import assign_all, ensure_topics, make_consumer, make_producer
from worker.repository import ModelRepository
from worker.settings import (
    BatchingSettings,
    HttpSettings,
    KafkaSettings,
    ModelSettings,
    RuntimeSettings,
    Settings,
    env_vars,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "dev"))
import local_kafka  # noqa: E402
import local_registry  # noqa: E402

MODELS = ROOT / "tests" / "models"
"""The numeric models (links into models/): what most tests serve, quick to load."""
TEXT_MODELS = ROOT / "models"
"""The project's repository with all-MiniLM-L6-v2, which ``make minilm`` exports into it."""


def _service(given: str | None, module: Any) -> Iterator[str]:
    """The address ``given``, else a local service ``module`` starts (stopped after if so)."""
    if given:
        yield given
        return
    was_running = module.status()
    address = str(module.start())
    yield address
    if not was_running:
        module.stop()


@pytest.fixture(scope="session")
def bootstrap() -> Iterator[str]:
    """Bootstrap address of a real, running Kafka broker."""
    yield from _service(os.environ.get("WORKER_KAFKA__BOOTSTRAP_SERVERS"), local_kafka)


@pytest.fixture(scope="session")
def registry_url() -> Iterator[str]:
    """URL of a real schema registry (Conduit's, built by dev/local_registry.py).

    ``TEST_SCHEMA_REGISTRY_URL`` names a running one; otherwise it is built and started here
    (and stopped at the end if this session started it). No registry: the tests fail.
    """
    yield from _service(os.environ.get("TEST_SCHEMA_REGISTRY_URL"), local_registry)


@pytest.fixture(scope="session")
def repository() -> ModelRepository:
    """The project's model repository, loaded once."""
    return ModelRepository.load(MODELS)


@pytest.fixture(scope="session")
def text_repository() -> ModelRepository:
    """The project's repository with the MiniLM text model (fails loudly if not exported)."""
    if not (TEXT_MODELS / "minilm" / "1" / "model.pt2").is_file():
        pytest.fail("models/minilm is not exported: run `make minilm` (the CI does)")
    return ModelRepository.load(TEXT_MODELS)


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    """A copy of the project's model repository that a test may change."""
    shutil.copytree(MODELS, tmp_path / "models", ignore=shutil.ignore_patterns("*.py"))
    return tmp_path / "models"


def configure(repo: Path, model: str, extra: str) -> None:
    """Append TOML sections to a model's config.toml."""
    config = repo / model / "config.toml"
    config.write_text(config.read_text() + "\n" + extra + "\n")


@pytest.fixture(scope="session")
def testset() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The digits held-out split: pixels (FP32, N x 64) and labels."""
    data = np.load(MODELS / "digits" / "testset.npz")
    return data["pixels"].astype(np.float32), data["labels"]


@pytest.fixture
def settings(bootstrap: str) -> Settings:
    """Settings with topics and a group of this test's own (so tests never share state)."""
    uid = uuid.uuid4().hex[:10]
    return Settings(
        kafka=KafkaSettings(
            bootstrap_servers=bootstrap,
            requests_topic=f"test.{uid}.requests",
            replies_topic=f"test.{uid}.replies",
            dead_letter_topic=f"test.{uid}.dlq",
            group_id=f"test-{uid}",
            topic_partitions=3,
            session_timeout_ms=6_000,
            heartbeat_interval_ms=1_000,
        ),
        batching=BatchingSettings(max_batch_size=16, max_batch_delay_ms=20),
        models=ModelSettings(repository=MODELS),
        runtime=RuntimeSettings(commit_interval_ms=100, shutdown_timeout_s=20),
        http=HttpSettings(host="127.0.0.1", port=0),
    )


def changed(settings: Settings, section: str, **fields: Any) -> Settings:
    """``settings`` with some fields of one section replaced (that section validated again)."""
    part = getattr(settings, section)
    return settings.model_copy(update={section: type(part)(**{**part.model_dump(), **fields})})


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]], *, timeout: float, what: str
) -> None:
    """Poll ``condition`` until true; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, repository: ModelRepository) -> AsyncIterator[Worker]:
    """An in-process worker, started and assigned its partitions; stopped (drained) on exit."""
    worker = Worker(settings, repository)
    async with asyncio.TaskGroup() as group:
        task = group.create_task(worker.run())
        await wait_for(
            lambda: bool(worker.assigned) or task.done(), timeout=60, what="partition assignment"
        )
        if task.done():
            task.result()
        yield worker
        worker.stop()


@dataclass
class Reply:
    """A record read from a reply topic."""

    key: bytes | None
    value: bytes
    headers: dict[str, bytes]
    partition: int


@contextlib.asynccontextmanager
async def reply_reader(settings: Settings, topic: str | None = None) -> AsyncIterator[list[Reply]]:
    """Collects every record of a reply topic, from the beginning, into a list while open."""
    topic = topic or settings.kafka.replies_topic
    await ensure_topics(settings.kafka, [topic])
    consumer: AIOKafkaConsumer = make_consumer(
        settings.kafka, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    seen: list[Reply] = []
    try:
        await assign_all(consumer, topic, await partitions_of(settings, topic), from_end=False)

        async def pump() -> None:
            while True:
                batches = await consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    seen.extend(
                        Reply(r.key, r.value, dict(r.headers), r.partition) for r in records
                    )

        async with asyncio.TaskGroup() as group:
            task = group.create_task(pump())
            try:
                yield seen
            finally:
                task.cancel()
    finally:
        await consumer.stop()


async def partitions_of(settings: Settings, topic: str) -> list[int]:
    """Partition numbers of ``topic``."""
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        return sorted(await producer.partitions_for(topic))
    finally:
        await producer.stop()


async def group_lag(settings: Settings) -> int:
    """Records of the requests topic not yet committed by the worker group (all partitions)."""
    topic = settings.kafka.requests_topic
    tps = [TopicPartition(topic, p) for p in await partitions_of(settings, topic)]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    consumer = make_consumer(settings.kafka, group_id=None)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(settings.kafka.group_id)
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
        await admin.close()
    return sum(end - (committed[tp].offset if tp in committed else 0) for tp, end in ends.items())


async def topic_size(settings: Settings, topic: str) -> int:
    """Records in ``topic`` (sum of end offsets; nothing is deleted in these tests)."""
    consumer = make_consumer(settings.kafka, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await partitions_of(settings, topic)]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


def reply_counts(replies: list[Reply]) -> Counter[str]:
    """How many replies each correlation id got."""
    return Counter(decode_response(r.value).id for r in replies)


async def settle(
    settings: Settings, replies: list[Reply], ids: list[str], *, timeout: float = 180
) -> Counter[str]:
    """Wait until every id is answered, the group has committed all, every reply is read."""
    await wait_for(
        lambda: set(reply_counts(replies)) == set(ids), timeout=timeout, what="every answer"
    )

    async def committed() -> bool:
        return await group_lag(settings) == 0

    async def all_read() -> bool:
        return len(replies) == await topic_size(settings, settings.kafka.replies_topic)

    await wait_for(committed, timeout=60, what="all offsets committed")
    await wait_for(all_read, timeout=60, what="the whole reply topic read")
    return reply_counts(replies)


async def publish_digits(
    settings: Settings,
    pixels: npt.NDArray[np.float32],
    total: int,
    *,
    prefix: str = "req",
    per_second: float | None = None,
    until: asyncio.Event | None = None,
) -> list[str]:
    """Publish digits requests (keyed by id), all at once or at about ``per_second``.

    ``total`` of them; with ``until``, at least ``total`` and then on until the event is set
    (load that is still running whenever the test acts). Returns their ids once every one is
    acknowledged.
    """
    kafka = settings.kafka
    await ensure_topics(kafka, [kafka.requests_topic, kafka.replies_topic])
    producer = make_producer(kafka, linger_ms=5)
    await producer.start()
    ids: list[str] = []
    tick = 0.05
    per_tick = max(1, int(per_second * tick)) if per_second else total
    try:
        futures = []
        while len(ids) < total or (until is not None and not until.is_set()):
            began = time.monotonic()
            for _ in range(per_tick if until is not None else min(per_tick, total - len(ids))):
                i = len(ids)
                ids.append(f"{prefix}-{i}")
                tensor = Tensor.from_numpy("pixels", pixels[i % len(pixels)][None])
                value = encode_request(InferenceRequest(ids[i], "digits", [tensor]))
                futures.append(
                    await producer.send(kafka.requests_topic, value, key=ids[i].encode())
                )
            if per_second:
                await asyncio.sleep(max(0.0, tick - (time.monotonic() - began)))  # pacing
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return ids


def worker_env(settings: Settings) -> dict[str, str]:
    """Environment variables that give a worker subprocess these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    for section in ("kafka", "batching", "runtime", "models", "http", "audit", "schema_registry"):
        env |= env_vars(getattr(settings, section), section)
    env["WORKER_LOG__FORMAT"] = "json"
    return env


class WorkerProcess:
    """``python -m worker serve`` as a child process, for signal tests."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self._log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "serve", *args],
            env=worker_env(settings) | (env or {}),
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # close() kills its children too (process mode)
        )

    def log(self) -> str:
        """What the worker (and its children) printed so far."""
        return self._log_path.read_text(errors="replace")

    def serving(self) -> bool:
        """True once the worker has joined its group and been given partitions."""
        try:
            return b"partitions assigned" in self._log_path.read_bytes()
        except OSError:
            return False

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the worker."""
        self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        """Wait for exit; return the exit code."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"worker did not exit within {timeout:.0f}s")
            await asyncio.sleep(0.05)
        self._log.close()
        return self.proc.returncode

    def close(self) -> None:
        """Kill the process (and any child of it) if it still runs."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()


@pytest.fixture
def worker_processes(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory of worker subprocesses (settings, extra environment), killed at the end."""
    started: list[WorkerProcess] = []

    def start(
        settings: Settings, env: dict[str, str] | None = None, args: Sequence[str] = ()
    ) -> WorkerProcess:
        proc = WorkerProcess(settings, tmp_path / f"worker-{len(started)}.log", env, args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()
