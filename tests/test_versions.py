"""Several models and versions on the real broker: routing, canary, shadow, hot reload."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from worker.app import Worker
from worker.client import InferenceClient
from worker.domain import InferenceResponse
from worker.model import LoadedModel
from worker.repository import ModelRepository
from worker.settings import Settings

from .conftest import (
    WorkerProcess,
    changed,
    configure,
    running_worker,
    topic_size,
    wait_for,
)

pytestmark = pytest.mark.kafka

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]

IRIS = np.array(
    [[5.1, 3.5, 1.4, 0.2], [6.4, 3.2, 4.5, 1.5], [6.3, 3.3, 6.0, 2.5], [5.0, 3.4, 1.5, 0.2]],
    dtype=np.float32,
)


def served_from(settings: Settings, repo: Path) -> Settings:
    """The settings, with the model repository at ``repo``."""
    return changed(settings, "models", repository=repo)


async def ask(
    client: InferenceClient, pixels: npt.NDArray[np.float32], **kw: object
) -> list[InferenceResponse]:
    """One request per row, concurrently."""
    return await asyncio.gather(
        *(client.infer("digits", {"pixels": pixels[i : i + 1]}, timeout=90, **kw)  # type: ignore[arg-type]
          for i in range(len(pixels)))
    )  # fmt: skip


async def test_two_models_and_explicit_versions_are_served_at_once(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """Digits v1, digits v2 and iris answer concurrently, each with its own predictions."""
    pixels = testset[0][:40]
    direct = {
        v: repository.route("digits", v, "").primary.predict({"pixels": pixels}) for v in ("1", "2")
    }
    iris_direct = repository.route("iris", None, "").primary.predict({"features": IRIS})
    async with running_worker(settings, repository), InferenceClient(settings.kafka) as client:
        v1, v2, iris = await asyncio.gather(
            ask(client, pixels, version="1"),
            ask(client, pixels, version="2"),
            asyncio.gather(
                *(client.infer("iris", {"features": IRIS[i : i + 1]}) for i in range(len(IRIS)))
            ),
        )
    for version, replies in (("1", v1), ("2", v2)):
        assert {r.model_version for r in replies} == {version}
        labels = np.array([r.output("label")[0] for r in replies])
        np.testing.assert_array_equal(labels, direct[version]["label"])
        probs = np.concatenate([r.output("probabilities") for r in replies])
        np.testing.assert_allclose(probs, direct[version]["probabilities"], rtol=1e-5, atol=1e-6)
    assert [r.output("label")[0] for r in iris] == list(iris_direct["label"])
    assert {r.model_name for r in iris} == {"iris"}


async def test_canary_split_is_ninety_ten_and_stable_per_correlation_id(
    settings: Settings, repo_dir: Path, testset: TestSet
) -> None:
    """3,000 requests naming no version split about 90/10; the same id gets the same version."""
    configure(repo_dir, "digits", '[routing]\nsplit = { "1" = 90, "2" = 10 }')
    settings = served_from(settings, repo_dir)
    repository = ModelRepository.load(repo_dir)
    pixels = testset[0]
    ids = [f"canary-{i}" for i in range(3000)]
    async with running_worker(settings, repository), InferenceClient(settings.kafka) as client:
        first = await asyncio.gather(
            *(
                client.infer(
                    "digits", {"pixels": pixels[i % 360][None]}, request_id=rid, timeout=90
                )
                for i, rid in enumerate(ids)
            )
        )
        again = await asyncio.gather(
            *(
                client.infer("digits", {"pixels": pixels[0][None]}, request_id=rid, timeout=90)
                for rid in ids[:300]
            )
        )
    versions = Counter(r.model_version for r in first)
    print(f"canary 90/10 over 3000 requests: {dict(versions)}")
    assert set(versions) == {"1", "2"}
    assert 0.07 < versions["2"] / len(ids) < 0.13
    assert [r.model_version for r in again] == [r.model_version for r in first[:300]]


def reloads(worker: Worker, result: str) -> float:
    """Reloads the worker counted with ``result``."""
    return worker.metrics.value("inference_model_reloads_total", result=result)


async def test_shadow_is_compared_and_counted_but_never_sent(
    settings: Settings, repo_dir: Path, testset: TestSet
) -> None:
    """With v2 shadowing v1, clients get only v1 replies; agreement on label is counted."""
    configure(repo_dir, "digits", '[routing]\ndefault_version = "1"\nshadow = "2"')
    settings = served_from(settings, repo_dir)
    repository = ModelRepository.load(repo_dir)
    pixels = testset[0][:300]
    v1 = repository.route("digits", "1", "").primary.predict({"pixels": pixels})["label"]
    v2 = repository.route("digits", "2", "").primary.predict({"pixels": pixels})["label"]
    from .conftest import reply_reader  # noqa: PLC0415

    async with (
        reply_reader(settings) as raw_replies,
        running_worker(settings, repository) as worker,
        InferenceClient(settings.kafka) as client,
    ):
        replies = await ask(client, pixels)

        def shadow(result: str) -> float:
            return worker.metrics.value(
                "inference_shadow_comparisons_total",
                model="digits", primary="1", shadow="2", result=result,
            )  # fmt: skip

        await wait_for(
            lambda: shadow("agreed") + shadow("disagreed") == len(pixels),
            timeout=60,
            what="every request compared with the shadow",
        )
        await wait_for(lambda: len(raw_replies) >= len(pixels), timeout=30, what="replies read")
    assert {r.model_version for r in replies} == {"1"}
    replies_topic = settings.kafka.replies_topic
    assert await topic_size(settings, replies_topic) == len(pixels), "shadow results never sent"
    assert len(raw_replies) == len(pixels)
    assert shadow("agreed") == int((v1 == v2).sum())
    assert shadow("disagreed") == len(pixels) - int((v1 == v2).sum())
    assert shadow("failed") == 0
    assert shadow("dropped") == 0


async def test_a_stuck_shadow_never_delays_the_primary(
    settings: Settings, repo_dir: Path, testset: TestSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shadow copies run in their own thread: with the shadow's model stuck, v1 still answers.

    The stuck shadow's queue is bounded by max_in_flight: copies beyond it are dropped, counted.
    """
    configure(repo_dir, "digits", '[routing]\ndefault_version = "1"\nshadow = "2"')
    settings = changed(served_from(settings, repo_dir), "runtime", max_in_flight=10)
    repository = ModelRepository.load(repo_dir)
    release = threading.Event()
    real = LoadedModel.upload

    def upload(self: LoadedModel, inputs: Any) -> Any:
        if self.version == "2":
            release.wait(120)  # the shadow's model hangs until the test lets it go
        return real(self, inputs)

    monkeypatch.setattr(LoadedModel, "upload", upload)
    pixels = testset[0][:30]
    async with (
        running_worker(settings, repository) as worker,
        InferenceClient(settings.kafka) as client,
    ):
        try:
            replies = await asyncio.gather(
                *(client.infer("digits", {"pixels": pixels[i : i + 1]}, timeout=20)
                  for i in range(len(pixels)))
            )  # fmt: skip
            compared = [
                worker.metrics.value(
                    "inference_shadow_comparisons_total",
                    model="digits",
                    primary="1",
                    shadow="2",
                    result=result,
                )
                for result in ("agreed", "disagreed")
            ]
            assert sum(compared) == 0, "the shadow is still stuck"
            dropped = worker.metrics.value(
                "inference_shadow_comparisons_total",
                model="digits", primary="1", shadow="2", result="dropped",
            )  # fmt: skip
            queued = worker.metrics.value("inference_shadow_queued")
            # The stuck run holds at most 10 copies (the queue's bound when it began).
            assert queued == 10
            assert dropped >= len(pixels) - 10 - 10
        finally:
            release.set()
    assert [r.model_version for r in replies] == ["1"] * len(pixels)
    assert all(r.error is None for r in replies)


async def test_reload_under_load_adds_a_version_and_changes_the_split_without_loss(
    settings: Settings, repo_dir: Path, testset: TestSet
) -> None:
    """Editing config.toml under load (file watch) brings v2 in: no lost or failed requests."""
    configure(repo_dir, "digits", '[version_policy]\nspecific = ["1"]')
    settings = served_from(settings, repo_dir)
    settings = changed(settings, "models", poll_interval_s=0.2)
    repository = ModelRepository.load(repo_dir)
    pixels = testset[0]
    async with (
        running_worker(settings, repository) as worker,
        InferenceClient(settings.kafka) as client,
    ):
        before = await ask(client, pixels[:100])
        config = repo_dir / "digits" / "config.toml"
        config.write_text(
            config.read_text().replace(
                '[version_policy]\nspecific = ["1"]', '[routing]\nsplit = { "1" = 50, "2" = 50 }'
            )
        )
        during = asyncio.gather(*(ask(client, pixels[i : i + 60]) for i in range(0, 360, 60)))
        await wait_for(lambda: reloads(worker, "ok") >= 1, timeout=30, what="the reload")
        after = await ask(client, pixels[:200])
        during_replies = [r for chunk in await during for r in chunk]
    assert {r.model_version for r in before} == {"1"}
    for reply in [*before, *during_replies, *after]:
        assert reply.error is None, reply.error
    assert {r.model_version for r in after} == {"1", "2"}


async def test_broken_new_version_is_rejected_while_the_old_keeps_serving(
    settings: Settings, repo_dir: Path, testset: TestSet
) -> None:
    """A new version folder that fails to load is refused on reload; v2 keeps answering."""
    settings = served_from(settings, repo_dir)
    repository = ModelRepository.load(repo_dir)
    async with (
        running_worker(settings, repository) as worker,
        InferenceClient(settings.kafka) as client,
    ):
        (repo_dir / "digits" / "3").mkdir()
        (repo_dir / "digits" / "3" / "model.pt2").write_bytes(b"not a torch.export archive")
        worker.request_reload()
        await wait_for(lambda: reloads(worker, "failed") >= 1, timeout=30, what="the reload")
        default = await ask(client, testset[0][:20])
        three = await client.infer("digits", {"pixels": testset[0][:1]}, version="3", timeout=60)
    assert {r.model_version for r in default} == {"2"}
    assert all(r.error is None for r in default)
    assert three.error is not None
    assert three.error.code == "NOT_FOUND"


@pytest.mark.parametrize(
    ("old", "new"),
    [("max_batch_size = 64", "max_batch_size = -1"), ("shape = [-1, 64]", 'shape = [-1, "4x"]')],
)
async def test_a_malformed_config_on_reload_keeps_the_worker_serving(
    settings: Settings, repo_dir: Path, testset: TestSet, old: str, new: str
) -> None:
    """A config.toml broken while serving: the reload fails and counts; requests still served."""
    settings = served_from(settings, repo_dir)
    repository = ModelRepository.load(repo_dir)
    async with (
        running_worker(settings, repository) as worker,
        InferenceClient(settings.kafka) as client,
    ):
        config = repo_dir / "digits" / "config.toml"
        config.write_text(config.read_text().replace(old, new, 1))
        worker.request_reload()
        await wait_for(lambda: reloads(worker, "failed") >= 1, timeout=30, what="the reload")
        after = await ask(client, testset[0][:20])
    assert reloads(worker, "ok") == 0
    assert all(r.error is None for r in after)
    assert {r.model_version for r in after} == {"2"}


async def test_sighup_applies_a_rollback_in_a_running_worker_process(
    settings: Settings,
    repo_dir: Path,
    testset: TestSet,
    worker_processes: Callable[[Settings], WorkerProcess],
) -> None:
    """Rollback is a config change: pin default_version = 1, send SIGHUP, traffic moves to v1."""
    settings = served_from(settings, repo_dir)
    process = worker_processes(settings)
    await wait_for(process.serving, timeout=90, what="the worker to join")
    row = testset[0][:1]
    async with InferenceClient(settings.kafka) as client:
        assert (await client.infer("digits", {"pixels": row}, timeout=60)).model_version == "2"
        configure(repo_dir, "digits", '[routing]\ndefault_version = "1"')
        process.signal(signal.SIGHUP)

        async def rolled_back() -> bool:
            reply = await client.infer("digits", {"pixels": row}, timeout=60)
            return reply.model_version == "1"

        await wait_for(rolled_back, timeout=60, what="unnamed requests answered by v1")
    assert process.proc.poll() is None, "SIGHUP reloads; it does not stop the worker"
