"""Unit tests of the lanes (worker.lanes) that need no broker."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from time import time
from types import SimpleNamespace

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
from worker.pacing import Pace
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


@pytest.mark.parametrize(("run_ms", "seconds"), [(60_000.0, 60.0), (0.0, None)])
async def test_a_lane_s_runs_are_paced_by_the_max_run_ms_setting(
    run_ms: float, seconds: float | None
) -> None:
    """Each lane's batcher is paced by max_run_ms (0: not at all); its runs report to the pace."""
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
            put_sized(lanes, repository, 8)
            await lanes.drain()
    assert [b.max_batches_per_run for b in batchers] == [5]
    pace = batchers[0].pace
    assert (pace and pace.max_run_seconds) == seconds
    if pace is not None:
        assert pace.batches(64, 1) >= 2, "a run told the pace it ran (none yet: one batch)"


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
        await RunAnswers(delivered.extend, Metrics()).run(runner, None, None, batches)  # type: ignore[arg-type]
        during = turns - before
        counter.cancel()
    assert delivered == [], "shadow copies are compared, never answered"
    assert during >= 3, "the loop was let go between the run's groups"


class Told(Pace):
    """A pace that records what it is told."""

    def __init__(self) -> None:
        super().__init__(0.05)
        self.told: list[tuple[int, int, float]] = []

    def ran(self, batches: int, items: int, seconds: float) -> None:
        self.told.append((batches, items, seconds))
        super().ran(batches, items, seconds)


async def test_a_run_tells_its_pace_only_what_the_model_ran(
    repo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither expired jobs nor a preempted run's rest count; only expired jobs: nothing told."""
    model = cache_of(ModelRepository.load(repo_dir))
    outputs = [Tensor.from_numpy("label", np.array([7]))]
    clock = [100.0]
    monkeypatch.setattr(answering, "time", SimpleNamespace(monotonic=lambda: clock[0], time=time))

    async def first_batch_only(_m: LoadedModel, prepared: list[object], _s: object) -> list[object]:
        clock[0] += 0.25  # the model's quarter of a second
        return [(0.0, 0.25, [outputs] * len(prepared[0]))]  # type: ignore[arg-type]

    expired = [replace(job(model, i), deadline_ms=1) for i in range(3)]
    live = [[job(model, 3 + 2 * b + i) for i in range(2)] for b in range(3)]
    pace, answers = Told(), RunAnswers(lambda _: None, Metrics())
    await answers.run(first_batch_only, None, pace, [expired])  # type: ignore[arg-type]
    assert pace.told == [], "a run of expired jobs ran nothing"
    left = await answers.run(first_batch_only, None, pace, [expired[:1] + live[0], *live[1:]])  # type: ignore[arg-type]
    assert len(left) == 4, "the two batches not reached go back"
    assert pace.told == [(1, 2, 0.25)], "one batch of two live jobs ran, for the model's 0.25 s"
