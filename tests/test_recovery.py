"""Recovering from a failed forward pass (worker.forward, worker.device): no broker, no GPU.

Out of memory: the failed attempt must be dead (its exception, frames and tensors) before
cached memory is released and the halves are retried. A device that cannot recover (CUDA's
sticky errors: a device-side assert, an illegal memory access) must stop the worker instead
of being retried row by row on a broken context.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_device import rows, sized_model
from tests.test_supervision import FakeIntake, supervisor
from worker.device import forget_lost
from worker.domain import DATATYPES, InferenceRequest, Tensor
from worker.errors import ConfigError, DeviceLostError, ErrorCode, RequestError
from worker.forward import Run, run_batches, run_isolated
from worker.model import LoadedModel, Prepared
from worker.model_config import ModelConfig

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
        workspace = torch.zeros(rows, 2)
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


# --- a device that cannot recover: no retries, the worker stops --------------------------

STICKY = [
    "CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported",
    "CUDA error: an illegal memory access was encountered",
    "CUDA error: unspecified launch failure",
    "CUDA error: misaligned address",
]


class Asserting(torch.nn.Module):
    """Doubles its input; a row of -1 makes it fail as a device-side assert does (sticky)."""

    def __init__(self, message: str = STICKY[0], kind: type[Exception] = torch.AcceleratorError):
        super().__init__()
        self.message = message
        self.kind = kind
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(int(x.shape[0]))
        if (x == -1).any():
            raise self.kind(self.message)
        return x * 2


_devices = iter(range(1, 100))  # torch keeps a device index in 8 bits


@pytest.fixture(autouse=True)
def _forget_lost_devices() -> Iterator[None]:
    """Devices lost by a test are forgotten after it (the process serves other tests)."""
    yield
    forget_lost()


def fresh_device() -> str:
    """A CPU device name no other test used: a device lost here is lost for this test only."""
    return f"cpu:{next(_devices)}"


@pytest.mark.parametrize("message", STICKY)
def test_a_sticky_device_error_stops_the_run_without_retrying_row_by_row(message: str) -> None:
    """A batch hits a sticky error: DeviceLostError (exit 4) at once, no halving on the device."""
    module = Asserting(message)
    model = sized_model(module, device=fresh_device())
    batch = [rows(1, float(i)) for i in range(7)] + [rows(1, -1.0)]
    with pytest.raises(DeviceLostError) as caught:
        run_batches(model, [batch, [rows(1, 3.0)]])
    assert module.seen == [8], "the broken device ran nothing after the failure"
    assert caught.value.exit_code == 4
    assert caught.value.hard_exit
    assert message.splitlines()[0] in str(caught.value)
    with pytest.raises(DeviceLostError):
        run_isolated(model, [rows(1, 1.0)])


def test_a_sticky_error_raised_as_a_plain_runtime_error_is_recognised_too() -> None:
    """Older torch raises CUDA errors as RuntimeError: recognised by the message all the same."""
    model = sized_model(Asserting(STICKY[1], RuntimeError), device=fresh_device())
    with pytest.raises(DeviceLostError):
        run_isolated(model, [rows(1, 1.0), rows(1, -1.0)])


def test_once_a_device_is_lost_no_version_runs_on_it() -> None:
    """Another version on the same device refuses at once: its program is never called."""
    device = fresh_device()
    with pytest.raises(DeviceLostError):
        run_batches(sized_model(Asserting(), device=device), [[rows(1, -1.0)]])
    other = Asserting()
    with pytest.raises(DeviceLostError, match=f"{device} failed"):
        run_batches(sized_model(other, device=device), [[rows(2, 1.0)]])
    assert other.seen == []
    healthy = Asserting()
    [(_, _, [result])] = run_batches(sized_model(healthy, device=fresh_device()), [[rows(1, 1.0)]])
    assert not isinstance(result, Exception), "other devices are not affected"


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (1x3 and 2x2)"),
        IndexError("index out of range in self"),
        ValueError("poisoned row"),
    ],
)
def test_an_ordinary_error_is_still_isolated_to_its_request(error: Exception) -> None:
    """Not a device failure: the bad request gets its error, its batch-mates their outputs."""
    module = Asserting(str(error), type(error))
    model = sized_model(module, device=fresh_device())
    results = run_isolated(model, [rows(1, 1.0), rows(1, -1.0), rows(1, 2.0)])
    assert isinstance(results[1], type(error))
    assert not isinstance(results[0], Exception)
    assert not isinstance(results[2], Exception)


# --- token ids checked on the host, where the model declares its vocabulary ---------------

IDS_MODEL = """
[[inputs]]
name = "ids"
datatype = "{datatype}"
shape = [-1, -1]
{extra}

[[outputs]]
name = "y"
datatype = "FP32"
shape = [-1, -1]
"""


def ids_config(tmp_path: Path, extra: str = "vocab_size = 100", datatype: str = "INT64") -> Path:
    """A sequence model without a tokenizer taking token ids (``extra``: more input keys)."""
    folder = tmp_path / "ids"
    folder.mkdir(exist_ok=True)
    (folder / "config.toml").write_text(IDS_MODEL.format(datatype=datatype, extra=extra))
    return folder


def ids_request(ids: list[list[int]], datatype: str = "INT64") -> InferenceRequest:
    """A request of token ids."""
    array = np.array(ids, dtype=DATATYPES[datatype])
    return InferenceRequest("r", "ids", [Tensor.from_numpy("ids", array)])


@pytest.mark.parametrize(("datatype", "bad"), [("INT64", 100), ("INT64", -1), ("INT32", 250)])
def test_ids_outside_the_declared_vocabulary_are_invalid_argument(
    tmp_path: Path, datatype: str, bad: int
) -> None:
    """vocab_size = 100: an id outside [0, 100) is refused at admission, naming where it is."""
    config = ModelConfig.load(ids_config(tmp_path, datatype=datatype))
    assert config.inputs[0].vocab_size == 100
    model = LoadedModel(config, "1", torch.nn.Identity())
    assert model.validate(ids_request([[0, 5, 99]], datatype)).length == 3
    with pytest.raises(RequestError) as caught:
        model.validate(ids_request([[1, 2, 3], [4, bad, 6]], datatype))
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert f"input 'ids' holds 1 id(s) outside [0, 100), the first {bad} at index [1, 1]" in (
        caught.value.message
    )


@pytest.mark.parametrize(
    ("extra", "datatype", "says"),
    [
        ("vocab_size = 0", "INT64", "vocab_size = 0; expected a whole number from 1 to"),
        ("vocab_size = 1.5", "INT64", "vocab_size = 1.5; expected a whole number"),
        ("vocab_size = true", "INT64", "vocab_size = True; expected a whole number"),
        ("vocab_size = 10", "FP32", "vocab_size is for integer inputs (token ids), not FP32"),
    ],
)
def test_a_bad_vocab_size_is_a_config_error(
    tmp_path: Path, extra: str, datatype: str, says: str
) -> None:
    """vocab_size must be a positive whole number on an integer input."""
    with pytest.raises(ConfigError, match=r"config\.toml") as caught:
        ModelConfig.load(ids_config(tmp_path, extra, datatype))
    assert says in str(caught.value)


def test_the_worker_is_unhealthy_once_a_device_is_lost() -> None:
    """/healthz turns false, naming the device and its error, once a device failed for good."""
    watching, _ = supervisor(FakeIntake(), timeout=60)
    assert watching.healthy() == (True, "ok")
    device = fresh_device()
    with pytest.raises(DeviceLostError):
        run_isolated(sized_model(Asserting(STICKY[1]), device=device), [rows(1, -1.0)])
    ok, detail = watching.healthy()
    assert not ok
    assert detail.startswith(f"device failed: {device} (AcceleratorError: CUDA error: an illegal")
