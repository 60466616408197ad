"""Unit tests of the lanes (worker.lanes) that need no broker."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from aiokafka import TopicPartition

from worker import answering
from worker.admission import Admitted, Limits, admit
from worker.answering import RunAnswers
from worker.answers import Answer
from worker.codec import encode_request
from worker.domain import InferenceRequest, InferenceResponse, Tensor
from worker.formats import PLAIN
from worker.lanes import Lanes
from worker.metrics import Metrics
from worker.model import LoadedModel
from worker.origins import Record
from worker.outgoing import Destinations
from worker.repository import ModelRepository, ServedModel
from worker.settings import BatchingSettings

from .test_caching import cache_of, job
from .test_device import sized_model

DEST = Destinations("replies", "dlq", "g")


def make_lanes(
    group: asyncio.TaskGroup,
    shadow_pool: ThreadPoolExecutor,
    delivered: list[Answer],
    batching: BatchingSettings | None = None,
) -> Lanes:
    """Lanes whose answers are collected into ``delivered`` (one torch thread, fresh metrics)."""
    return Lanes(
        group, threads=1, shadow_executor=shadow_pool, batching=batching or BatchingSettings(),
        deliver=delivered.extend, metrics=Metrics(), shadow_queue_limit=10,
    )  # fmt: skip


async def answer_of(
    request: InferenceRequest, admitted_by: ModelRepository, served: ModelRepository | None
) -> InferenceResponse:
    """Admit one request, put it into lanes opened for ``served`` (None: no lane), drain."""
    source = Record(TopicPartition("requests", 0), 3, None, encode_request(request), [], 1_000)
    outcome = admit(source, admitted_by, Limits(4 << 20, 10**6), DEST, PLAIN, now=0.0)
    assert isinstance(outcome, Admitted)
    delivered: list[Answer] = []
    with ThreadPoolExecutor(1) as pool:
        async with asyncio.TaskGroup() as group:
            lanes = make_lanes(group, pool, delivered)
            if served is not None:
                lanes.open(served)
            lanes.put(outcome)
            await lanes.drain()
    [answer] = delivered
    assert answer.origin is source
    assert answer.failed is None
    assert answer.response is not None
    return answer.response


async def test_a_job_whose_version_was_unloaded_meanwhile_is_answered_unavailable(
    repository: ModelRepository,
) -> None:
    """A job for a version no lane serves any more (a reload removed it) gets UNAVAILABLE."""
    pixels = Tensor.from_numpy("pixels", np.zeros((1, 64), np.float32))
    # No lane is opened: as if a reload had unloaded the version while the job waited.
    response = await answer_of(InferenceRequest("r-1", "digits", [pixels]), repository, None)
    assert response.id == "r-1"
    assert response.error is not None
    assert response.error.code == "UNAVAILABLE"
    assert "was unloaded while this request waited" in response.error.message


async def test_a_request_over_the_token_budget_on_its_own_is_resource_exhausted(
    text_repository: ModelRepository,
) -> None:
    """40 strings cut at 256 tokens need 10,240 padded tokens; MiniLM's budget is 8,192."""
    strings = Tensor.from_strings("text", [b"word " * 300] * 40)
    request = InferenceRequest("big", "minilm", [strings])
    response = await answer_of(request, text_repository, text_repository)
    assert response.error is not None
    assert response.error.code == "RESOURCE_EXHAUSTED"
    assert "needs 10240 padded tokens (40 rows x 256)" in response.error.message
    assert "at most 8192" in response.error.message


@pytest.mark.parametrize(("every", "groups"), [(2, [2, 2, 2, 2]), (3, [4, 4]), (64, [8])])
async def test_a_run_s_answers_are_delivered_in_groups_of_whole_batches(
    monkeypatch: pytest.MonkeyPatch, every: int, groups: list[int]
) -> None:
    """4 batches of 2 in a run: delivered as DELIVER_EVERY answers gather, the rest at the end."""
    monkeypatch.setattr(answering, "DELIVER_EVERY", every)

    class Doubling(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    model = sized_model(Doubling())
    repository = ModelRepository(Path("unused"), {"sized": ServedModel(model.config, {"1": model})})
    deliveries: list[int] = []
    with ThreadPoolExecutor(1) as shadow:
        async with asyncio.TaskGroup() as group:
            lanes = Lanes(
                group, threads=1, shadow_executor=shadow, metrics=Metrics(),
                batching=BatchingSettings(max_batch_size=2, max_batches_per_run=4, max_run_ms=0),
                deliver=lambda answers: deliveries.append(len(answers)), shadow_queue_limit=10,
            )  # fmt: skip
            lanes.open(repository)
            put_sized(lanes, repository, 8)  # all queued before the lane's batcher first looks
            await lanes.drain()
    assert deliveries == groups


@pytest.mark.parametrize(("run_ms", "seconds"), [(7.0, 0.007), (0.0, None)])
async def test_a_lane_s_runs_are_bounded_by_the_max_run_ms_setting(
    run_ms: float, seconds: float | None
) -> None:
    """Each lane's batcher gets max_run_ms as its run time bound; 0 turns the bound off."""
    model = sized_model(torch.nn.Identity())
    repository = ModelRepository(Path("unused"), {"sized": ServedModel(model.config, {"1": model})})
    with ThreadPoolExecutor(1) as shadow:
        async with asyncio.TaskGroup() as group:
            lanes = Lanes(
                group, threads=1, shadow_executor=shadow, metrics=Metrics(),
                batching=BatchingSettings(max_batches_per_run=5, max_run_ms=run_ms),
                deliver=lambda _: None, shadow_queue_limit=10,
            )  # fmt: skip
            lanes.open(repository)
            batchers = [lane.batcher for lane in lanes._lanes.values()]
            await lanes.drain()
    assert [(b.max_run_seconds, b.max_batches_per_run) for b in batchers] == [(seconds, 5)]


def put_sized(lanes: Lanes, repository: ModelRepository, count: int) -> None:
    """``count`` one-row requests for ``sized`` (values 1, 2, ...: never all zero) into lanes."""
    for i in range(count):
        x = Tensor.from_numpy("x", np.full((1, 2), float(i + 1), np.float32))
        value = encode_request(InferenceRequest(f"r-{i}", "sized", [x]))
        source = Record(TopicPartition("requests", 0), i, None, value, [], 1_000)
        outcome = admit(source, repository, Limits(4 << 20, 10**6), DEST, PLAIN, now=0.0)
        assert isinstance(outcome, Admitted)
        lanes.put(outcome)


async def test_a_run_of_shadow_copies_lets_the_event_loop_go_between_groups(
    repo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shadow copies bring no answers, yet a long run of them yields every DELIVER_EVERY jobs."""
    monkeypatch.setattr(answering, "DELIVER_EVERY", 2)
    model = cache_of(ModelRepository.load(repo_dir))
    batches = [[job(model, 2 * b + i, shadow=True) for i in range(2)] for b in range(4)]
    outputs = [Tensor.from_numpy("label", np.array([7]))]

    async def runner(_m: LoadedModel, prepared: list[object], _stop: object) -> list[object]:
        return [(0.0, 0.001, [outputs] * len(p)) for p in prepared]  # type: ignore[arg-type]

    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    delivered: list[Answer] = []
    async with asyncio.TaskGroup() as group:
        counter = group.create_task(count_turns())
        await asyncio.sleep(0)
        before = turns
        await RunAnswers(delivered.extend, Metrics()).run(runner, None, batches)  # type: ignore[arg-type]
        during = turns - before
        counter.cancel()
    assert delivered == [], "shadow copies are compared, never answered"
    assert during >= 3, "the loop was let go between the run's groups"
