"""The GPU path on a real CUDA device: run by ``dev/gpu_check.sh`` (``pytest -m gpu``).

Deselected by default (``-m "not gpu"`` in the project's pytest options): the CPU machine that
runs CI has no GPU. On a GPU machine these tests fail, loudly, when CUDA is not visible.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from worker.client import InferenceClient
from worker.errors import ErrorCode, RequestError
from worker.forward import run_batches, stack_inputs
from worker.instances import Instances
from worker.metrics import Metrics
from worker.model import Prepared
from worker.model_config import Execution
from worker.repository import LoadOptions, ModelRepository
from worker.settings import Settings

from .conftest import MODELS, changed, running_worker
from .test_device import sized_model
from .test_versions import ask

pytestmark = pytest.mark.gpu

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


@pytest.fixture(autouse=True)
def cuda() -> None:
    """Every test here needs a CUDA device: none is a failure, not a skip."""
    assert torch.cuda.is_available(), "no CUDA device visible: run these on a GPU machine"


def on(device: str, precision: str = "fp32") -> ModelRepository:
    """The test models loaded on ``device`` in ``precision``."""
    return ModelRepository.load(
        MODELS, options=LoadOptions(execution=Execution(device, precision, 2))
    )


def test_models_load_on_the_gpu_and_agree_with_the_cpu(testset: TestSet) -> None:
    """fp32 on cuda: the same labels as the CPU, probabilities within float tolerance."""
    pixels = testset[0]
    gpu, cpu = on("cuda"), on("cpu")
    for version in ("1", "2"):
        g = gpu.route("digits", version, "").primary
        assert g.device.type == "cuda"
        want = cpu.route("digits", version, "").primary.predict({"pixels": pixels})
        got = g.predict({"pixels": pixels})
        np.testing.assert_array_equal(got["label"], want["label"])
        np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-4)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_on_the_gpu_is_close_to_fp32(precision: str, testset: TestSet) -> None:
    """fp16/bf16 on cuda: FP32 outputs, labels >= 97% as fp32's."""
    pixels = testset[0]
    want = on("cuda").route("digits", "2", "").primary.predict({"pixels": pixels})
    got = on("cuda", precision).route("digits", "2", "").primary.predict({"pixels": pixels})
    assert got["probabilities"].dtype == np.float32
    assert (got["label"] == want["label"]).mean() >= 0.97


def test_the_pipelined_run_matches_batch_by_batch(testset: TestSet) -> None:
    """run_batches (pinned assembly, copy stream, overlap) gives each batch's own outputs."""
    model = on("cuda").route("digits", "2", "").primary
    pixels = testset[0][:96]
    requests = [Prepared([pixels[i : i + 1]], rows=1) for i in range(96)]
    batches = [requests[i : i + 32] for i in range(0, 96, 32)]
    run = run_batches(model, batches)
    for batch, (_, _, results) in zip(batches, run, strict=True):
        want = model.predict(stack_inputs(model, batch))
        got = np.concatenate([r[1].to_numpy() for r in results])  # type: ignore[index]
        np.testing.assert_array_equal(got, want["label"])


class Greedy(torch.nn.Module):
    """Asks CUDA for an impossible amount of memory above ``limit`` rows (a real OOM)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            torch.empty(1 << 44, dtype=torch.uint8, device=x.device)  # 16 TiB
        return x * 2


def test_a_real_cuda_oom_splits_the_batch_and_refuses_only_the_too_big() -> None:
    """Real CUDA OOM: batch-mates answered after the split; a 3-row request RESOURCE_EXHAUSTED."""
    model = sized_model(Greedy(limit=2), device="cuda:0")
    one = [Prepared([np.full((1, 2), float(i), np.float32)], rows=1) for i in range(6)]
    big = Prepared([np.ones((3, 2), np.float32)], rows=3)
    [(_, _, results)] = run_batches(model, [[*one, big]])
    for i, result in enumerate(results[:6]):
        assert not isinstance(result, Exception)
        np.testing.assert_array_equal(result[0].to_numpy(), [[2.0 * i, 2.0 * i]])
    assert isinstance(results[6], RequestError)
    assert results[6].code is ErrorCode.RESOURCE_EXHAUSTED


async def test_each_instance_has_its_own_cuda_stream() -> None:
    """Two instances on cuda: two threads, two streams, neither the default stream."""
    pool = Instances("m", "1", 2, device=torch.device("cuda", 0), threads=1, busy=Metrics().busy)
    barrier = threading.Barrier(2, timeout=10)

    def stream() -> int:
        barrier.wait()
        return int(torch.cuda.current_stream().cuda_stream)

    try:
        streams = await asyncio.gather(pool.run(stream), pool.run(stream))
    finally:
        pool.close()
    assert len(set(streams)) == 2
    assert torch.cuda.default_stream().cuda_stream not in streams


async def test_the_worker_serves_on_the_gpu_over_kafka(
    settings: Settings, testset: TestSet, tmp_path: Path
) -> None:
    """A worker with WORKER_MODELS__DEVICE=cuda: replies as on the CPU; memory gauges filled."""
    settings = changed(settings, "models", device="cuda", instances=2)
    repository = ModelRepository.load(
        MODELS, options=LoadOptions(execution=settings.models.execution)
    )
    pixels = testset[0][:100]
    want = on("cpu").route("digits", "2", "").primary.predict({"pixels": pixels})
    async with running_worker(settings, repository) as worker:
        async with InferenceClient(settings.kafka) as client:
            replies = await ask(client, pixels, version="2")
        allocated = worker.metrics.value(
            "inference_device_memory_bytes", device="cuda:0", kind="allocated"
        )
    assert [r.output("label")[0] for r in replies] == list(want["label"])
    assert allocated > 0
