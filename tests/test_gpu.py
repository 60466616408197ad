"""The GPU path on a real CUDA device: run by ``dev/gpu_check.sh`` (``pytest -m gpu``).

Deselected by default (``-m "not gpu"`` in the project's pytest options): the CPU machine that
runs CI has no GPU. On a GPU machine these tests fail, loudly, when CUDA is not visible.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from worker import staging
from worker.client import InferenceClient
from worker.domain import InferenceRequest, Tensor
from worker.errors import ErrorCode, RequestError
from worker.forward import run_batches, stack_inputs
from worker.instances import Instances
from worker.metrics import Metrics
from worker.model import LoadedModel, Prepared
from worker.model_config import Execution, ModelConfig
from worker.repository import LoadOptions, ModelRepository
from worker.settings import Settings

from .conftest import MODELS, TEXT_MODELS, changed, running_worker
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


@pytest.mark.kafka  # a lent GPU machine has no broker: dev/gpu_check.sh leaves this one out
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


# --- #25: overlap, warm-up per thread, stream leases, OOM recovery, a lost device ----------

SLEEP_CYCLES = 100_000_000
"""About 50-70 ms of a GPU's clock: long enough to see what the host does meanwhile."""


class Sleeper(torch.nn.Module):
    """Keeps its stream busy for a while; notes whether the stream was idle when called."""

    def __init__(self) -> None:
        super().__init__()
        self.idle_at_launch: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.idle_at_launch.append(torch.cuda.current_stream().query())
        torch.cuda._sleep(SLEEP_CYCLES)  # type: ignore[no-untyped-call]
        return x * 2


def test_the_next_batch_is_launched_while_the_one_before_still_runs() -> None:
    """Batch i+1 is queued before batch i is done (events); each compute time is its own."""
    module = Sleeper()
    model = sized_model(module, device="cuda:0")
    batches = [[Prepared([np.full((1, 2), float(b), np.float32)], rows=1)] for b in range(5)]
    began = time.monotonic()
    run = run_batches(model, batches)
    wall = time.monotonic() - began
    assert module.idle_at_launch[1:] == [False] * 4, module.idle_at_launch
    for b, (_, compute, results) in enumerate(run):
        assert not isinstance(results[0], Exception)
        np.testing.assert_array_equal(results[0][0].to_numpy(), [[2.0 * b, 2.0 * b]])
        assert 0 < compute < wall / 2, "one batch's time on the device, not the run's"


async def test_warm_up_runs_in_each_instance_thread_on_its_own_stream() -> None:
    """Two instances on cuda: each thread warms up on the stream it then serves on."""
    noted: list[tuple[str, int, int]] = []

    def note(what: str) -> None:
        noted.append((what, threading.get_ident(), torch.cuda.current_stream().cuda_stream))

    pool = Instances(
        "m", "1", 2, device=torch.device("cuda", 0), threads=1, busy=Metrics().busy,
        warm_up=lambda: note("warm"),
    )  # fmt: skip
    barrier = threading.Barrier(2, timeout=10)

    def serve() -> None:
        barrier.wait()
        note("serve")

    try:
        await asyncio.gather(pool.run(serve), pool.run(serve))
    finally:
        pool.close()
    warm = {(t, s) for what, t, s in noted if what == "warm"}
    served = {(t, s) for what, t, s in noted if what == "serve"}
    assert warm == served
    assert len({s for _, s in warm}) == 2
    assert torch.cuda.default_stream().cuda_stream not in {s for _, s in warm}


async def test_live_instances_never_share_a_stream_while_the_pool_has_free_ones() -> None:
    """15 instance threads (30 streams), draws by others, a reload: no live stream shared."""
    cuda = torch.device("cuda", 0)

    async def streams_of(pool: Instances) -> list[tuple[int, int]]:
        barrier = threading.Barrier(pool.count, timeout=20)

        def mine() -> tuple[int, int]:
            barrier.wait()
            copy = staging._copy_stream(cuda)
            return torch.cuda.current_stream().cuda_stream, copy.cuda_stream

        return list(await asyncio.gather(*(pool.run(mine) for _ in range(pool.count))))

    def five() -> Instances:
        return Instances("m", "1", 5, device=cuda, threads=1, busy=Metrics().busy)

    pools = [five(), five(), five()]
    try:
        live = {p: await streams_of(p) for p in pools}
        for _ in range(7):
            torch.cuda.Stream()  # type: ignore[no-untyped-call]  # drawn by other threads
        pools[1].close()
        del live[pools[1]]
        pools[1] = five()  # a reload: new threads
        live[pools[1]] = await streams_of(pools[1])
        handles = [h for pairs in live.values() for pair in pairs for h in pair]
        assert len(handles) == 30
        assert len(set(handles)) == 30, "two live instance threads share a stream"
    finally:
        for pool in pools:
            pool.close()


class Chunky(torch.nn.Module):
    """Holds ``chunk`` bytes of device memory per row while it runs (two rows fit, three not)."""

    def __init__(self, chunk: int) -> None:
        super().__init__()
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        held = [torch.empty(self.chunk, dtype=torch.uint8, device=x.device) for _ in x]
        return x * 2 + sum(float(h[:1].float().sum()) * 0 for h in held)


def test_a_real_oom_retry_finds_the_failed_attempts_memory_freed() -> None:
    """A batch that filled the GPU before failing: its halves fit, every request is answered."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    model = sized_model(Chunky(int(free * 0.4)), device="cuda:0")
    batch = [Prepared([np.full((1, 2), float(i), np.float32)], rows=1) for i in range(8)]
    [(_, _, results)] = run_batches(model, [batch])
    for i, result in enumerate(results):
        assert not isinstance(result, Exception), f"request {i}: {result!r}"
        np.testing.assert_array_equal(result[0].to_numpy(), [[2.0 * i, 2.0 * i]])


DEVICE_ASSERT = """
import sys, tempfile, pathlib
import numpy as np, torch
from worker.errors import DeviceLostError
from worker.forward import run_batches
from worker.model import LoadedModel, Prepared
from worker.model_config import Execution, ModelConfig
folder = pathlib.Path(tempfile.mkdtemp()) / "ids"
folder.mkdir()
(folder / "config.toml").write_text(
    '[[inputs]]\\nname = "ids"\\ndatatype = "INT64"\\nshape = [-1, -1]\\n\\n'
    '[[outputs]]\\nname = "y"\\ndatatype = "FP32"\\nshape = [-1, -1, 4]\\n'
)
cuda = torch.device("cuda", 0)
model = LoadedModel(ModelConfig.load(folder), "1", torch.nn.Embedding(10, 4).to(cuda),
                    execution=Execution("cuda:0"), device=cuda)
good = Prepared([np.array([[1, 2, 3]])], rows=1, length=3)
bad = Prepared([np.array([[1, 12, 3]])], rows=1, length=3)
try:
    run_batches(model, [[good, bad]])
except DeviceLostError as exc:
    print("lost:", exc)
    sys.exit(0)
print("not lost")
sys.exit(1)
"""


def test_a_real_device_side_assert_stops_the_run() -> None:
    """An out-of-range embedding index on cuda: DeviceLostError, not a retry (own process)."""
    done = subprocess.run(
        [sys.executable, "-c", DEVICE_ASSERT], check=False, capture_output=True, text=True,
        timeout=120, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "device-side assert" in done.stdout


class SlowDouble(torch.nn.Module):
    """Sleeps on its stream, then doubles: the next batch's copy runs meanwhile."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.cuda._sleep(SLEEP_CYCLES // 4)  # type: ignore[no-untyped-call]
        return x * 2


def test_large_batches_pipelined_come_back_exact(tmp_path: Path) -> None:
    """8 MB batches, copies overlapping a slow compute: every output is its own input x 2."""
    folder = tmp_path / "wide"
    folder.mkdir()
    (folder / "config.toml").write_text(
        '[[inputs]]\nname = "x"\ndatatype = "FP32"\nshape = [-1, 65536]\n\n'
        '[[outputs]]\nname = "y"\ndatatype = "FP32"\nshape = [-1, 65536]\n'
    )
    cuda = torch.device("cuda", 0)
    model = LoadedModel(
        ModelConfig.load(folder), "1", SlowDouble(), execution=Execution("cuda:0"), device=cuda
    )
    rng = np.random.default_rng(0)
    batches = [
        [Prepared([rng.random((1, 65536), np.float32)], rows=1) for _ in range(32)]
        for _ in range(6)
    ]
    for batch, (_, _, results) in zip(batches, run_batches(model, batches), strict=True):
        for request, result in zip(batch, results, strict=True):
            assert not isinstance(result, Exception)
            np.testing.assert_array_equal(result[0].to_numpy(), request.arrays[0] * 2)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_minilm_in_half_precision_on_the_gpu_embeds_like_fp32(
    precision: str, text_repository: ModelRepository
) -> None:
    """The fp32 export cast to fp16/bf16 runs on cuda; cosine to the CPU's fp32 > 0.99."""
    texts = [b"a cat sat on the mat", b"stock markets fell sharply today", b"hello"]
    request = InferenceRequest("t", "minilm", [Tensor.from_strings("text", texts)])
    options = LoadOptions(execution=Execution("cuda", precision, 1))
    half = ModelRepository.load(TEXT_MODELS, options=options).route("minilm", None, "").primary
    full = text_repository.route("minilm", None, "").primary
    a = full.predict(stack_inputs(full, [full.validate(request)]))["embedding"]
    b = half.predict(stack_inputs(half, [half.validate(request)]))["embedding"]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert b.dtype == np.float32
    assert cosine.min() > 0.99
