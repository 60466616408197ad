"""Device, precision and instances of a model (worker.device, worker.model): no broker."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tests.conftest import MODELS, TEXT_MODELS
from worker.answers import model_response
from worker.device import is_out_of_memory, resolve_device
from worker.domain import InferenceRequest, Tensor, Timing
from worker.errors import ConfigError, ErrorCode, RequestError
from worker.forward import run_batches, run_isolated, stack_inputs
from worker.model import LoadedModel, Prepared
from worker.model_config import DEVICE_PATTERN, Execution, ModelConfig, check_device
from worker.repository import LoadOptions, ModelRepository
from worker.settings import ModelSettings

HERE = "cuda" if torch.cuda.is_available() else "cpu"
"""What ``auto`` means on the machine running the tests."""


def execution_of(repo: Path, model: str = "digits", **defaults: Any) -> Execution:
    """The execution a model's config.toml resolves to under some settings' defaults."""
    return ModelConfig.load(repo / model).execution(Execution(**defaults))


# --- config.toml and settings -------------------------------------------------------------


def test_config_keys_override_the_settings_defaults(repo_dir: Path) -> None:
    """device, precision and instances in config.toml win; what it leaves out is the default."""
    assert execution_of(repo_dir, device="cpu", precision="fp16", instances=3) == Execution(
        "cpu", "fp16", 3
    )
    config = repo_dir / "digits" / "config.toml"  # top-level keys go before the tables
    config.write_text('device = "cuda:1"\nprecision = "bf16"\ninstances = 2\n' + config.read_text())
    assert execution_of(repo_dir, device="cpu", precision="fp32", instances=1) == Execution(
        "cuda:1", "bf16", 2
    )


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('device = "gpu"', "device 'gpu': expected auto, cpu, cuda or cuda:N"),
        ('device = "cuda:100"', "expected auto, cpu, cuda or cuda:N"),
        ('device = "cuda:01"', "expected auto, cpu, cuda or cuda:N"),
        ("device = 0", "device 0: expected"),
        ('precision = "fp8"', "precision = 'fp8'; expected one of fp32, fp16, bf16"),
        ("instances = 0", "instances = 0; expected a whole number from 1 to 64"),
        ("instances = 65", "instances = 65; expected a whole number from 1 to 64"),
        ("instances = true", "instances = True; expected a whole number"),
        ("instances = 1.5", "instances = 1.5; expected a whole number"),
    ],
)
def test_bad_execution_keys_are_config_errors(repo_dir: Path, line: str, says: str) -> None:
    """Each bad value is refused at load, naming the file and what is accepted."""
    config = repo_dir / "digits" / "config.toml"
    config.write_text(line + "\n" + config.read_text())
    with pytest.raises(ConfigError, match=r"config\.toml") as caught:
        ModelConfig.load(repo_dir / "digits")
    assert says in str(caught.value)


@given(st.text(max_size=12))
def test_device_names_are_exactly_the_pattern(text: str) -> None:
    """Any string: accepted if and only if it is auto, cpu, cuda or cuda:N (N < 100)."""
    valid = text in {"auto", "cpu", "cuda"} or (
        text.startswith("cuda:")
        and text[5:].isascii()
        and text[5:].isdigit()
        and str(int(text[5:])) == text[5:]
        and int(text[5:]) < 100
    )
    if valid:
        assert check_device(text) == text
    else:
        with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
            check_device(text)
    assert (DEVICE_PATTERN.fullmatch(text) is not None) == valid


def test_settings_defaults_and_their_bounds() -> None:
    """WORKER_MODELS__DEVICE/PRECISION/INSTANCES: defaults auto/fp32/1; bad values refused."""
    assert ModelSettings().execution == Execution("auto", "fp32", 1)
    assert ModelSettings(device="cuda:3", precision="bf16", instances=64).execution == Execution(
        "cuda:3", "bf16", 64
    )
    for bad in ({"device": "tpu"}, {"precision": "int4"}, {"instances": 0}, {"instances": 65}):
        with pytest.raises(ValidationError):
            ModelSettings(**bad)


# --- resolving the device -----------------------------------------------------------------


def test_auto_falls_back_to_the_cpu_and_takes_cuda_when_present() -> None:
    """auto: cuda:0 when torch sees a GPU, the CPU otherwise; cpu is always the CPU."""

    def no_gpu() -> bool:
        return False

    def gpu() -> bool:
        return True

    assert resolve_device("auto", available=no_gpu) == torch.device("cpu")
    assert resolve_device("auto", available=gpu, count=lambda: 1) == torch.device("cuda", 0)
    assert resolve_device("cpu", available=gpu) == torch.device("cpu")
    assert resolve_device("cuda:1", available=gpu, count=lambda: 2) == torch.device("cuda", 1)
    assert resolve_device("cuda", available=gpu, count=lambda: 1) == torch.device("cuda", 0)


def test_asking_for_cuda_without_one_is_a_clear_start_up_error() -> None:
    """Cuda where none is present, or an index beyond the devices: ConfigError saying so."""
    with pytest.raises(ConfigError, match='device = "cuda" but no CUDA device is present'):
        resolve_device("cuda", available=lambda: False)
    with pytest.raises(ConfigError, match=r"has 2 CUDA device\(s\) \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2", available=lambda: True, count=lambda: 2)


def test_a_model_asking_for_a_missing_gpu_fails_to_load(repo_dir: Path) -> None:
    """The repository refuses to load a model on cuda:99, naming its config file."""
    config = repo_dir / "iris" / "config.toml"
    config.write_text('device = "cuda:99"\n' + config.read_text())
    with pytest.raises(ConfigError, match=r"iris/config.toml: device = \"cuda:99\" but"):
        ModelRepository.load(repo_dir)


def test_auto_loads_every_model_where_this_machine_can_run_it() -> None:
    """With the defaults (auto), the models run on CUDA if present, else on the CPU."""
    repository = ModelRepository.load(MODELS)
    assert {m.device.type for m in repository.all()} == {HERE}


def test_int8_quantisation_only_combines_with_fp32_on_the_cpu(repo_dir: Path) -> None:
    """Quantize = "int8" with bf16 is refused at load (int8 runs in fp32 on the CPU)."""
    config = repo_dir / "digits" / "config.toml"
    config.write_text('quantize = "int8"\nprecision = "bf16"\n' + config.read_text())
    with pytest.raises(ConfigError, match=r'quantize = "int8" runs on the CPU in fp32'):
        ModelRepository.load(repo_dir)


def test_out_of_memory_is_recognised() -> None:
    """Torch's OutOfMemoryError and allocator messages count as out of memory; others do not."""
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: 1 TB"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


# --- reduced precision on the CPU ---------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_serves_the_declared_datatypes_with_close_results(
    precision: str, testset: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]
) -> None:
    """bf16/fp16: the weights are cast, outputs stay FP32/INT64, predictions close to fp32."""
    pixels, labels = testset
    full = ModelRepository.load(MODELS).route("digits", "2", "").primary
    half = (
        ModelRepository.load(MODELS, options=LoadOptions(execution=Execution("auto", precision, 1)))
        .route("digits", "2", "")
        .primary
    )
    assert half.execution.precision == precision
    assert {p.dtype for p in half._module.parameters()} == {
        torch.bfloat16 if precision == "bf16" else torch.float16
    }
    want, got = full.predict({"pixels": pixels}), half.predict({"pixels": pixels})
    assert got["probabilities"].dtype == np.float32
    assert got["label"].dtype == np.int64
    assert not np.array_equal(got["probabilities"], want["probabilities"]), "really reduced"
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=0.05)
    assert (got["label"] == want["label"]).mean() >= 0.97
    assert (got["label"] == labels).mean() >= 0.95


def test_minilm_in_bf16_embeds_like_fp32(text_repository: ModelRepository) -> None:
    """The MiniLM export runs in bf16 on the CPU; its embeddings match fp32's closely."""
    texts = [b"a cat sat on the mat", b"stock markets fell sharply today", b"hello"]
    half = (
        ModelRepository.load(
            TEXT_MODELS, options=LoadOptions(execution=Execution("cpu", "bf16", 1))
        )
        .route("minilm", None, "")
        .primary
    )
    full = text_repository.route("minilm", None, "").primary
    request = InferenceRequest("t", "minilm", [Tensor.from_strings("text", texts)])

    def embed(model: LoadedModel) -> npt.NDArray[np.float32]:
        batch = stack_inputs(model, [model.validate(request)])
        return model.predict(batch)["embedding"]

    a, b = embed(full), embed(half)
    assert b.dtype == np.float32
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99
    assert not np.array_equal(a, b)


# --- warm-up, out-of-memory splitting, the pipeline ----------------------------------------


class Sized(torch.nn.Module):
    """Doubles its input; runs out of memory above ``limit`` rows; logs the sizes it saw."""

    def __init__(self, limit: int = 10**9, poison: float | None = None) -> None:
        super().__init__()
        self.limit = limit
        self.poison = poison
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(int(x.shape[0]))
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} MiB")
        if self.poison is not None and (x == self.poison).any():
            raise ValueError("poisoned row")
        return x * 2


def sized_model(module: torch.nn.Module, **execution: Any) -> LoadedModel:
    """A loaded version of a program taking one FP32 input x [-1, 2], giving output y."""
    config = ModelConfig.load(_sized_folder())
    chosen = Execution(**{"device": "cpu", **execution})
    return LoadedModel(config, "1", module, execution=chosen, device=torch.device(chosen.device))


def _sized_folder(root: list[Path] = []) -> Path:  # noqa: B006 - a cache, written once
    if not root:
        import tempfile  # noqa: PLC0415

        folder = Path(tempfile.mkdtemp()) / "sized"
        folder.mkdir()
        (folder / "config.toml").write_text(
            '[[inputs]]\nname = "x"\ndatatype = "FP32"\nshape = [-1, 2]\n\n'
            '[[outputs]]\nname = "y"\ndatatype = "FP32"\nshape = [-1, 2]\n'
        )
        root.append(folder)
    return root[0]


def rows(n: int, value: float) -> Prepared:
    """A request of ``n`` rows, every element ``value``."""
    return Prepared([np.full((n, 2), value, np.float32)], rows=n)


def test_warm_up_runs_every_power_of_two_up_to_the_largest_batch() -> None:
    """warm_up(n): batches of 1, 2, 4 ... and n itself, so no first request pays for them."""
    module = Sized()
    model = sized_model(module)
    assert model.warm_up(8) == [(1, 1), (2, 1), (4, 1), (8, 1)]
    assert module.seen == [1, 2, 4, 8]
    assert model.warm_up(5) == [(1, 1), (2, 1), (4, 1), (5, 1)]
    assert model.warm_up(1) == [(1, 1)]


def test_an_out_of_memory_batch_is_split_until_it_fits() -> None:
    """8 requests, memory for 2 rows: halves run until they fit; every answer is right."""
    module = Sized(limit=2)
    model = sized_model(module)
    batch = [rows(1, float(i)) for i in range(8)]
    [(_, _, results)] = run_batches(model, [batch])
    for i, result in enumerate(results):
        assert not isinstance(result, Exception)
        np.testing.assert_array_equal(result[0].to_numpy(), np.full((1, 2), 2.0 * i))
    assert module.seen == [8, 4, 2, 2, 4, 2, 2]


def test_a_request_that_alone_does_not_fit_is_resource_exhausted() -> None:
    """A lone 3-row request over a 2-row memory gets RESOURCE_EXHAUSTED; its batch-mates run."""
    model = sized_model(Sized(limit=2))
    results = run_isolated(model, [rows(1, 1.0), rows(3, 5.0), rows(1, 2.0)])
    big = results[1]
    assert isinstance(big, RequestError)
    assert big.code is ErrorCode.RESOURCE_EXHAUSTED
    assert "ran out of memory on cpu with this request alone (3 row(s))" in big.message
    assert big.__cause__ is None, "the out-of-memory error (and its frames) is not kept"
    assert not isinstance(results[0], Exception)
    assert not isinstance(results[2], Exception)
    reply = model_response(InferenceRequest("big", "sized", []), "sized", "1", big, Timing(0, 0, 3))
    assert reply.error is not None
    assert reply.error.code == "RESOURCE_EXHAUSTED"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=9), min_size=1, max_size=4),
    st.integers(1, 12),
    st.sets(st.integers(0, 40), max_size=3),
)
def test_every_request_of_a_run_gets_its_own_answer(
    sizes: list[list[int]], limit: int, poisoned: set[int]
) -> None:
    """Any run, memory bound and bad rows: outputs, RESOURCE_EXHAUSTED or its own error."""
    module = Sized(limit=limit, poison=-1.0)
    model = sized_model(module)
    number = iter(range(1000))
    batches = []
    for batch_sizes in sizes:
        batch = []
        for n in batch_sizes:
            i = next(number)
            batch.append(rows(n, -1.0 if i in poisoned else float(i)))
        batches.append(batch)
    run = run_batches(model, batches)
    assert len(run) == len(batches)
    for batch, (offset, compute, results) in zip(batches, run, strict=True):
        assert offset >= 0
        assert compute >= 0
        assert len(results) == len(batch)
        for request, result in zip(batch, results, strict=True):
            value = float(request.arrays[0][0, 0])
            if request.rows > limit:
                assert isinstance(result, RequestError)
                assert result.code is ErrorCode.RESOURCE_EXHAUSTED
            elif value == -1.0:
                assert isinstance(result, ValueError)
            else:
                assert not isinstance(result, Exception)
                np.testing.assert_array_equal(result[0].to_numpy(), request.arrays[0] * 2)


def test_a_batch_that_cannot_be_staged_does_not_stop_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Assembling one batch raises: its requests get the error, the next batch still runs."""
    model = sized_model(Sized())
    real = LoadedModel.upload

    def upload(self: LoadedModel, inputs: Mapping[str, npt.NDArray[Any]]) -> Any:
        if (inputs["x"] == 7).any():
            raise MemoryError("host memory exhausted while assembling")
        return real(self, inputs)

    monkeypatch.setattr(LoadedModel, "upload", upload)
    run = run_batches(model, [[rows(1, 1.0)], [rows(1, 7.0), rows(1, 3.0)], [rows(2, 4.0)]])
    first, second, third = (results for _, _, results in run)
    assert not isinstance(first[0], Exception)
    assert isinstance(second[0], MemoryError)
    assert not isinstance(second[1], Exception), "its batch-mate is answered"
    assert not isinstance(third[0], Exception)
    np.testing.assert_array_equal(third[0][0].to_numpy(), np.full((2, 2), 8.0))


def test_assembly_into_given_memory_matches_plain_assembly(
    text_repository: ModelRepository,
) -> None:
    """stack_inputs into other memory (pinned, on a GPU): same batch, padding written too."""
    made: list[tuple[int, ...]] = []

    def empty(shape: tuple[int, ...], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
        made.append(shape)
        return np.full(shape, 99, dtype)  # garbage: every element must be written

    digits = ModelRepository.load(MODELS).route("digits", "1", "").primary
    single = [Prepared([np.ones((2, 64), np.float32)], rows=2)]
    into = stack_inputs(digits, single, empty=empty)
    np.testing.assert_array_equal(into["pixels"], stack_inputs(digits, single)["pixels"])
    assert made == [(2, 64)], "a lone request is copied into the given memory too"

    minilm = text_repository.route("minilm", None, "").primary
    texts = [[b"short"], [b"a much longer sentence than the first one", b"two"]]
    prepared = [
        minilm.validate(InferenceRequest(str(i), "minilm", [Tensor.from_strings("text", t)]))
        for i, t in enumerate(texts)
    ]
    plain, into = stack_inputs(minilm, prepared), stack_inputs(minilm, prepared, empty=empty)
    assert set(into) == set(plain) == {"input_ids", "attention_mask"}
    for name in plain:
        np.testing.assert_array_equal(into[name], plain[name])
    assert (plain["attention_mask"] == 0).any(), "the batch really was padded"


def test_a_copy_of_the_repository_can_move_its_models(tmp_path: Path) -> None:
    """Per-model device = "cpu" with the default auto: that model is on the CPU."""
    shutil.copytree(MODELS, tmp_path / "m", ignore=shutil.ignore_patterns("*.py"))
    config = tmp_path / "m" / "iris" / "config.toml"
    config.write_text('device = "cpu"\ninstances = 3\n' + config.read_text())
    repository = ModelRepository.load(tmp_path / "m")
    iris = repository.route("iris", None, "").primary
    assert iris.device == torch.device("cpu")
    assert iris.execution == Execution("cpu", "fp32", 3)
