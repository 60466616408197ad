"""A request checked against a model's declared inputs, and made :class:`~worker.prepared.Prepared`.

Names, datatypes and shapes as ``config.toml`` declares them (``-1``: any size), finite
values unless an input allows others, ids within the vocabulary where an input declares
``vocab_size``, one batch dimension and one sequence length shared by all inputs. A
``[tokenizer]`` model's strings are tokenised here, or left ``pending`` for the tokenizer
stage (:mod:`worker.tokenizing`), which tokenises many requests' strings in one call
(:func:`tokenize_pending`). Every refusal is a :class:`~worker.errors.RequestError`
(INVALID_ARGUMENT) saying what was wrong and what the model expects.
:meth:`worker.model.LoadedModel.validate` is the way in.

Nothing here touches Kafka, asyncio or torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.domain import BYTES, InferenceRequest, Tensor
from worker.errors import ErrorCode, RequestError, shown
from worker.model_config import ModelConfig, TensorSpec
from worker.prepared import Prepared
from worker.text import TextEncoder

__all__ = ["tokenize_pending", "validate_request"]


def validate_request(
    config: ModelConfig,
    text: TextEncoder | None,
    request: InferenceRequest,
    *,
    tokenize: bool = True,
) -> Prepared:
    """Check a request against ``config``; return its inputs as the program takes them.

    ``text``: the tokenizer step of a ``[tokenizer]`` model. Its strings are tokenised here
    unless ``tokenize`` is False: then they are checked and returned ``pending``.
    """
    arrays = []
    rows = None
    lengths = set()
    for spec, tensor in zip(config.inputs, _matched(config, request), strict=True):
        if tensor is None:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"missing input {spec.describe()} for model {config.name!r}",
            )
        _check_spec(tensor, spec)
        array = tensor.to_numpy()
        if text is not None:
            if tokenize:
                return Prepared.from_tokenized(text.encode(spec.name, array))
            return Prepared([array], rows=len(array), length=0, tokens=0, pending=True)
        if array.dtype.kind == "f" and not spec.allow_non_finite:
            _check_finite(spec, array)
        if spec.vocab_size is not None:
            _check_ids(spec, spec.vocab_size, array)
        if rows is not None and array.shape[0] != rows:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"inputs disagree on the batch dimension ({rows} vs {array.shape[0]})",
            )
        rows = array.shape[0]
        if spec.is_sequence:
            lengths.add(int(array.shape[1]))
        arrays.append(array)
    assert rows is not None
    length = _length(config, lengths)
    return Prepared(arrays, rows, length, rows * length)


def _matched(config: ModelConfig, request: InferenceRequest) -> Sequence[Tensor | None]:
    """The request's tensor for each declared input, in the config's order (None: missing).

    Refused first: an input the model does not declare. A name given twice: its first tensor.
    """
    given, specs = request.inputs, config.inputs
    if len(given) == 1 and len(specs) == 1 and given[0].name == specs[0].name:
        return given  # the usual request: the one input its model declares
    expected = {s.name for s in specs}
    for tensor in given:
        if tensor.name not in expected:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"unknown input {shown(tensor.name)} for model {config.name!r}; expected "
                "inputs: " + ", ".join(s.describe() for s in specs),
            )
    return [request.input(spec.name) for spec in specs]


def tokenize_pending(
    config: ModelConfig, text: TextEncoder, pending: Sequence[Prepared]
) -> list[Prepared | RequestError]:
    """Tokenise several pending requests' strings in one call (blocking; off the loop)."""
    name = config.inputs[0].name
    return [
        r if isinstance(r, RequestError) else Prepared.from_tokenized(r)
        for r in text.encode_many([(name, p.arrays[0]) for p in pending])
    ]


def _length(config: ModelConfig, lengths: set[int]) -> int:
    """The one length all sequence inputs of a request share (1 for fixed shapes)."""
    if not lengths:
        return 1
    if len(lengths) > 1 or 0 in lengths:
        raise RequestError(
            ErrorCode.INVALID_ARGUMENT,
            f"sequence inputs of model {config.name!r} must share one length of at least 1 "
            f"(the second dimension); got {sorted(lengths)}",
        )
    return lengths.pop()


def _check_finite(spec: TensorSpec, array: npt.NDArray[Any]) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise RequestError(
            ErrorCode.INVALID_ARGUMENT,
            f"input {spec.name!r} holds {int((~finite).sum())} NaN or infinite value(s), the "
            f"first at index {list(first)}; this model accepts finite values only",
        )


def _check_ids(spec: TensorSpec, vocab_size: int, array: npt.NDArray[Any]) -> None:
    """Every id in ``[0, vocab_size)``: on a GPU one beyond would break the device for good."""
    outside = (array < 0) | (array >= vocab_size)
    if outside.any():
        first = tuple(int(i) for i in np.argwhere(outside)[0])
        raise RequestError(
            ErrorCode.INVALID_ARGUMENT,
            f"input {spec.name!r} holds {int(outside.sum())} id(s) outside [0, {vocab_size}), "
            f"the first {int(array[first])} at index {list(first)}; this model's vocabulary has "
            f"{vocab_size} entries",
        )


def _fits(shape: tuple[int, ...], wanted: tuple[int, ...]) -> bool:
    """Every dimension but the first as declared (-1: any); the lengths are equal."""
    for i in range(1, len(wanted)):
        want = wanted[i]
        if want not in (-1, shape[i]):
            return False
    return True


def _check_spec(tensor: Tensor, spec: TensorSpec) -> None:
    if tensor.datatype != spec.datatype:
        if spec.datatype == BYTES:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"input {spec.name!r} has datatype {tensor.datatype}; expected {spec.describe()} "
                "(strings: each a 4-byte little-endian length, then UTF-8 bytes)",
            )
        raise RequestError(
            ErrorCode.INVALID_ARGUMENT,
            f"input {spec.name!r} has datatype {tensor.datatype}; expected {spec.describe()}",
        )
    shape, wanted = tensor.shape, spec.shape
    if len(shape) != len(wanted) or shape[0] < 1 or not _fits(shape, wanted):
        raise RequestError(
            ErrorCode.INVALID_ARGUMENT,
            f"input {spec.name!r} has shape {list(shape)}; expected {spec.describe()} "
            "(-1 is any size, the first dimension is the batch and must be at least 1)",
        )
