"""Device, precision and instances on the real broker: lanes that run side by side."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from worker.client import InferenceClient
from worker.model import LoadedModel
from worker.repository import ModelRepository
from worker.settings import Settings

from .conftest import changed, running_worker, wait_for
from .test_operations import get
from .test_versions import IRIS, ask

pytestmark = pytest.mark.kafka

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


async def test_bf16_with_two_instances_answers_like_fp32(
    settings: Settings, repo_dir: Path, repository: ModelRepository, testset: TestSet
) -> None:
    """Digits in bf16 with 2 instances: every request answered, labels as fp32's, FP32 out."""
    config = repo_dir / "digits" / "config.toml"
    config.write_text('precision = "bf16"\ninstances = 2\n' + config.read_text())
    settings = changed(settings, "models", repository=repo_dir)
    pixels = testset[0][:200]
    want = repository.route("digits", "2", "").primary.predict({"pixels": pixels})  # fp32
    async with running_worker(settings, ModelRepository.load(repo_dir)) as worker:
        async with InferenceClient(settings.kafka) as client:
            replies = await ask(client, pixels, version="2")
        status, ready = await get(worker, "/readyz")
        metrics = worker.metrics
    assert status == 200
    assert "digits v2 on cpu bf16 x2" in ready
    assert "iris v1 on cpu fp32 x1" in ready
    assert all(r.error is None for r in replies)
    probabilities = np.concatenate([r.output("probabilities") for r in replies])
    assert probabilities.dtype == np.float32
    assert not np.array_equal(probabilities, want["probabilities"]), "computed in bf16"
    assert not np.array_equal(probabilities, want["probabilities"]), "computed in bf16"
    np.testing.assert_allclose(probabilities, want["probabilities"], atol=0.05)
    labels = np.array([r.output("label")[0] for r in replies])
    assert (labels == want["label"]).mean() >= 0.97
    busy = [
        metrics.value(
            "inference_instance_busy_seconds_total", model="digits", version="2", instance=n
        )
        for n in ("0", "1", "2")
    ]
    assert busy[0] > 0
    assert busy[2] == 0, "no third instance of a version with two"


async def test_a_stuck_model_does_not_hold_up_another_models_lane(
    settings: Settings,
    repository: ModelRepository,
    testset: TestSet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Iris hangs in its instance; digits requests are answered meanwhile; iris after release."""
    release = threading.Event()
    entered = threading.Event()
    real = LoadedModel.upload

    def upload(self: LoadedModel, inputs: Any) -> Any:
        if self.name == "iris":
            entered.set()
            release.wait(60)
        return real(self, inputs)

    monkeypatch.setattr(LoadedModel, "upload", upload)
    try:
        async with running_worker(settings, repository), InferenceClient(settings.kafka) as client:
            iris = asyncio.create_task(client.infer("iris", {"features": IRIS[:1]}, timeout=90))
            await wait_for(entered.is_set, timeout=30, what="iris's batch running")
            digits = await ask(client, testset[0][:20])
            assert not iris.done(), "iris is still stuck while digits was answered"
            release.set()
            answer = await iris
    finally:
        release.set()
    assert all(r.error is None for r in digits)
    assert answer.error is None
    assert answer.model_name == "iris"
