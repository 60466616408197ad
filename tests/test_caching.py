"""The response cache in the request path (worker.caching): hits, stores, shadows, reloads.

The pipeline runs over a scripted transport (tests/test_pipeline.py's), with the worker's own
stages and models and a copy of the model repository with a ``[cache]`` table. No broker.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from aiokafka import TopicPartition

from worker.admission import Job
from worker.answering import RunAnswers
from worker.answers import Answer
from worker.codec import decode_response, encode_request
from worker.direct import Direct
from worker.domain import InferenceRequest, Tensor, Timing
from worker.inflight import InFlight
from worker.metrics import Metrics
from worker.model import LoadedModel
from worker.origins import Call, Record
from worker.repository import ModelRepository
from worker.response_cache import cache_key, entry_size

from .conftest import MODELS, TEXT_MODELS, configure
from .test_pipeline import Transport, Watching, opened

PIXELS = np.load(MODELS / "digits" / "testset.npz")["pixels"].astype(np.float32)[:24]
ENTRY = entry_size(bytes(32), [Tensor("probabilities", "FP32", (1, 10), bytes(40)),
                               Tensor("label", "INT64", (1,), bytes(8))])  # fmt: skip
"""What one digits answer counts for in a cache."""


def ask(row: int, rid: str = "", **fields: object) -> InferenceRequest:
    """A digits request for ``PIXELS[row]`` (id ``q-<row>`` unless given)."""
    pixels = [Tensor.from_numpy("pixels", PIXELS[row : row + 1])]
    return InferenceRequest(rid or f"q-{row}", "digits", pixels, **fields)  # type: ignore[arg-type]


def cached_repo(repo_dir: Path, max_bytes: int, extra: str = "") -> ModelRepository:
    """The test repository with digits caching up to ``max_bytes`` (and ``extra`` config)."""
    configure(repo_dir, "digits", f"{extra}\n[cache]\nmax_bytes = {max_bytes}")
    return ModelRepository.load(repo_dir)


def rewrite_cache(repo_dir: Path, max_bytes: int) -> None:
    """The digits config.toml as shipped, with a new ``[cache] max_bytes``."""
    shutil.copy(MODELS / "digits" / "config.toml", repo_dir / "digits" / "config.toml")
    configure(repo_dir, "digits", f"[cache]\nmax_bytes = {max_bytes}")


def count(metrics: Metrics, what: str, version: str = "2") -> float:
    """A cache counter of digits ``version``."""
    return metrics.value(f"inference_cache_{what}_total", model="digits", version=version)


def cache_of(repository: ModelRepository, version: str = "2") -> LoadedModel:
    """The digits version serving ``version``."""
    return repository.route("digits", version, "").primary


async def test_a_repeated_request_is_answered_from_the_cache_over_each_origin(
    repo_dir: Path,
) -> None:
    """A miss runs and is stored; the same inputs again, as a call or a record, are a hit."""
    repository = cached_repo(repo_dir, 100_000)
    transport, metrics = Transport(), Metrics()
    async with opened(repository, Watching(), transport, metrics=metrics) as pipeline:
        direct = Direct(pipeline.dispatch, InFlight(10))
        first = (await direct.infer("rest", ask(0, "first"))).response
        again = (await direct.infer("grpc", ask(0, "again"))).response
        encoded = encode_request(ask(0, "as-record"))
        pipeline.dispatch(Record(TopicPartition("requests", 0), 0, None, encoded, [], 1))
    [[reply]] = transport.published
    record_reply = decode_response(reply.value or b"")
    assert first.parameters is None
    assert first.timing is not None
    assert first.timing.batch_size >= 1
    for hit, rid in ((again, "again"), (record_reply, "as-record")):
        assert (hit.id, hit.model_name, hit.model_version) == (rid, "digits", "2")
        assert hit.parameters == {"cached": True}
        assert hit.timing == Timing(0, 0, 0)
        assert hit.outputs == first.outputs
    assert (count(metrics, "hits"), count(metrics, "misses")) == (2, 1)
    assert metrics.value("inference_cache_bytes", model="digits", version="2") == ENTRY
    metas = [item.meta for item in transport.acknowledged]
    assert [(m.labels, m.outcome, m.queue_s) for m in metas if m is not None][-1] == (
        ("digits", "2"),
        "ok",
        0.0,
    ), "a hit counts as an answer of the version that served it"


async def test_a_hit_runs_no_shadow_copy_and_shadow_results_are_never_stored(
    repo_dir: Path,
) -> None:
    """A miss is shadowed (compared once), its hit is not; the shadow's cache stays empty."""
    repository = cached_repo(repo_dir, 100_000, '[routing]\ndefault_version = "2"\nshadow = "1"')
    transport, metrics = Transport(), Metrics()
    async with opened(repository, Watching(), transport, metrics=metrics) as pipeline:
        direct = Direct(pipeline.dispatch, InFlight(10))
        first = (await direct.infer("rest", ask(3, "miss"))).response
        await pipeline.lanes.drain()  # the shadow copy compared too
    async with opened(repository, Watching(), transport, metrics=metrics) as pipeline:
        direct = Direct(pipeline.dispatch, InFlight(10))
        hit = (await direct.infer("rest", ask(3, "hit"))).response
    compared = sum(
        metrics.value("inference_shadow_comparisons_total", model="digits", primary="2",
                      shadow="1", result=result)
        for result in ("agreed", "disagreed", "failed", "dropped")
    )  # fmt: skip
    assert first.parameters is None
    assert hit.parameters == {"cached": True}
    assert compared == 1
    assert len(cache_of(repository, "2").cache or ()) == 1
    shadow_cache = cache_of(repository, "1").cache
    assert shadow_cache is not None
    assert len(shadow_cache) == 0


def job(model: LoadedModel, row: int, *, truncated: int = 0, shadow: bool = False) -> Job:
    """A validated digits job of a call (its prepared inputs marked ``truncated``)."""
    request = ask(row)
    prepared = replace(model.validate(request), truncated=truncated)
    call = Call("rest", 1, request, [], 1, lambda _r, _h: None)
    return Job(call, request, model, prepared, time.monotonic(), None, is_shadow=shadow)


async def test_errors_truncated_answers_and_shadow_results_are_never_stored(
    repo_dir: Path,
) -> None:
    """Of four answered jobs, only the plain success is kept."""
    model = cache_of(cached_repo(repo_dir, 100_000))
    jobs = [job(model, 0), job(model, 1, truncated=1), job(model, 2, shadow=True), job(model, 3)]
    outputs = [Tensor.from_numpy("label", np.array([7]))]
    results: list[object] = [RuntimeError("model failed"), outputs, outputs, outputs]

    async def runner(_m: LoadedModel, batches: list[object], _stop: object) -> list[object]:
        return [(0.0, 0.001, results)]

    answered: list[Answer] = []
    await RunAnswers(answered.extend, Metrics()).run(runner, None, None, [jobs])  # type: ignore[arg-type]
    assert model.cache is not None
    assert model.cache.keys() == [cache_key(jobs[3].request.inputs)]
    assert len(answered) == 3
    assert answered[0].response is not None
    assert answered[0].response.error is not None


async def test_an_expired_request_is_not_answered_from_the_cache(repo_dir: Path) -> None:
    """Its deadline passed: DEADLINE_EXCEEDED from its lane, as without a cache; no hit."""
    repository = cached_repo(repo_dir, 100_000)
    metrics = Metrics()
    async with opened(repository, Watching(), Transport(), metrics=metrics) as pipeline:
        direct = Direct(pipeline.dispatch, InFlight(10))
        await direct.infer("rest", ask(1))
        past = int(time.time() * 1000) - 1000
        late = (await direct.infer("rest", ask(1, "late", deadline_ms=past))).response
    assert late.error is not None
    assert late.error.code == "DEADLINE_EXCEEDED"
    assert late.parameters is None
    assert count(metrics, "hits") == 0


async def test_unique_requests_evict_the_least_recently_used_within_the_bound(
    repo_dir: Path,
) -> None:
    """A cache of three answers: 24 distinct requests evict 21, never over the bound."""
    repository = cached_repo(repo_dir, 3 * ENTRY)
    cache = cache_of(repository).cache
    assert cache is not None
    metrics = Metrics()
    async with opened(repository, Watching(), Transport(), metrics=metrics) as pipeline:
        direct = Direct(pipeline.dispatch, InFlight(10))
        for row in range(len(PIXELS)):
            await direct.infer("rest", ask(row))
            assert cache.bytes <= 3 * ENTRY
        oldest = (await direct.infer("rest", ask(0, "oldest"))).response
        newest = (await direct.infer("rest", ask(len(PIXELS) - 1, "newest"))).response
    assert oldest.parameters is None, "evicted long ago: run again"
    assert newest.parameters == {"cached": True}
    assert count(metrics, "evictions") == len(PIXELS) - 3 + 1
    assert metrics.value("inference_cache_bytes", model="digits", version="2") == 3 * ENTRY


async def test_a_reload_keeps_an_unchanged_cache_and_drops_a_changed_one(
    repo_dir: Path,
) -> None:
    """Same program and [cache]: kept; new max_bytes, new model file or no cache: dropped."""
    repository = cached_repo(repo_dir, 100_000)
    metrics = Metrics()

    def reload() -> ModelRepository:
        new, errors = serving.reload()
        assert errors == []
        pipeline.repository = lambda: new
        pipeline.reload(new)
        return new

    async with opened(repository, Watching(), Transport(), metrics=metrics) as pipeline:
        direct = Direct(pipeline.dispatch, InFlight(10))

        async def cached() -> bool:
            await direct.infer("rest", ask(2, "fill"))
            return (await direct.infer("rest", ask(2, "probe"))).response.parameters is not None

        serving = repository
        first = cache_of(serving).cache
        assert first is not None
        await direct.infer("rest", ask(2))
        serving = reload()
        assert cache_of(serving).cache is first
        unchanged = (await direct.infer("rest", ask(2, "kept"))).response
        rewrite_cache(repo_dir, 50_000)
        serving = reload()
        assert len(first) == 0, "the old cache is closed and empty"
        resized = (await direct.infer("rest", ask(2, "resized"))).response
        assert await cached()
        before_touch = cache_of(serving).cache
        model_file = repo_dir / "digits" / "2" / "model.pt2"
        os.utime(model_file, ns=(time.time_ns(), time.time_ns()))
        serving = reload()
        reloaded = (await direct.infer("rest", ask(2, "new program"))).response
        assert before_touch is not None
        assert cache_of(serving).cache is not before_touch
        rewrite_cache(repo_dir, 0)
        serving = reload()
        assert cache_of(serving).cache is None
        assert not await cached()
    assert unchanged.parameters == {"cached": True}
    assert resized.parameters is None
    assert reloaded.parameters is None
    assert metrics.registry.get_sample_value(
        "inference_cache_bytes", {"model": "digits", "version": "2"}
    ) is None, "a version without a cache has no gauge"  # fmt: skip


@pytest.fixture
def text_repo(tmp_path: Path) -> ModelRepository:
    """MiniLM with a response cache (its exported version folder linked, not copied)."""
    if not (TEXT_MODELS / "minilm" / "1" / "model.pt2").is_file():
        pytest.fail("models/minilm is not exported: run `make minilm` (the CI does)")
    folder = tmp_path / "models" / "minilm"
    folder.mkdir(parents=True)
    config = (TEXT_MODELS / "minilm" / "config.toml").read_text()
    (folder / "config.toml").write_text(config + "\n[cache]\nmax_bytes = 1000000\n")
    (folder / "1").symlink_to(TEXT_MODELS / "minilm" / "1")
    return ModelRepository.load(tmp_path / "models")


async def test_text_is_keyed_by_its_strings_and_a_truncated_answer_is_not_kept(
    text_repo: ModelRepository,
) -> None:
    """The same sentences again: a hit; a sentence cut to max_length: run every time."""
    sentences = ["the cache keeps this", "and this"]
    long = " ".join(["word"] * 400)

    def text(rid: str, items: list[str]) -> InferenceRequest:
        return InferenceRequest(rid, "minilm", [Tensor.from_strings("text", items)])

    async with opened(text_repo, Watching(), Transport()) as pipeline:
        direct = Direct(pipeline.dispatch, InFlight(10))
        first = (await direct.infer("rest", text("a", sentences))).response
        again = (await direct.infer("rest", text("b", sentences))).response
        other = (await direct.infer("rest", text("c", sentences[::-1]))).response
        cut = [(await direct.infer("rest", text(f"l{i}", [long]))).response for i in range(2)]
    assert first.error is None
    assert again.parameters == {"cached": True}
    assert again.outputs == first.outputs
    assert other.parameters is None, "other strings (their order counts), other key"
    assert [r.parameters for r in cut] == [{"truncated": 1}, {"truncated": 1}]


def test_a_miss_is_hashed_once_and_stored_under_its_lookup_key(
    repo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lookup then store of one miss: one key computed (a 4 MiB input costs ms per hash)."""
    from worker import caching  # noqa: PLC0415

    model = cache_of(cached_repo(repo_dir, 100_000))
    computed: list[bytes] = []

    def counting(inputs: list[Tensor]) -> bytes:
        computed.append(cache_key(inputs))
        return computed[-1]

    monkeypatch.setattr(caching, "cache_key", counting)
    missed = job(model, 5)
    assert caching.lookup(missed, Metrics()) is None
    caching.store(missed, [Tensor.from_numpy("label", np.array([3]))], Metrics())
    assert len(computed) == 1
    assert model.cache is not None
    assert model.cache.keys() == computed
