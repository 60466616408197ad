"""Recovering from a failed forward pass (worker.forward, worker.device): no broker, no GPU.

Out of memory: the failed attempt must be dead (its exception, frames and tensors) before
cached memory is released and the halves are retried.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np
import pytest
import torch

from tests.test_device import rows, sized_model
from worker.errors import ErrorCode, RequestError
from worker.forward import Run, run_batches, run_isolated
from worker.model import Prepared

# --- out of memory: the failed attempt is gone before the retry --------------------------


class Budget:
    """A fake device allocator holding ``capacity`` rows; what it lent is back when freed."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.live = 0
        """Workspaces not freed yet."""

    def take(self, rows: int) -> torch.Tensor:
        """A workspace of ``rows`` rows, or OutOfMemoryError when the rest cannot hold it."""
        if self.used + rows > self.capacity:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {rows} rows ({self.used} in use)"
            )
        workspace = torch.empty(rows, 2)
        self.used += rows
        self.live += 1
        weakref.finalize(workspace, self._free, rows)
        return workspace

    def _free(self, rows: int) -> None:
        self.used -= rows
        self.live -= 1


class TwoWorkspaces(torch.nn.Module):
    """Needs two workspaces of its batch's rows (fits 2 rows in 4); notes what lived before."""

    def __init__(self, budget: Budget) -> None:
        super().__init__()
        self.budget = budget
        self.alive_at_entry: list[int] = []
        """Per forward pass: workspaces of earlier passes still alive when it began."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.alive_at_entry.append(self.budget.live)
        first = self.budget.take(x.shape[0])
        second = self.budget.take(x.shape[0])  # over the budget: the first is in this frame
        return x * 2 + first.sum() * 0 + second.sum() * 0


def _through_run_isolated(model: object, batch: list[Prepared]) -> Run:
    return [(0.0, 0.0, run_isolated(model, batch))]  # type: ignore[arg-type]


@pytest.mark.parametrize("run", [run_batches, _through_run_isolated], ids=["pipelined", "alone"])
def test_a_retry_after_out_of_memory_finds_the_failed_attempt_freed(
    run: Callable[..., Run],
) -> None:
    """8 one-row requests, room for 2 rows: every retry starts with nothing of a failed pass."""
    budget = Budget(capacity=4)
    module = TwoWorkspaces(budget)
    model = sized_model(module)
    batch = [rows(1, float(i)) for i in range(8)]
    [(_, _, results)] = run(model, [batch] if run is run_batches else batch)
    assert module.alive_at_entry == [0] * len(module.alive_at_entry), (
        f"workspaces of failed passes alive when the next began: {module.alive_at_entry}"
    )
    for i, result in enumerate(results):
        assert not isinstance(result, Exception), f"request {i}: {result!r}"
        np.testing.assert_array_equal(result[0].to_numpy(), np.full((1, 2), 2.0 * i))
    assert budget.used == 0


def test_resource_exhausted_does_not_chain_the_out_of_memory_error() -> None:
    """A request too big alone: RESOURCE_EXHAUSTED with no cause, context or traceback kept."""
    budget = Budget(capacity=4)
    model = sized_model(TwoWorkspaces(budget))
    [small, big] = run_isolated(model, [rows(1, 1.0), rows(3, 2.0)])
    assert not isinstance(small, Exception)
    assert isinstance(big, RequestError)
    assert big.code is ErrorCode.RESOURCE_EXHAUSTED
    assert big.__cause__ is None
    assert big.__context__ is None
    assert budget.live == 0, "nothing of the failed passes is alive"
