"""The pipelined run of batches (worker.forward.run_batches): what overlaps what, on the CPU.

On a GPU, batch i+1 must be launched before the host waits for batch i's outputs, so the
device has work queued while the host cuts outputs and stages the next batch; the order of
the calls shows it on the CPU too. A batch's compute time is its own: not the next batch's
staging, not the previous batch's outputs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from tests.test_device import rows, sized_model
from worker import forward
from worker.domain import Tensor
from worker.model import LoadedModel, Prepared


class Noting(torch.nn.Module):
    """Doubles its input; notes each pass (a batch is named by its first value)."""

    def __init__(self, events: list[tuple[str, int]]) -> None:
        super().__init__()
        self.events = events

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.events.append(("launch", int(x[0, 0])))
        return x * 2


def test_the_next_batch_is_launched_before_the_host_waits_for_the_one_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """4 batches: each batch i+1 is launched before batch i's outputs are cut on the host."""
    events: list[tuple[str, int]] = []
    real = forward.split_outputs

    def split(model: Any, outputs: Mapping[str, Any], batch: Sequence[Prepared]) -> Any:
        events.append(("outputs", int(batch[0].arrays[0][0, 0])))
        return real(model, outputs, batch)

    monkeypatch.setattr(forward, "split_outputs", split)
    model = sized_model(Noting(events))
    batches = [[rows(1, float(10 * b + i)) for i in range(3)] for b in range(4)]
    run = forward.run_batches(model, batches)
    for batch, (_, _, results) in zip(batches, run, strict=True):
        for request, result in zip(batch, results, strict=True):
            assert not isinstance(result, Exception)
            np.testing.assert_array_equal(result[0].to_numpy(), request.arrays[0] * 2)
    order = {event: i for i, event in enumerate(events)}
    for b in range(1, 4):
        assert order["launch", 10 * b] < order["outputs", 10 * (b - 1)], events


def test_compute_time_leaves_out_the_next_batch_staging(monkeypatch: pytest.MonkeyPatch) -> None:
    """Staging batch 2 takes 0.3 s while batch 1 runs: batch 1's compute time does not hold it."""
    real = LoadedModel.upload

    def slow_upload(self: LoadedModel, inputs: Mapping[str, npt.NDArray[Any]]) -> Any:
        if (inputs["x"] == 7).any():
            time.sleep(0.3)
        return real(self, inputs)

    monkeypatch.setattr(LoadedModel, "upload", slow_upload)
    model = sized_model(Noting([]))
    run = forward.run_batches(model, [[rows(1, 1.0)], [rows(1, 7.0)], [rows(1, 3.0)]])
    (_, first, _), (offset, _, results), _ = run
    assert first < 0.15, f"batch 1's compute time {first:.3f}s holds batch 2's staging"
    assert offset >= 0.3, "batch 2 began once staged"
    assert isinstance(results[0], list)
    assert isinstance(results[0][0], Tensor)
