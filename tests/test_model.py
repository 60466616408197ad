"""Unit tests of the model repository, the digits model and request validation (no Kafka)."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from worker import stacking
from worker.domain import InferenceRequest, Tensor
from worker.errors import ConfigError, ErrorCode, RequestError
from worker.forward import run_isolated, split_outputs, stack_inputs
from worker.model import LoadedModel, Prepared
from worker.model_config import ModelConfig
from worker.repository import ModelRepository
from worker.validation import validate_request

from .conftest import MODELS


def request(*tensors: Tensor, model: str = "digits") -> InferenceRequest:
    return InferenceRequest(id="t", model_name=model, inputs=list(tensors))


def test_digits_accuracy_on_held_out_split(
    repository: ModelRepository,
    testset: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]],
) -> None:
    """The committed digits model reaches >= 0.95 on the held-out split, as metrics.json says."""
    pixels, labels = testset
    model = repository.route("digits", None, "").primary
    out = model.predict({"pixels": pixels})
    accuracy = float((out["label"] == labels).mean())
    recorded = json.loads((MODELS / "digits" / model.version / "metrics.json").read_text())
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(recorded["test_accuracy"], abs=1e-4)
    assert out["probabilities"].shape == (len(labels), 10)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-5)


def test_model_file_is_a_torch_export_program() -> None:
    """Artifacts load as torch.export programs (not pickled modules), with their inputs."""
    artifacts = sorted(MODELS.glob("*/*/model.pt2"))
    assert artifacts
    for artifact in artifacts:
        program = torch.export.load(artifact)
        assert isinstance(program, torch.export.ExportedProgram), artifact
        assert program.graph_signature.user_inputs, artifact


def test_resolve_unknown_model_and_version_is_not_found(repository: ModelRepository) -> None:
    """An unknown model or version raises NOT_FOUND naming what is available."""
    with pytest.raises(RequestError, match="serves: digits") as info:
        repository.route("nope", None, "")
    assert info.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(RequestError, match="no version '99'") as info:
        repository.route("digits", "99", "")
    assert info.value.code is ErrorCode.NOT_FOUND


@pytest.mark.parametrize(
    ("tensors", "fragment"),
    [
        ((), "missing input pixels FP32"),
        ((Tensor.from_numpy("pixels", np.zeros((1, 64), np.float64)),), "datatype FP64"),
        ((Tensor.from_numpy("pixels", np.zeros((1, 63), np.float32)),), "shape [1, 63]"),
        ((Tensor.from_numpy("pixels", np.zeros((64,), np.float32)),), "shape [64]"),
        ((Tensor.from_numpy("pixels", np.zeros((0, 64), np.float32)),), "at least 1"),
        (
            (
                Tensor.from_numpy("pixels", np.zeros((1, 64), np.float32)),
                Tensor.from_numpy("extra", np.zeros((1,), np.float32)),
            ),
            "unknown input 'extra'",
        ),
        ((Tensor("pixels", "FP32", (1, 64), b"\x00" * 12),), "needs 256 bytes"),
    ],
)
def test_invalid_requests_say_what_was_expected(
    repository: ModelRepository, tensors: tuple[Tensor, ...], fragment: str
) -> None:
    """Wrong names, dtypes, shapes and byte lengths raise INVALID_ARGUMENT with the expectation."""
    model = repository.route("digits", None, "").primary
    with pytest.raises(RequestError) as info:
        model.validate(request(*tensors))
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert fragment in info.value.message


def test_stack_and_split_keep_each_requests_rows(repository: ModelRepository) -> None:
    """Batched outputs are cut back so each request gets exactly its own rows' results."""
    model = repository.route("digits", None, "").primary
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 17, (n, 64)).astype(np.float32) for n in (1, 3, 2)]
    arrays = [model.validate(request(Tensor.from_numpy("pixels", p))) for p in parts]
    outputs = model.predict(stack_inputs(model, arrays))
    per_request = split_outputs(model, outputs, arrays)
    for part, tensors in zip(parts, per_request, strict=True):
        alone = model.predict({"pixels": part})
        by_name = {t.name: t.to_numpy() for t in tensors}
        np.testing.assert_array_equal(by_name["label"], alone["label"])
        np.testing.assert_allclose(by_name["probabilities"], alone["probabilities"], rtol=1e-5)


def test_malformed_model_folder_names_the_file(tmp_path: Path) -> None:
    """A bad config.toml or a missing artifact is a ConfigError naming the file."""
    shutil.copytree(MODELS / "digits", tmp_path / "digits")
    config = tmp_path / "digits" / "config.toml"
    config.write_text(config.read_text().replace('datatype = "FP32"', 'datatype = "FLOAT"', 1))
    with pytest.raises(ConfigError, match=r"config\.toml.*'FLOAT'"):
        ModelRepository.load(tmp_path)
    shutil.copy(MODELS / "digits" / "config.toml", config)
    (tmp_path / "digits" / "1" / "model.pt2").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match=r"1/model\.pt2"):
        ModelRepository.load(tmp_path)


def test_empty_repository_is_a_config_error(tmp_path: Path) -> None:
    """A repository without any model is refused at start-up."""
    with pytest.raises(ConfigError, match="holds no model"):
        ModelRepository.load(tmp_path)


def test_non_finite_inputs_are_refused_unless_allowed(
    repository: ModelRepository, tmp_path: Path
) -> None:
    """NaN/inf inputs get INVALID_ARGUMENT naming the index; allow_non_finite lets them through."""
    model = repository.route("digits", None, "").primary
    pixels = np.zeros((2, 64), np.float32)
    pixels[1, 3] = np.nan
    with pytest.raises(
        RequestError, match=r"1 NaN or infinite value\(s\), the first at index \[1, 3\]"
    ):
        model.validate(request(Tensor.from_numpy("pixels", pixels)))
    shutil.copytree(MODELS / "digits", tmp_path / "digits")
    config = tmp_path / "digits" / "config.toml"
    config.write_text(
        config.read_text().replace("shape = [-1, 64]", "shape = [-1, 64]\nallow_non_finite = true")
    )
    lenient = ModelRepository.load(tmp_path).route("digits", None, "").primary
    assert len(lenient.validate(request(Tensor.from_numpy("pixels", pixels))).arrays) == 1


@settings(max_examples=200, deadline=None)
@given(
    pixels=arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.just(64)),
        elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
    )
)
@example(pixels=np.full((1, 64), 3e38, np.float32))  # finite, but their sum overflows
@example(pixels=np.array([[np.inf, -np.inf] * 32], np.float32))  # a sum of NaN
def test_finite_check_accepts_exactly_the_finite_inputs(
    repository: ModelRepository, pixels: npt.NDArray[np.float32]
) -> None:
    """An input is accepted if and only if numpy finds every value finite (large values too)."""
    model = repository.route("digits", None, "").primary
    if np.isfinite(pixels).all():
        assert model.validate(request(Tensor.from_numpy("pixels", pixels))).rows == len(pixels)
    else:
        with pytest.raises(RequestError, match="NaN or infinite"):
            model.validate(request(Tensor.from_numpy("pixels", pixels)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("index", [(0, 0), (0, 63), (1, 17), (2, 0), (2, 63)])
def test_a_lone_non_finite_value_is_found_at_any_index(
    repository: ModelRepository, bad: float, index: tuple[int, int]
) -> None:
    """One NaN or infinity anywhere in a finite input is refused, its count and index named."""
    model = repository.route("digits", None, "").primary
    pixels = np.full((3, 64), 16.0, np.float32)
    pixels[index] = bad
    with pytest.raises(
        RequestError,
        match=rf"holds 1 NaN or infinite value\(s\), the first at index \[{index[0]}, {index[1]}\]",
    ):
        model.validate(request(Tensor.from_numpy("pixels", pixels)))


def test_run_isolated_answers_good_requests_when_some_raise(repository: ModelRepository) -> None:
    """Bisection gives every good request its own result and every bad one its exception."""
    model = repository.route("digits", None, "").primary
    calls: list[int] = []
    original = model.predict

    class Poisoned(LoadedModel):
        def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
            calls.append(len(inputs["pixels"]))
            if (inputs["pixels"] < 0).any():
                raise ValueError("negative pixel")
            return original(inputs)

    poisoned = Poisoned(model.config, model.version, model._module)
    rng = np.random.default_rng(3)
    parts = [rng.integers(0, 17, (1, 64)).astype(np.float32) for _ in range(16)]
    parts[5][0, 0] = -1
    parts[12][0, 0] = -1
    results = run_isolated(poisoned, [Prepared([p], rows=1) for p in parts])
    for i, (part, result) in enumerate(zip(parts, results, strict=True)):
        if i in (5, 12):
            assert isinstance(result, ValueError)
        else:
            assert not isinstance(result, Exception)
            by_name = {t.name: t.to_numpy() for t in result}
            np.testing.assert_array_equal(by_name["label"], original({"pixels": part})["label"])
    assert calls[0] == 16
    # Bisection: at most two passes per level per bad request, log2(16) = 4 levels below the top.
    assert len(calls) <= 1 + 2 * 2 * 4


def quantized_copy(tmp_path: Path, value: str) -> Path:
    """A copy of the model repository whose digits config sets ``quantize = value``."""
    repo = tmp_path / "models"
    shutil.copytree(MODELS, repo)
    config = repo / "digits" / "config.toml"
    config.write_text(f'quantize = "{value}"\n' + config.read_text())
    return repo


def test_int8_quantisation_keeps_the_digits_accuracy(
    tmp_path: Path,
    repository: ModelRepository,
    testset: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]],
) -> None:
    """Int8 quantisation serves a different program whose accuracy stays within 1 point."""
    pixels, labels = testset
    quantized = ModelRepository.load(quantized_copy(tmp_path, "int8"))
    for version in ("1", "2"):
        plain = repository.route("digits", version, "").primary
        int8 = quantized.route("digits", version, "").primary
        assert int8.config.quantize == "int8"
        assert not int8.same_program(plain)
        expected = plain.predict({"pixels": pixels})
        got = int8.predict({"pixels": pixels})
        assert (
            float((got["label"] == labels).mean())
            >= float((expected["label"] == labels).mean()) - 0.01
        )
        assert float((got["label"] == expected["label"]).mean()) >= 0.98
        assert not np.array_equal(got["probabilities"], expected["probabilities"])
        np.testing.assert_allclose(got["probabilities"], expected["probabilities"], atol=0.1)


def test_unknown_quantize_value_names_the_file(tmp_path: Path) -> None:
    """The quantize key takes "none" or "int8"; anything else is a ConfigError naming the file."""
    with pytest.raises(ConfigError, match=r"digits/config.toml: quantize = 'fp4'"):
        ModelRepository.load(quantized_copy(tmp_path, "fp4"))


def test_int8_needs_a_linear_layer(tmp_path: Path) -> None:
    """A program without linear layers cannot be quantised: a ConfigError, not a silent no-op."""
    import torch  # noqa: PLC0415 - only this test builds a model

    from worker.model import export_model  # noqa: PLC0415

    repo = tmp_path / "models"
    export_model(torch.nn.ReLU(), 4, repo / "relu" / "1" / "model.pt2")
    (repo / "relu" / "config.toml").write_text(
        'quantize = "int8"\n[[inputs]]\nname = "x"\ndatatype = "FP32"\nshape = [-1, 4]\n'
        '[[outputs]]\nname = "y"\ndatatype = "FP32"\nshape = [-1, 4]\n'
    )
    with pytest.raises(ConfigError, match="no linear layer"):
        ModelRepository.load(repo)


def test_reload_requantises_when_the_setting_changes(tmp_path: Path) -> None:
    """Turning quantize on is a reload that loads the version again, not a reuse."""
    repo_dir = quantized_copy(tmp_path, "none")
    repo = ModelRepository.load(repo_dir)
    config = repo_dir / "digits" / "config.toml"
    config.write_text(config.read_text().replace('quantize = "none"', 'quantize = "int8"'))
    reloaded, errors = repo.reload()
    assert errors == []
    assert reloaded.route("digits", "1", "").primary.config.quantize == "int8"
    assert not reloaded.route("digits", "1", "").primary.same_program(
        repo.route("digits", "1", "").primary
    )
    assert reloaded.route("iris", None, "").primary.same_program(
        repo.route("iris", None, "").primary
    )


HANDLER = """
import numpy as np

def preprocess(inputs):
    return {"pixels": np.clip(inputs["pixels"], 0, 16)}

def postprocess(outputs):
    probabilities, label = outputs
    return {"probabilities": probabilities, "label": label + 100}
"""


def test_a_handler_runs_only_when_code_is_allowed(tmp_path: Path) -> None:
    """handler.py: refused unless allowed; when allowed, pre/post-processing wrap each batch."""
    shutil.copytree(MODELS / "digits", tmp_path / "digits")
    (tmp_path / "digits" / "1" / "handler.py").write_text(HANDLER)
    with pytest.raises(ConfigError, match="WORKER_MODELS__ALLOW_CODE=true"):
        ModelRepository.load(tmp_path)
    plain = ModelRepository.load(MODELS).route("digits", "1", "").primary
    handled = ModelRepository.load(tmp_path, allow_code=True).route("digits", "1", "").primary
    pixels = np.random.default_rng(2).integers(0, 17, (5, 64)).astype(np.float32)
    wild = pixels.copy()
    wild[:, 0] = 1000.0  # clipped back to 16 by preprocess
    clipped = pixels.copy()
    clipped[:, 0] = 16.0
    expected = plain.predict({"pixels": clipped})["label"] + 100
    np.testing.assert_array_equal(handled.predict({"pixels": wild})["label"], expected)


@pytest.mark.parametrize(
    ("code", "fragment"),
    [
        ("raise RuntimeError('boom')", "importing it raised RuntimeError: boom"),
        ("x = 1", "defines neither preprocess nor postprocess"),
        ("preprocess = 3", "preprocess must be a function"),
    ],
)
def test_a_broken_handler_is_a_config_error(tmp_path: Path, code: str, fragment: str) -> None:
    """A handler that raises on import, defines nothing, or is not callable fails the load."""
    shutil.copytree(MODELS / "digits", tmp_path / "digits")
    (tmp_path / "digits" / "1" / "handler.py").write_text(code)
    with pytest.raises(ConfigError, match=fragment):
        ModelRepository.load(tmp_path, allow_code=True)


def test_programs_skip_the_argument_match_but_keep_their_guards(
    repository: ModelRepository,
) -> None:
    """A loaded program skips torch.export's per-call argument match; its shape guards still run."""
    model = repository.route("digits", None, "").primary
    module = model._module
    assert getattr(module, "validate_inputs", None) is False
    with torch.inference_mode(), pytest.raises(AssertionError, match="Guard failed"):
        module(torch.zeros(1, 63))
    with torch.inference_mode():
        outputs = module(torch.zeros(2, 64))
    first = outputs[0] if isinstance(outputs, tuple) else outputs
    assert first.shape == (2, 10)


def test_two_input_checks_come_in_the_configs_order(tmp_path: Path) -> None:
    """A wrong first input is named before a missing second one; an unknown one before both."""
    (tmp_path / "config.toml").write_text(
        '[[inputs]]\nname = "a"\ndatatype = "FP32"\nshape = [-1, 2]\n\n'
        '[[inputs]]\nname = "b"\ndatatype = "FP32"\nshape = [-1, 2]\n\n'
        '[[outputs]]\nname = "y"\ndatatype = "FP32"\nshape = [-1, 1]\n'
    )
    config = ModelConfig.load(tmp_path)
    wrong_a = Tensor.from_numpy("a", np.zeros((1, 2), np.int8))
    good_a = Tensor.from_numpy("a", np.zeros((1, 2), np.float32))
    cases = [
        ((wrong_a,), "input 'a' has datatype INT8"),
        ((good_a,), "missing input b FP32 [-1, 2]"),
        ((good_a, Tensor.from_numpy("c", np.zeros((1, 2), np.float32))), "unknown input 'c'"),
    ]
    for tensors, fragment in cases:
        with pytest.raises(RequestError, match=re.escape(fragment)):
            validate_request(config, None, InferenceRequest("id", "two", list(tensors)))
    both = [good_a, Tensor.from_numpy("b", np.ones((1, 2), np.float32))]
    prepared = validate_request(config, None, InferenceRequest("id", "two", both[::-1]))
    assert [a.tolist() for a in prepared.arrays] == [[[0.0, 0.0]], [[1.0, 1.0]]]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 4), min_size=1, max_size=6),
    st.sampled_from(["<f4", "<f2", "<i8", "u1", "?", ">f8"]),
    st.lists(st.integers(0, 3), max_size=2),
    st.integers(0, 2**32 - 1),
)
def test_outputs_cut_per_batch_match_a_conversion_per_request(
    rows: list[int], dtype: str, rest: list[int], seed: int
) -> None:
    """Each request's output tensor is what converting its own rows alone would give."""
    total = sum(rows)
    array = np.random.default_rng(seed).integers(0, 100, (total, *rest)).astype(dtype)
    per_request = [Prepared([], rows=n) for n in rows]
    bounds = list(itertools.accumulate(rows, initial=0))
    cut = stacking._cut("y", array, per_request, bounds, sequence=False)
    expected = [Tensor.from_numpy("y", array[lo:hi]) for lo, hi in itertools.pairwise(bounds)]
    assert cut == expected


def test_a_program_with_keyword_arguments_is_refused_at_load(tmp_path: Path) -> None:
    """The worker passes inputs positionally: a program exported with keywords is a ConfigError."""

    class Scaled(torch.nn.Module):
        def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
            return x * scale

    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(
        Scaled(), (torch.ones(2, 3),), {"scale": torch.ones(2, 3)},
        dynamic_shapes={"x": {0: batch}, "scale": {0: batch}},
    )  # fmt: skip
    (tmp_path / "kw" / "1").mkdir(parents=True)
    torch.export.save(program, tmp_path / "kw" / "1" / "model.pt2")
    (tmp_path / "kw" / "config.toml").write_text(
        '[[inputs]]\nname = "x"\ndatatype = "FP32"\nshape = [-1, 3]\n\n'
        '[[inputs]]\nname = "scale"\ndatatype = "FP32"\nshape = [-1, 3]\n\n'
        '[[outputs]]\nname = "y"\ndatatype = "FP32"\nshape = [-1, 3]\n'
    )
    with pytest.raises(ConfigError, match="keyword arguments"):
        ModelRepository.load(tmp_path)


def test_an_empty_shape_numpy_cannot_hold_is_a_request_error() -> None:
    """A zero-size shape too large for numpy to index is INVALID_ARGUMENT, not a crash."""
    with pytest.raises(RequestError, match="cannot be held") as info:
        Tensor("x", "FP32", (1, 0, 2**62), b"").to_numpy()
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
