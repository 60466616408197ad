"""Warm-up (worker.model, worker.instances, worker.lanes): where it runs and what it covers.

Warm-up exists for the GPU (kernel choice, allocator pools and cuBLAS handles per stream and
thread); on the CPU the same code runs when a test turns it on, so where it runs and which
shapes it covers are checked here without a GPU.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.test_device import rows, sized_model
from tests.test_lanes import make_lanes, put_sized
from worker.answers import Answer
from worker.device import forget_lost
from worker.errors import DeviceLostError
from worker.forward import run_batches
from worker.instances import Instances
from worker.metrics import Metrics
from worker.model import LoadedModel
from worker.repository import ModelRepository, ServedModel
from worker.settings import BatchingSettings


class Recording(torch.nn.Module):
    """Runs ``inner`` (default: doubling); notes each pass's thread, shape and whether all zero."""

    def __init__(self, inner: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.passes: list[tuple[int, tuple[int, ...], bool]] = []
        self._changed = threading.Condition()

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        with self._changed:
            self.passes.append((threading.get_ident(), tuple(x.shape), not bool(x.any())))
            self._changed.notify_all()
        return x * 2 if self.inner is None else self.inner(x, *rest)

    def wait_for_zero_passes(self, count: int, timeout: float = 30.0) -> None:
        """Until ``count`` all-zero passes ran: warm-up goes on while a warm thread serves."""
        with self._changed:
            self._changed.wait_for(lambda: sum(z for _, _, z in self.passes) >= count, timeout)


async def serve_through_lanes(model: LoadedModel, count: int) -> list[Answer]:
    """``count`` one-row requests (values 1, 2, ...: never all zero) through lanes; answers."""
    repository = ModelRepository(Path("unused"), {"sized": ServedModel(model.config, {"1": model})})
    delivered: list[Answer] = []
    with ThreadPoolExecutor(1) as shadow:
        async with asyncio.TaskGroup() as group:
            lanes = make_lanes(group, shadow, delivered, BatchingSettings(max_batch_size=4))
            lanes.open(repository)
            put_sized(lanes, repository, count)
            await lanes.drain()
    return delivered


async def test_each_instance_thread_warms_up_before_it_serves() -> None:
    """Two instances: each instance thread runs the warm-up passes itself, before any request."""
    module = Recording()
    model = sized_model(module, instances=2)
    model.warms_up = True  # on a GPU, load turns it on; here the test does
    answers = await serve_through_lanes(model, 8)
    assert len(answers) == 8
    assert all(a.response is not None and a.response.error is None for a in answers)
    module.wait_for_zero_passes(2 * 3)  # one thread may serve all 8 while the other still warms
    warm = [(ident, shape) for ident, shape, zero in module.passes if zero]
    threads = {ident for ident, _ in warm}
    assert len(threads) == 2, f"warm-up passes ran on {len(threads)} thread(s), not each instance"
    assert threading.get_ident() not in threads
    for thread in threads:  # the lane's batch sizes: 1, 2 and 4 rows, on each thread
        assert sorted(shape[0] for ident, shape in warm if ident == thread) == [1, 2, 4]
    for thread in threads:  # on each thread, its warm-up came before anything it served
        zeros = [zero for ident, _, zero in module.passes if ident == thread]
        assert zeros == sorted(zeros, reverse=True)
    assert {ident for ident, _, zero in module.passes if not zero} <= threads


async def test_no_warm_up_unless_it_is_on() -> None:
    """On the CPU (warms_up False) no dummy pass runs: serving starts at once."""
    module = Recording()
    await serve_through_lanes(sized_model(module, instances=2), 3)
    assert not any(zero for _, _, zero in module.passes)


def test_text_warm_up_covers_the_lengths_and_token_budget_serving_uses(
    text_repository: ModelRepository,
) -> None:
    """MiniLM: warm-up reaches the tokenizer's max_length, each batch at the token budget."""
    minilm = text_repository.route("minilm", None, "").primary
    assert minilm.text is not None
    assert minilm.config.tokenizer is not None
    longest = minilm.config.tokenizer.max_length  # 256
    module = Recording(minilm._module)
    model = LoadedModel(minilm.config, "1", module, minilm.text)
    model.warm_up(4)
    lengths = {shape[1] for _, shape, _ in module.passes}
    assert max(lengths) == longest, f"warm-up lengths {sorted(lengths)}: not serving's"
    assert {16, 32, 64, 128} <= lengths
    module.passes.clear()
    shapes = model.warm_up(64, max_batch_tokens=1024)
    seen = [shape for _, shape, _ in module.passes]
    assert [(rows, length) for rows, length in seen] == shapes
    assert all(rows * length <= 1024 for rows, length in seen)
    assert (1024 // longest, longest) in seen, "the longest length at the whole budget"
    assert (64, 8) in seen, "the most rows at a short length"


async def test_a_warm_up_that_breaks_the_device_stops_the_first_batch() -> None:
    """A sticky error while warming up marks the device lost: its first batch stops the worker."""
    device = torch.device("cpu", 120)

    def warm_up() -> None:
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    pool = Instances("m", "1", 2, device=device, threads=1, busy=Metrics().busy, warm_up=warm_up)
    model = sized_model(Recording(), device=str(device))
    try:
        with pytest.raises(DeviceLostError, match="cpu:120 failed earlier"):
            await pool.run(run_batches, model, [[rows(1, 1.0)]])
    finally:
        pool.close()
        forget_lost()
