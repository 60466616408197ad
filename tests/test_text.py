"""Unit tests of text and variable-length models (tokenizer step, padding, MiniLM); no broker."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.bench.corpus import paragraphs
from worker.bench.targets import reference_folder
from worker.domain import InferenceRequest, Tensor
from worker.errors import ConfigError, ErrorCode, RequestError
from worker.forward import run_isolated
from worker.model import LoadedModel
from worker.model_config import ModelConfig
from worker.repository import ModelRepository

from .conftest import ROOT, TEXT_MODELS


def ask(model: LoadedModel, *texts: str | bytes, name: str = "text") -> InferenceRequest:
    """A request of strings for ``model``."""
    return InferenceRequest("r", model.name, [Tensor.from_strings(name, list(texts))])


def embeddings(model: LoadedModel, groups: list[list[str]]) -> list[np.ndarray]:
    """Run requests (one per group of strings) as one batch; each request's embedding rows."""
    results = run_isolated(model, [model.validate(ask(model, *g)) for g in groups])
    out = []
    for result in results:
        assert not isinstance(result, Exception), result
        out.append(result[0].to_numpy())
    return out


@pytest.fixture(scope="module")
def minilm(text_repository: ModelRepository) -> LoadedModel:
    """The exported all-MiniLM-L6-v2."""
    return text_repository.route("minilm", None, "").primary


def test_minilm_matches_sentence_transformers_on_a_real_corpus(minilm: LoadedModel) -> None:
    """Embeddings from mixed-length batches match SentenceTransformer.encode (cosine >= 0.9999)."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    texts = paragraphs(64, seed=7)
    reference_model = sentence_transformers.SentenceTransformer(
        str(reference_folder()), device="cpu"
    )
    reference = reference_model.encode(texts, normalize_embeddings=True)
    groups = [texts[i : i + 3] for i in range(0, len(texts), 3)]  # requests of 1-3 strings
    ours = np.concatenate(embeddings(minilm, groups))
    cosine = (ours * reference).sum(axis=1)
    assert ours.shape == (64, 384)
    assert cosine.min() >= 0.9999, cosine.min()
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_padding_never_changes_an_embedding(minilm: LoadedModel) -> None:
    """A sentence embedded alone and in a batch with a much longer one gives the same vector."""
    short, long = "Kafka absorbs the load.", " ".join(paragraphs(20, seed=3))
    alone = embeddings(minilm, [[short]])[0]
    together = embeddings(minilm, [[long], [short]])[1]
    np.testing.assert_allclose(alone, together, atol=2e-6)


def test_long_strings_are_truncated_and_counted(minilm: LoadedModel) -> None:
    """Strings over max_length tokens are cut to it, and the count is kept for the reply."""
    prepared = minilm.validate(ask(minilm, "word " * 1000, "short one", "word " * 300))
    assert prepared.truncated == 2
    assert prepared.length == 256
    assert prepared.rows == 3
    assert prepared.tokens == 256 + 4 + 256
    assert prepared.arrays[1][1].sum() == 4, "the short row's mask covers its own tokens"


@pytest.mark.parametrize(
    ("texts", "fragment"),
    [
        ([b"ok", b"\xff\xfe"], "element 1 is not UTF-8 text"),
        ([], "has shape [0]"),
    ],
)
def test_bad_strings_are_invalid_argument(
    minilm: LoadedModel, texts: list[bytes], fragment: str
) -> None:
    """Non-UTF-8 bytes or no strings: INVALID_ARGUMENT naming the problem."""
    with pytest.raises(RequestError) as info:
        minilm.validate(ask(minilm, *texts))
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    assert fragment in info.value.message


def test_numbers_for_a_text_model_are_refused(minilm: LoadedModel) -> None:
    """A numeric tensor sent to a BYTES input says how strings are laid out."""
    request = InferenceRequest("r", "minilm", [Tensor.from_numpy("text", np.zeros(3, np.int32))])
    with pytest.raises(RequestError, match="4-byte little-endian length"):
        minilm.validate(request)


class MaskedSum(torch.nn.Module):
    """Per row: the sum of its real (unmasked) values, and the values times 2 per position."""

    def forward(self, values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (values * mask).sum(1), values * 2


class LengthSum(torch.nn.Module):
    """Per row: the sum of its first ``lengths`` values (positions past it are padding)."""

    def forward(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(values.shape[1]).unsqueeze(0)
        return (values * (positions < lengths.unsqueeze(1))).sum(1)


def sequence_model(tmp_path: Path, extra: str) -> LoadedModel:
    """A numeric sequence model taking ``values`` [-1, -1] and an attention mask or lengths."""
    module = MaskedSum() if extra == "attention_mask" else LengthSum()
    batch = torch.export.Dim("batch", min=1, max=65536)
    length = torch.export.Dim("length", min=1, max=4096)
    example = (torch.ones(2, 5), torch.ones(2, 5, dtype=torch.int64))
    shapes = (
        {0: batch, 1: length},
        {0: batch, 1: length} if extra == "attention_mask" else {0: batch},
    )
    if extra == "lengths":
        example = (torch.ones(2, 5), torch.tensor([5, 5]))
    program = torch.export.export(module, example, dynamic_shapes=shapes)
    folder = tmp_path / "seq"
    (folder / "1").mkdir(parents=True)
    torch.export.save(program, folder / "1" / "model.pt2")
    outputs = '[[outputs]]\nname = "total"\ndatatype = "FP32"\nshape = [-1]\n'
    if extra == "attention_mask":
        outputs += '[[outputs]]\nname = "doubled"\ndatatype = "FP32"\nshape = [-1, -1]\n'
    (folder / "config.toml").write_text(
        '[[inputs]]\nname = "values"\ndatatype = "FP32"\nshape = [-1, -1]\npad_value = 1000.0\n'
        f'{outputs}[padding]\nextra_input = "{extra}"\n'
    )
    return ModelRepository.load(tmp_path).route("seq", None, "").primary


@pytest.mark.parametrize("extra", ["attention_mask", "lengths"])
def test_mixed_lengths_share_a_batch_padded_and_cut_back(tmp_path: Path, extra: str) -> None:
    """Requests of lengths 2, 7 and 4 run in one batch; padding is invisible in every reply."""
    model = sequence_model(tmp_path, extra)
    rng = np.random.default_rng(5)
    parts = [rng.normal(size=(rows, n)).astype(np.float32) for rows, n in ((1, 2), (3, 7), (2, 4))]
    requests = [InferenceRequest("r", "seq", [Tensor.from_numpy("values", p)]) for p in parts]
    prepared = [model.validate(r) for r in requests]
    assert [p.length for p in prepared] == [2, 7, 4]
    results = run_isolated(model, prepared)
    for part, result in zip(parts, results, strict=True):
        assert not isinstance(result, Exception), result
        by_name = {t.name: t.to_numpy() for t in result}
        np.testing.assert_allclose(by_name["total"], part.sum(axis=1), rtol=1e-5)
        if extra == "attention_mask":
            assert by_name["doubled"].shape == part.shape, "a sequence output is cut back"
            np.testing.assert_allclose(by_name["doubled"], part * 2)


def config_with(tmp_path: Path, body: str) -> Path:
    """A model folder whose config.toml is ``body``."""
    folder = tmp_path / "m"
    folder.mkdir(exist_ok=True)
    (folder / "config.toml").write_text(body)
    return folder


STRINGS = '[[inputs]]\nname = "text"\ndatatype = "BYTES"\nshape = [-1]\n'
OUT = '[[outputs]]\nname = "y"\ndatatype = "FP32"\nshape = [-1, 4]\n'
SEQ = '[[inputs]]\nname = "ids"\ndatatype = "INT64"\nshape = [-1, -1]\n'


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (STRINGS + OUT, "strings need a [tokenizer] table"),
        (STRINGS + SEQ + OUT + "[tokenizer]\n", "exactly one input, of datatype BYTES"),
        (STRINGS + OUT + '[tokenizer]\nfile = "../../etc/passwd"\n', "a file name in the version"),
        (STRINGS + OUT + "[tokenizer]\nmax_length = 1\n", "from 2 to 65536"),
        (STRINGS + OUT + '[tokenizer]\nfeeds = ["input_ids", "input_ids"]\n', "distinct names"),
        (STRINGS + OUT + '[tokenizer]\nfeeds = ["pixels"]\n', "distinct names"),
        (STRINGS + OUT + "[tokenizer]\nwhat = 1\n", "unknown [tokenizer] key"),
        (SEQ + OUT + '[padding]\nextra_input = "mask"\n', "expected one of none"),
        (SEQ + OUT + "[batching]\nmax_batch_tokens = 0\n", "max_batch_tokens = 0"),
        (
            '[[inputs]]\nname = "x"\ndatatype = "FP32"\nshape = [-1, 4]\n'
            + OUT
            + "[batching]\nmax_batch_tokens = 64\n",
            "need a sequence input",
        ),
        (
            '[[inputs]]\nname = "x"\ndatatype = "FP32"\nshape = [-1, 4, -1]\n' + OUT,
            "only the second dimension may be -1",
        ),
        (SEQ.replace("INT64", "FP32") + 'pad_value = "x"\n' + OUT, "pad_value = 'x'"),
        (SEQ + OUT.replace("FP32", "BYTES"), "outputs cannot be BYTES"),
    ],
)
def test_text_and_sequence_config_errors(tmp_path: Path, body: str, fragment: str) -> None:
    """Each wrong text or sequence setting is a ConfigError naming what is wrong."""
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        ModelConfig.load(config_with(tmp_path, body))


def test_a_broken_tokenizer_file_is_a_config_error(tmp_path: Path) -> None:
    """A tokenizer.json that does not parse fails the load with the file named."""
    folder = tmp_path / "minilm"
    shutil.copytree(TEXT_MODELS / "minilm", folder)
    (folder / "1" / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ConfigError, match=r"tokenizer\.json: cannot load tokenizer"):
        ModelRepository.load(tmp_path)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.lists(st.binary(max_size=300), max_size=6).map(lambda s: Tensor.from_strings("text", s)),
        st.builds(
            Tensor,
            st.sampled_from(["text", "other"]),
            st.sampled_from(["BYTES", "FP32", "INT64"]),
            st.lists(st.integers(-1, 8), max_size=3).map(tuple),
            st.binary(max_size=64),
        ),
    )
)
def test_any_tensor_for_a_text_model_is_prepared_or_refused(
    minilm: LoadedModel, tensor: Tensor
) -> None:
    """Arbitrary strings or tensors: tokenised and counted, or INVALID_ARGUMENT; nothing else."""
    try:
        prepared = minilm.validate(InferenceRequest("r", "minilm", [tensor]))
    except RequestError as exc:
        code = exc.code
        assert code == ErrorCode.INVALID_ARGUMENT
    else:
        assert prepared.rows == tensor.shape[0] >= 1
        assert 2 <= prepared.length <= 256
        assert prepared.tokens <= prepared.rows * prepared.length
        assert [a.shape for a in prepared.arrays] == [(prepared.rows, prepared.length)] * 2


def test_the_corpus_does_not_depend_on_what_else_is_imported() -> None:
    """A fresh interpreter and this one (torch, transformers loaded) build the same corpus."""
    import sentence_transformers  # noqa: F401, PLC0415 - loads the libraries that patch the stdlib

    code = (
        "import json; from worker.bench.corpus import paragraphs; "
        "print(json.dumps(paragraphs(300, seed=2)))"
    )
    fresh = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert json.loads(fresh.stdout) == paragraphs(300, seed=2)
