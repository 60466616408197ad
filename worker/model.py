"""One model version: loading its program, validating requests, the batched forward call.

A model takes its inputs positionally in ``config.toml`` order (:mod:`worker.model_config`) and
returns one tensor, or a tuple in ``outputs`` order. The first dimension of every input and
output is the batch. A ``[tokenizer]`` model takes the tokenizer's feeds instead (token ids,
attention mask); a sequence model without one may take an extra last argument (attention mask
or lengths) that :func:`stack_inputs` builds while padding the batch.

:meth:`LoadedModel.validate` turns a request into :class:`Prepared` inputs (tokenised, checked);
:func:`stack_inputs` pads and concatenates them; :func:`split_outputs` cuts the outputs back.
Nothing here touches Kafka or asyncio: :meth:`LoadedModel.predict` and :func:`run_isolated`
are blocking calls that the worker runs off the event loop.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from worker.codec import BYTES, DATATYPES, InferenceRequest, Tensor
from worker.errors import ConfigError, ErrorCode, RequestError, shown
from worker.handler import HANDLER_FILE, Handler
from worker.model_config import CONFIG_FILE, MODEL_FILE, ModelConfig, TensorSpec
from worker.quantize import quantize_int8
from worker.text import TextEncoder, Tokenized

__all__ = [
    "Argument",
    "LoadedModel",
    "Prepared",
    "export_model",
    "run_isolated",
    "split_outputs",
    "stack_inputs",
]


@dataclass(frozen=True, slots=True)
class Prepared:
    """One request's inputs as the program takes them, and what batching needs to know."""

    arrays: list[npt.NDArray[Any]]
    """One array per program input (the extra mask or lengths argument excepted)."""
    rows: int
    length: int = 1
    """Sequence models: the request's length (second dimension); 1 otherwise."""
    tokens: int = 1
    """Real tokens (rows x length; for strings, their token counts): padding efficiency."""
    truncated: int = 0
    """Strings cut to the tokenizer's ``max_length``."""
    pending: bool = False
    """Strings not tokenised yet (``arrays`` holds them): :meth:`LoadedModel.tokenize` does it."""


@dataclass(frozen=True, slots=True)
class Argument:
    """One positional argument of the program."""

    name: str
    sequence: bool = False
    """Padded along its second dimension to the batch's longest request."""
    pad_value: float = 0.0
    extra: bool = False
    """Built by :func:`stack_inputs` (attention mask or lengths), not taken from requests."""


class LoadedModel:
    """One version of one model, loaded and ready to run batches."""

    def __init__(
        self,
        config: ModelConfig,
        version: str,
        module: torch.nn.Module,
        text: TextEncoder | None = None,
        handler: Handler | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.version = version
        self._module = module
        self.handler = handler
        self.text = text
        """The tokenizer step of a ``[tokenizer]`` model."""
        self.arguments = _arguments(config, text)
        """The program's positional arguments, in order (the names :meth:`predict` takes)."""

    @classmethod
    def load(cls, config: ModelConfig, folder: Path, *, allow_code: bool = False) -> LoadedModel:
        """Load ``folder/model.pt2`` and check it against the config with one dummy batch.

        ``allow_code``: import the folder's ``handler.py`` if there is one (else refuse it).
        """
        path = folder / MODEL_FILE
        try:
            program = torch.export.load(path)
        except Exception as exc:
            raise ConfigError(f"{path}: cannot load torch.export program: {exc}") from exc
        module: torch.nn.Module = program.module()
        if config.quantize == "int8":
            module = quantize_int8(module, path)
        text = None
        if config.tokenizer is not None:
            tokenizer = config.tokenizer
            text = TextEncoder(
                folder / tokenizer.file, max_length=tokenizer.max_length, feeds=tokenizer.feeds
            )
        handler = Handler.load(folder / HANDLER_FILE, allowed=allow_code)
        model = cls(config, folder.name, module, text, handler)
        try:
            outputs = model.predict(stack_inputs(model, [model.dummy()]))
        except Exception as exc:
            raise ConfigError(f"{path}: a batch of one zero input failed: {exc}") from exc
        for spec in config.outputs:
            out = outputs[spec.name]
            if out.dtype != DATATYPES[spec.datatype] or out.shape[0] != 1:
                raise ConfigError(
                    f"{path}: output {spec.name!r} came out {out.dtype} {list(out.shape)} for a "
                    f"batch of one; {folder.parent / CONFIG_FILE} declares {spec.describe()}"
                )
        return model

    def same_program(self, other: LoadedModel) -> bool:
        """True if both run the very same loaded program (a reload reused it)."""
        return self._module is other._module

    def with_config(self, config: ModelConfig) -> LoadedModel:
        """The same loaded program under a new config (same inputs and outputs; new routing)."""
        return LoadedModel(config, self.version, self._module, self.text, self.handler)

    def dummy(self) -> Prepared:
        """A request of one row of zeros (or one short string): the load-time check."""
        if self.text is not None:
            strings = np.array([b"warm up"], dtype=object)
            return self._tokenize(self.config.inputs[0], strings)
        arrays = [
            np.zeros((1, *(max(d, 1) for d in s.shape[1:])), DATATYPES[s.datatype])
            for s in self.config.inputs
        ]
        return Prepared(arrays, rows=1)

    def validate(self, request: InferenceRequest, *, tokenize: bool = True) -> Prepared:
        """Check a request against the config; return its inputs as the program takes them.

        Strings are tokenised here (a ``[tokenizer]`` model), unless ``tokenize`` is False:
        then they are checked and returned ``pending``, for :meth:`tokenize` (or
        :mod:`worker.tokenizing`, batch-wise) to finish. Raises :class:`RequestError`
        (INVALID_ARGUMENT) saying what was wrong and what the model expects.
        """
        expected = {s.name for s in self.config.inputs}
        for given in request.inputs:
            if given.name not in expected:
                raise RequestError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"unknown input {shown(given.name)} for model {self.name!r}; expected inputs: "
                    + ", ".join(s.describe() for s in self.config.inputs),
                )
        arrays = []
        rows = None
        for spec in self.config.inputs:
            tensor = request.input(spec.name)
            if tensor is None:
                raise RequestError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"missing input {spec.describe()} for model {self.name!r}",
                )
            _check_spec(tensor, spec)
            array = tensor.to_numpy()
            if self.text is not None:
                if tokenize:
                    return self._tokenize(spec, array)
                return Prepared([array], rows=len(array), length=0, tokens=0, pending=True)
            if array.dtype.kind == "f" and not spec.allow_non_finite:
                _check_finite(spec, array)
            if rows is not None and array.shape[0] != rows:
                raise RequestError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"inputs disagree on the batch dimension ({rows} vs {array.shape[0]})",
                )
            rows = array.shape[0]
            arrays.append(array)
        assert rows is not None
        length = self._length(arrays)
        return Prepared(arrays, rows, length, rows * length)

    def tokenize_many(self, pending: Sequence[Prepared]) -> list[Prepared | RequestError]:
        """Tokenise several pending requests' strings in one call (blocking; off the loop)."""
        assert self.text is not None
        name = self.config.inputs[0].name
        return [
            r if isinstance(r, RequestError) else _prepared(r)
            for r in self.text.encode_many([(name, p.arrays[0]) for p in pending])
        ]

    def _tokenize(self, spec: TensorSpec, strings: npt.NDArray[Any]) -> Prepared:
        assert self.text is not None
        return _prepared(self.text.encode(spec.name, strings))

    def _length(self, arrays: Sequence[npt.NDArray[Any]]) -> int:
        """The one length all sequence inputs of a request share (1 for fixed shapes)."""
        lengths = {
            int(a.shape[1])
            for a, s in zip(arrays, self.config.inputs, strict=True)
            if s.is_sequence
        }
        if not lengths:
            return 1
        if len(lengths) > 1 or 0 in lengths:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"sequence inputs of model {self.name!r} must share one length of at least 1 "
                f"(the second dimension); got {sorted(lengths)}",
            )
        return lengths.pop()

    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Run one forward pass on a batch (blocking), inputs keyed by :attr:`arguments` name.

        A version's handler, if any, runs its ``preprocess`` before and ``postprocess`` after.
        """
        handler = self.handler
        values: Sequence[Any] = [inputs[a.name] for a in self.arguments]
        if handler is not None and handler.preprocess is not None:
            given = handler.preprocess(dict(inputs))
            values = [given[a.name] for a in self.arguments] if isinstance(given, dict) else given
        args = [torch.from_numpy(_writable(np.asarray(v))) for v in values]
        with torch.inference_mode():
            result = self._module(*args)
        tensors = (result,) if isinstance(result, torch.Tensor) else tuple(result)
        arrays = tuple(t.detach().cpu().numpy() for t in tensors)
        if handler is not None and handler.postprocess is not None:
            made = handler.postprocess(arrays)
            return {s.name: np.asarray(made[s.name]) for s in self.config.outputs}
        if len(arrays) != len(self.config.outputs):
            raise RuntimeError(
                f"model {self.name} v{self.version} returned {len(arrays)} tensors; "
                f"config declares {len(self.config.outputs)}"
            )
        return {spec.name: a for spec, a in zip(self.config.outputs, arrays, strict=True)}


def _prepared(tokenized: Tokenized) -> Prepared:
    return Prepared(
        tokenized.arrays,
        rows=len(tokenized.lengths),
        length=max(tokenized.lengths),
        tokens=sum(tokenized.lengths),
        truncated=tokenized.truncated,
    )


def _arguments(config: ModelConfig, text: TextEncoder | None) -> tuple[Argument, ...]:
    if text is not None:
        return tuple(Argument(f, sequence=True, pad_value=text.pad_value(f)) for f in text.feeds)
    arguments = [Argument(s.name, s.is_sequence, s.pad_value) for s in config.inputs]
    if config.extra_input != "none":
        arguments.append(Argument(config.extra_input, extra=True))
    return tuple(arguments)


def export_model(module: torch.nn.Module, features: int, path: Path) -> None:
    """Save ``module`` (one input of ``features`` columns) as a torch.export program at ``path``.

    The batch dimension is dynamic (1 to 65,536 rows), so the worker can batch freely.
    """
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(
        module.eval(), (torch.zeros(2, features),), dynamic_shapes=({0: batch},)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)


def _writable(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Torch wants writable memory; a lone request's array is a read-only view of its bytes."""
    if array.flags.writeable and array.flags.c_contiguous:
        return array
    return np.array(array, order="C")


def _check_finite(spec: TensorSpec, array: npt.NDArray[Any]) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise RequestError(
            ErrorCode.INVALID_ARGUMENT,
            f"input {spec.name!r} holds {int((~finite).sum())} NaN or infinite value(s), the "
            f"first at index {list(first)}; this model accepts finite values only",
        )


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
    shape = tensor.shape
    if (
        len(shape) != len(spec.shape)
        or shape[0] < 1
        or any(want not in (-1, got) for want, got in zip(spec.shape[1:], shape[1:], strict=True))
    ):
        raise RequestError(
            ErrorCode.INVALID_ARGUMENT,
            f"input {spec.name!r} has shape {list(shape)}; expected {spec.describe()} "
            "(-1 is any size, the first dimension is the batch and must be at least 1)",
        )


def stack_inputs(model: LoadedModel, per_request: Sequence[Prepared]) -> dict[str, Any]:
    """The batch's program inputs by name: concatenated, sequences padded to the longest."""
    if len(per_request) == 1 and not model.config.is_sequence:
        return {
            a.name: array for a, array in zip(model.arguments, per_request[0].arrays, strict=True)
        }
    longest = max(p.length for p in per_request)
    batch: dict[str, Any] = {}
    for i, argument in enumerate(model.arguments):
        if argument.extra:
            batch[argument.name] = _extra(argument.name, per_request, longest)
        elif argument.sequence:
            batch[argument.name] = _pad_concat([p.arrays[i] for p in per_request], longest,
                                               argument.pad_value)  # fmt: skip
        else:
            batch[argument.name] = np.concatenate([p.arrays[i] for p in per_request], axis=0)
    return batch


def _pad_concat(
    arrays: Sequence[npt.NDArray[Any]], longest: int, pad_value: float
) -> npt.NDArray[Any]:
    """Arrays of shape [rows, length, ...] as one [sum(rows), longest, ...], padded."""
    first = arrays[0]
    out = np.full(
        (sum(a.shape[0] for a in arrays), longest, *first.shape[2:]), pad_value, first.dtype
    )
    row = 0
    for array in arrays:
        out[row : row + array.shape[0], : array.shape[1]] = array
        row += array.shape[0]
    return out


def _extra(name: str, per_request: Sequence[Prepared], longest: int) -> npt.NDArray[np.int64]:
    """``attention_mask`` ([rows, longest]: 1 real, 0 padding) or ``lengths`` ([rows])."""
    if name == "lengths":
        return np.concatenate([np.full(p.rows, p.length, np.int64) for p in per_request])
    masks = [np.ones((p.rows, p.length), np.int64) for p in per_request]
    return _pad_concat(masks, longest, 0)


def split_outputs(
    model: LoadedModel, outputs: Mapping[str, npt.NDArray[Any]], per_request: Sequence[Prepared]
) -> list[list[Tensor]]:
    """Cut batch outputs back into each request's rows (and length), as wire tensors."""
    total = sum(p.rows for p in per_request)
    for spec in model.config.outputs:
        if outputs[spec.name].shape[0] != total:
            raise RuntimeError(
                f"model {model.name} v{model.version} output {spec.name!r} has "
                f"{outputs[spec.name].shape[0]} rows for a batch of {total}"
            )
    bounds = np.cumsum([0, *(p.rows for p in per_request)]).tolist()
    return [
        [
            Tensor.from_numpy(
                spec.name,
                outputs[spec.name][lo:hi, : p.length]
                if spec.is_sequence
                else outputs[spec.name][lo:hi],
            )
            for spec in model.config.outputs
        ]
        for p, (lo, hi) in zip(per_request, itertools.pairwise(bounds), strict=True)
    ]


def run_isolated(
    model: LoadedModel, per_request: Sequence[Prepared]
) -> list[list[Tensor] | Exception]:
    """Run a batch; if the model raises, split it in halves until the failing requests are alone.

    Every request gets its outputs, or the exception its own rows raise: one bad request costs
    its batch about log2(batch size) extra forward passes, never the good requests' results.
    Blocking: call it off the event loop.
    """
    try:
        outputs = model.predict(stack_inputs(model, per_request))
        return list(split_outputs(model, outputs, per_request))
    except Exception as exc:  # noqa: BLE001 - a model may raise anything; it is reported per request
        if len(per_request) == 1:
            return [exc]
        middle = len(per_request) // 2
        return run_isolated(model, per_request[:middle]) + run_isolated(model, per_request[middle:])
