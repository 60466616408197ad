"""Instances of a version (worker.instances) and lanes running them: no broker."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from aiokafka import TopicPartition

from tests.test_device import sized_model
from tests.test_lanes import DEST, make_lanes
from worker.admission import Admitted, Limits, admit
from worker.answers import Answer
from worker.codec import encode_request
from worker.domain import InferenceRequest, InferenceResponse, Tensor
from worker.formats import PLAIN
from worker.instances import Instances, split_threads
from worker.metrics import Metrics
from worker.model import LoadedModel
from worker.origins import Record
from worker.repository import ModelRepository, ServedModel
from worker.settings import BatchingSettings


def instances(count: int, metrics: Metrics, threads: int = 2) -> Instances:
    """Instances of a version "m" v1 on the CPU."""
    cpu = torch.device("cpu")
    return Instances("m", "1", count, device=cpu, threads=threads, busy=metrics.busy)


async def meet(pool: Instances, calls: int) -> list[object]:
    """Run ``calls`` calls that each wait (at most 2 s) for all the others to be running."""
    barrier = threading.Barrier(calls, timeout=2)

    def call() -> int:
        return barrier.wait()

    return await asyncio.gather(*(pool.run(call) for _ in range(calls)), return_exceptions=True)


async def test_two_instances_really_run_at_once() -> None:
    """Two calls meet inside two instances; one instance runs them one after the other."""
    metrics = Metrics()
    two = instances(2, metrics)
    try:
        met = await meet(two, 2)
    finally:
        two.close()
    assert sorted(met) == [0, 1], "both calls were running at the same time"  # type: ignore[type-var]
    one = instances(1, metrics)
    try:
        alone = await meet(one, 2)
    finally:
        one.close()
    assert all(isinstance(r, threading.BrokenBarrierError) for r in alone)


async def test_each_instance_gets_its_share_of_the_torch_threads() -> None:
    """4 threads, 2 instances: each instance thread runs torch with 2 intra-op threads."""
    pool = instances(2, Metrics(), threads=4)
    barrier = threading.Barrier(2, timeout=5)

    def threads_here() -> int:
        barrier.wait()  # both instance threads, not one thread twice
        torch.ones(64, 64) @ torch.ones(64, 64)
        return torch.get_num_threads()

    try:
        seen = await asyncio.gather(pool.run(threads_here), pool.run(threads_here))
    finally:
        pool.close()
    assert list(seen) == [2, 2]
    assert pool.threads_each == 2
    assert [split_threads(t, n) for t, n in [(4, 2), (5, 2), (2, 3), (1, 1), (8, 1)]] == [
        2, 2, 1, 1, 8,
    ]  # fmt: skip


async def test_busy_time_is_counted_per_instance() -> None:
    """Each instance's running time adds to inference_instance_busy_seconds_total{instance}."""
    metrics = Metrics()
    pool = instances(2, metrics)
    try:
        await meet(pool, 2)
    finally:
        pool.close()
    for number in ("0", "1"):
        busy = metrics.value(
            "inference_instance_busy_seconds_total", model="m", version="1", instance=number
        )
        assert busy > 0


def blocking_repository(count: int, barrier: threading.Barrier) -> ModelRepository:
    """Serves "sized" v1 with ``count`` instances; its program waits at ``barrier``."""

    class Meeting(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            barrier.wait()
            return x * 2

    model = sized_model(Meeting(), instances=count)
    served = ServedModel(model.config, {"1": model})
    return ModelRepository(Path("unused"), {"sized": served})


async def answers_through_lanes(repository: ModelRepository, count: int) -> list[InferenceResponse]:
    """``count`` one-row requests, each its own batch, through lanes; their replies in order."""
    delivered: list[Answer] = []
    limits = Limits(4 << 20, 10**6)
    with ThreadPoolExecutor(1) as shadow:
        async with asyncio.TaskGroup() as group:
            batching = BatchingSettings(max_batch_size=1, max_batch_delay_ms=0)
            lanes = make_lanes(group, shadow, delivered, batching)
            lanes.open(repository)
            for i in range(count):
                x = Tensor.from_numpy("x", np.full((1, 2), float(i), np.float32))
                value = encode_request(InferenceRequest(f"r-{i}", "sized", [x]))
                source = Record(TopicPartition("requests", 0), i, None, value, [], 1_000)
                outcome = admit(source, repository, limits, DEST, PLAIN, now=0.0)
                assert isinstance(outcome, Admitted)
                lanes.put(outcome)
            await lanes.drain()
    replies = []
    for answer in delivered:
        assert isinstance(answer.origin, Record)
        assert answer.response is not None
        assert answer.response.id == f"r-{answer.origin.offset}", "answered for its own record"
        replies.append(answer.response)
    return replies


async def test_a_version_with_two_instances_runs_two_batches_at_once() -> None:
    """Two one-request batches meet inside the program: each answered with its own result."""
    barrier = threading.Barrier(2, timeout=5)
    replies = await answers_through_lanes(blocking_repository(2, barrier), 2)
    by_id = {r.id: r for r in replies}
    assert set(by_id) == {"r-0", "r-1"}
    for i in range(2):
        reply = by_id[f"r-{i}"]
        assert reply.error is None
        np.testing.assert_array_equal(reply.outputs[0].to_numpy(), [[2.0 * i, 2.0 * i]])


async def test_one_instance_runs_its_batches_one_at_a_time() -> None:
    """With one instance the two batches cannot meet: the program's wait times out."""
    barrier = threading.Barrier(2, timeout=0.5)
    replies = await answers_through_lanes(blocking_repository(1, barrier), 2)
    assert all(r.error is not None and r.error.code == "INTERNAL" for r in replies)


@pytest.mark.parametrize("count", [1, 3])
async def test_instances_keep_every_answer_with_its_request(count: int) -> None:
    """40 requests over 1 or 3 instances: each reply carries its own request's result."""
    barrier = threading.Barrier(1)  # never waits
    replies = await answers_through_lanes(blocking_repository(count, barrier), 40)
    assert len(replies) == 40
    for reply in replies:
        i = int(reply.id.removeprefix("r-"))
        assert reply.error is None
        np.testing.assert_array_equal(reply.outputs[0].to_numpy(), [[2.0 * i, 2.0 * i]])


def test_loaded_models_default_to_one_instance_on_the_cpu() -> None:
    """A LoadedModel built directly runs on the CPU in fp32 with one instance."""
    model = LoadedModel(sized_model(torch.nn.Identity()).config, "1", torch.nn.Identity())
    assert (model.device.type, model.execution.precision, model.execution.instances) == (
        "cpu", "fp32", 1,
    )  # fmt: skip


def fresh_thread_count() -> int:
    """The torch intra-op thread count a newly started thread gets."""
    got: list[int] = []
    thread = threading.Thread(target=lambda: got.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return got[0]


async def test_instance_threads_leave_the_process_default_of_torch_threads() -> None:
    """An instance sets its own thread's count only: threads started later get what they did."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # the process default, as the worker sets it at start
    try:
        baseline = fresh_thread_count()  # the OpenMP runtime decides it: compare, not assume
        pool = instances(2, Metrics(), threads=4)
        barrier = threading.Barrier(2, timeout=5)

        def threads_here() -> int:
            barrier.wait()
            return torch.get_num_threads()

        try:
            seen = await asyncio.gather(pool.run(threads_here), pool.run(threads_here))
        finally:
            pool.close()
        assert list(seen) == [2, 2]
        assert fresh_thread_count() == baseline, "the instances left the default as it was"
    finally:
        torch.set_num_threads(before)
