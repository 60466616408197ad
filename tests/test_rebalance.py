"""Rebalances on the real broker: fast revocation, static membership, a fenced duplicate id."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from worker.errors import FencedError
from worker.kafka import ensure_topics
from worker.repository import ModelRepository
from worker.settings import Settings

from .conftest import changed, publish_digits, reply_reader, running_worker, settle, wait_for

pytestmark = pytest.mark.kafka

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]

SLOW = """import time


def preprocess(inputs):
    time.sleep(0.005 * len(inputs["pixels"]))
    return inputs
"""
"""A handler that makes every row take 5 ms more: a backlog stays queued for seconds."""


def slow_repository(repo: Path) -> ModelRepository:
    """The digits model, 5 ms a row slower, in batches of 4 (a handler in every version)."""
    config = repo / "digits" / "config.toml"
    text = config.read_text()
    assert "max_batch_size = 64" in text
    config.write_text(text.replace("max_batch_size = 64", "max_batch_size = 4"))
    for version in ("1", "2"):
        (repo / "digits" / version / "handler.py").write_text(SLOW)
    return ModelRepository.load(repo, allow_code=True)


async def test_a_revoke_leaves_queued_requests_to_the_next_owner_and_loses_nothing(
    settings: Settings, repo_dir: Path, testset: TestSet
) -> None:
    """A worker holding a queued backlog gives its partitions up without serving the queue."""
    repository = slow_repository(repo_dir)
    settings = changed(settings, "batching", max_batch_size=4, max_batches_per_run=1)
    settings = changed(settings, "runtime", max_in_flight=1000)
    ids = await publish_digits(settings, testset[0], 900, prefix="backlog")
    async with reply_reader(settings) as replies, running_worker(settings, repository) as first:
        await wait_for(lambda: len(replies) >= 40, timeout=60, what="the first replies")
        assert first.in_flight > 100, "a backlog is queued in the first worker"
        async with running_worker(settings, repository) as second:
            answered = await settle(settings, replies, ids)
        abandoned = first.metrics.value("inference_abandoned_requests_total")
        revokes = first.metrics.value("inference_revoke_seconds_count")
        assert revokes >= 1, "the first worker gave partitions up"
        assert abandoned > 0, "queued requests were left to the next owner, not served first"
        assert second.metrics.value("inference_rebalances_total") >= 1
    assert set(answered) == set(ids), "nothing lost"
    duplicates = [rid for rid, count in answered.items() if count > 1]
    assert len(duplicates) <= abandoned, "duplicates only around abandoned requests"


async def test_a_static_member_restarts_without_a_rebalance(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """A static member restarting within its session gets its partitions back; no rebalance."""
    base = changed(settings, "kafka", session_timeout_ms=30_000, heartbeat_interval_ms=1_000)
    one = changed(base, "kafka", group_instance_id="worker-one")
    two = changed(base, "kafka", group_instance_id="worker-two")
    kafka = base.kafka
    await ensure_topics(kafka, [kafka.requests_topic, kafka.replies_topic, kafka.dead_letter_topic])
    async with reply_reader(base) as replies, running_worker(two, repository) as stays:
        async with running_worker(one, repository) as restarting:
            await wait_for(
                lambda: len(stays.assigned | restarting.assigned) == 3 and bool(stays.assigned),
                timeout=60, what="both members assigned",
            )  # fmt: skip
            held = restarting.assigned
            before = stays.metrics.value("inference_rebalances_total")
            revokes = stays.metrics.value("inference_revoke_seconds_count")
            first = await publish_digits(base, testset[0], 200, prefix="before")
            await settle(base, replies, first)
        async with running_worker(one, repository) as restarted:
            assert restarted.assigned == held, "the same partitions, handed back"
            ids = first + await publish_digits(base, testset[0], 200, prefix="after")
            answered = await settle(base, replies, ids)
        assert stays.metrics.value("inference_rebalances_total") == before, "no rebalance"
        assert stays.metrics.value("inference_revoke_seconds_count") == revokes
    assert set(answered) == set(ids)
    assert max(answered.values()) == 1, "no duplicates"


async def test_two_workers_with_one_instance_id_end_with_a_clear_error(
    settings: Settings, repository: ModelRepository
) -> None:
    """Two workers with one group instance id: one stops with FencedError naming the setting."""
    static = changed(settings, "kafka", group_instance_id="same-name", session_timeout_ms=6_000)
    kafka = static.kafka
    await ensure_topics(kafka, [kafka.requests_topic, kafka.replies_topic, kafka.dead_letter_topic])
    from worker.app import Worker  # noqa: PLC0415 - the in-process worker, run bare here

    workers = [Worker(static, repository), Worker(static, repository)]
    tasks = [asyncio.create_task(workers[0].run())]
    try:
        await wait_for(lambda: bool(workers[0].assigned), timeout=60, what="the first's join")
        tasks.append(asyncio.create_task(workers[1].run()))  # its twin joins a stable group
        await wait_for(lambda: any(t.done() for t in tasks), timeout=120, what="one to stop")
        failed = next(t for t in tasks if t.done())
        error = failed.exception()
        assert isinstance(error, BaseExceptionGroup | FencedError), repr(error)
        fenced = error.subgroup(FencedError) if isinstance(error, BaseExceptionGroup) else error
        assert fenced is not None, repr(error)
        assert "WORKER_KAFKA__GROUP_INSTANCE_ID='same-name'" in str(
            fenced.exceptions[0] if isinstance(fenced, BaseExceptionGroup) else fenced
        )
    finally:
        for worker in workers:
            worker.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
