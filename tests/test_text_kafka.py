"""Text models and code around models, through the real broker.

Strings in, embeddings out, mixed lengths batched; a handler.py post-processing replies.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt

from worker.bench.corpus import paragraphs
from worker.client import InferenceClient
from worker.domain import Tensor
from worker.forward import run_isolated
from worker.repository import ModelRepository
from worker.settings import Settings, env_vars

from .conftest import MODELS, ROOT, TEXT_MODELS, changed, running_worker, wait_for

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


def text_settings(settings: Settings) -> Settings:
    """The test's settings serving the repository with MiniLM, batches grouped by length."""
    settings = changed(settings, "models", repository=TEXT_MODELS)
    return changed(settings, "batching", max_batch_size=16, max_batch_delay_ms=50)


def alone(repository: ModelRepository, text: str) -> np.ndarray:
    """MiniLM's embedding of one string, in process, batch of one."""
    model = repository.route("minilm", None, "").primary
    from worker.domain import InferenceRequest  # noqa: PLC0415

    request = InferenceRequest("r", "minilm", [Tensor.from_strings("text", [text])])
    result = run_isolated(model, [model.validate(request)])[0]
    assert not isinstance(result, Exception)
    embedding: np.ndarray = result[0].to_numpy()[0]
    return embedding


async def test_strings_of_mixed_lengths_batch_together_and_match_alone(
    settings: Settings, text_repository: ModelRepository
) -> None:
    """60 sentences of 6 to 250 tokens: shared batches, each embedding as if computed alone."""
    settings = text_settings(settings)
    texts = paragraphs(60, seed=11)
    async with (
        running_worker(settings, text_repository) as worker,
        InferenceClient(settings.kafka) as client,
    ):
        replies = await asyncio.gather(
            *(client.infer("minilm", {"text": [t]}, timeout=120) for t in texts)
        )
        real = worker.metrics.value(
            "inference_batch_tokens_total", model="minilm", version="1", kind="real"
        )
        padded = worker.metrics.value(
            "inference_batch_tokens_total", model="minilm", version="1", kind="padded"
        )
    for text, reply in zip(texts, replies, strict=True):
        assert reply.error is None, reply.error
        embedding = reply.output("embedding")
        assert embedding.shape == (1, 384)
        np.testing.assert_allclose(embedding[0], alone(text_repository, text), atol=1e-5)
    sizes = [r.timing.batch_size for r in replies if r.timing is not None]
    assert max(sizes) > 1, "mixed lengths share batches"
    assert 0 < real <= padded
    assert real / padded > 0.5, "length-aware batching keeps padding small"


async def test_truncation_and_bad_strings_are_answered(
    settings: Settings, text_repository: ModelRepository
) -> None:
    """A long string's reply says it was truncated; non-UTF-8 bytes get INVALID_ARGUMENT."""
    settings = text_settings(settings)
    async with (
        running_worker(settings, text_repository),
        InferenceClient(settings.kafka) as client,
    ):
        long, bad, numbers = await asyncio.gather(
            client.infer("minilm", {"text": ["word " * 600, "short"]}, timeout=60),
            client.infer("minilm", [Tensor.from_strings("text", [b"ok", b"\xc3\x28"])], timeout=60),
            client.infer("minilm", {"text": np.zeros(2, np.float32)}, timeout=60),
        )
    assert long.error is None, long.error
    assert long.parameters == {"truncated": 1}
    assert long.output("embedding").shape == (2, 384)
    assert bad.error is not None
    assert bad.error.code == "INVALID_ARGUMENT"
    assert "element 1 is not UTF-8" in bad.error.message
    assert numbers.error is not None
    assert numbers.error.code == "INVALID_ARGUMENT"


async def test_predict_text_prints_size_norm_and_first_values(
    settings: Settings, text_repository: ModelRepository
) -> None:
    """`python -m worker predict --model minilm --text ...` prints each embedding's summary."""
    settings = text_settings(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env |= env_vars(settings.kafka, "kafka")
    async with running_worker(settings, text_repository):
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "worker", "predict", "--model", "minilm",
             "--text", "Kafka absorbs the load.", "--text", "Workers scale out."],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("embedding[0]: 384 values, norm 1.0000, first [")
    first = alone(text_repository, "Kafka absorbs the load.")[0]
    assert f"{first:.4f}" in lines[0]


async def test_a_handler_wraps_batches_when_code_is_allowed(
    settings: Settings, repo_dir: Path, testset: TestSet
) -> None:
    """With WORKER_MODELS__ALLOW_CODE, a version's handler.py post-processes every reply."""
    (repo_dir / "digits" / "1" / "handler.py").write_text(
        "def postprocess(outputs):\n"
        "    probabilities, label = outputs\n"
        '    return {"probabilities": probabilities, "label": label + 100}\n'
    )
    settings = changed(settings, "models", repository=repo_dir, allow_code=True)
    repository = ModelRepository.load(repo_dir, allow_code=True)
    plain = ModelRepository.load(MODELS).route("digits", "1", "").primary
    pixels = testset[0][:20]
    expected = plain.predict({"pixels": pixels})["label"] + 100
    async with (
        running_worker(settings, repository),
        InferenceClient(settings.kafka) as client,
    ):
        replies = await asyncio.gather(
            *(client.infer("digits", {"pixels": pixels[i : i + 1]}, version="1", timeout=60)
              for i in range(len(pixels)))
        )  # fmt: skip
    assert [int(r.output("label")[0]) for r in replies] == expected.tolist()


async def test_a_text_models_tokenizer_settings_change_on_reload(
    settings: Settings, tmp_path: Path
) -> None:
    """Reloading a new max_length for MiniLM applies it live: the same string is now cut."""
    repo = tmp_path / "models"
    shutil.copytree(TEXT_MODELS / "minilm", repo / "minilm")
    settings = changed(text_settings(settings), "models", repository=repo)
    text = "word " * 50  # 52 tokens with [CLS] and [SEP]
    async with (
        running_worker(settings, ModelRepository.load(repo)) as worker,
        InferenceClient(settings.kafka) as client,
    ):
        before = await client.infer("minilm", {"text": [text]}, timeout=60)
        config = repo / "minilm" / "config.toml"
        config.write_text(config.read_text().replace("max_length = 256", "max_length = 16"))
        worker.request_reload()
        await wait_for(
            lambda: worker.metrics.value("inference_model_reloads_total", result="ok") >= 1,
            timeout=60,
            what="the reload",
        )
        after = await client.infer("minilm", {"text": [text]}, timeout=60)
    assert before.error is None, before.error
    assert before.parameters is None, "52 tokens fit 256"
    assert after.error is None, after.error
    assert after.parameters == {"truncated": 1}
    assert after.output("embedding").shape == (1, 384)
