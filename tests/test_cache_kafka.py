"""The response cache in a running worker: the real broker, REST and gRPC, reloads.

A hit carries ``cached`` in its reply's parameters in every form: the Avro reply's map, the V2
JSON ``parameters`` object, the gRPC ``parameters`` map (``bool_param``).
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from worker.app import Worker
from worker.client import InferenceClient
from worker.domain import InferenceResponse
from worker.repository import ModelRepository
from worker.settings import Settings

from .conftest import MODELS, changed, configure, wait_for
from .test_endpoints import infer_message, rest, serving, stub, v2_body, with_endpoints

pytestmark = pytest.mark.kafka

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]
INFER = "/v2/models/digits/versions/2/infer"


def cache_config(repo_dir: Path, value: str) -> None:
    """The digits shipped config with ``[cache] max_bytes = value`` (any TOML, hostile too)."""
    shutil.copy(MODELS / "digits" / "config.toml", repo_dir / "digits" / "config.toml")
    configure(repo_dir, "digits", f"[cache]\nmax_bytes = {value}")


def cached_settings(settings: Settings, repo_dir: Path, max_bytes: int) -> Settings:
    """Settings serving ``repo_dir`` with digits caching ``max_bytes``, endpoints on."""
    cache_config(repo_dir, str(max_bytes))
    return with_endpoints(changed(settings, "models", repository=repo_dir))


async def kafka(client: InferenceClient, pixels: npt.NDArray[np.float32]) -> InferenceResponse:
    """One digits request (v2, the default) over Kafka."""
    return await client.infer("digits", {"pixels": pixels}, timeout=60)


async def test_repeats_over_kafka_rest_and_grpc_carry_the_cached_flag(
    settings: Settings, repo_dir: Path, testset: TestSet
) -> None:
    """Each transport's repeat is a hit with cached=true; a REST hit keeps its output choice."""
    pixels = testset[0]
    settings = cached_settings(settings, repo_dir, 100_000)
    async with (
        serving(settings, ModelRepository.load(repo_dir)) as worker,
        InferenceClient(settings.kafka) as client,
    ):
        assert worker.rest_port is not None
        assert worker.grpc_port is not None
        kafka_miss, kafka_hit = [await kafka(client, pixels[0:1]) for _ in range(2)]
        rest_miss, rest_hit = [(await rest(worker.rest_port, INFER, v2_body(pixels[1:2])))[1]
                               for _ in range(2)]  # fmt: skip
        chosen = {**v2_body(pixels[1:2]), "outputs": [{"name": "label"}]}
        _, rest_chosen = await rest(worker.rest_port, INFER, chosen)
        across = await kafka(client, pixels[1:2])
        async with stub(worker.grpc_port) as service:
            grpc_miss, grpc_hit = [await service.ModelInfer(infer_message(pixels[2:3], f"g{i}"))
                                   for i in range(2)]  # fmt: skip
        hits = worker.metrics.value("inference_cache_hits_total", model="digits", version="2")
        misses = worker.metrics.value("inference_cache_misses_total", model="digits", version="2")
        v1_hits = worker.metrics.value("inference_cache_hits_total", model="digits", version="1")
    assert kafka_miss.parameters is None
    assert kafka_hit.parameters == {"cached": True}
    assert kafka_hit.timing is not None
    assert (kafka_hit.timing.queue_us, kafka_hit.timing.batch_size) == (0, 0)
    np.testing.assert_array_equal(kafka_hit.output("label"), kafka_miss.output("label"))
    assert "cached" not in rest_miss["parameters"]
    assert rest_hit["parameters"]["cached"] is True
    assert rest_hit["parameters"]["batch_size"] == 0
    assert rest_hit["outputs"] == rest_miss["outputs"]
    assert rest_chosen["parameters"]["cached"] is True
    assert [o["name"] for o in rest_chosen["outputs"]] == ["label"]
    assert across.parameters == {"cached": True}, "REST filled it; Kafka finds it"
    assert "cached" not in grpc_miss.parameters
    assert grpc_hit.parameters["cached"].bool_param is True
    assert grpc_hit.raw_output_contents == grpc_miss.raw_output_contents
    assert (hits, misses, v1_hits) == (4, 2, 1)


def reloads(worker: Worker, result: str) -> float:
    """Reloads counted with ``result`` (ok, failed)."""
    return worker.metrics.value("inference_model_reloads_total", result=result)


def refused(worker: Worker, count: int) -> bool:
    """At least ``count`` reloads were refused."""
    return reloads(worker, "failed") >= count


async def test_hostile_cache_values_on_reload_keep_the_cache_and_a_change_drops_it(
    settings: Settings, repo_dir: Path, testset: TestSet
) -> None:
    """max_bytes -1 or "1GB": reload refused, still hits; a new max_bytes: a new, empty cache."""
    pixels = testset[0]
    settings = cached_settings(settings, repo_dir, 100_000)
    async with (
        serving(settings, ModelRepository.load(repo_dir)) as worker,
        InferenceClient(settings.kafka) as client,
    ):
        await kafka(client, pixels[0:1])
        for failed, hostile in enumerate(("-1", '"1GB"', "1e9"), start=1):
            cache_config(repo_dir, hostile)
            worker.request_reload()
            await wait_for(partial(refused, worker, failed), timeout=30, what="the refused reload")
            kept = await kafka(client, pixels[0:1])
            assert kept.parameters == {"cached": True}, hostile
        cache_config(repo_dir, "1000")  # room for one digits answer
        worker.request_reload()
        await wait_for(lambda: reloads(worker, "ok") >= 1, timeout=30, what="the reload")
        dropped = await kafka(client, pixels[0:1])
        evicting = await kafka(client, pixels[1:2])
        first_again = await kafka(client, pixels[0:1])
        evictions = worker.metrics.value(
            "inference_cache_evictions_total", model="digits", version="2"
        )
        held = worker.metrics.value("inference_cache_bytes", model="digits", version="2")
    assert dropped.parameters is None, "a changed [cache]: the old entries are gone"
    assert evicting.parameters is None
    assert first_again.parameters is None, "evicted by the one after it"
    assert evictions == 2
    assert 0 < held <= 1000
