"""A batch's inputs stacked from its requests', and its outputs cut back per request.

:func:`stack_inputs` pads and concatenates the :class:`~worker.prepared.Prepared` inputs of a
batch into the program's arguments (sequences padded to the longest request with their
``pad_value``, the extra attention mask or lengths built), into ordinary memory or wherever
``empty`` allocates (pinned host memory on a GPU, :func:`worker.staging.pinned`);
:func:`split_outputs` cuts the batch's outputs back into each request's rows and length, as
wire tensors.

Plain numpy: no Kafka, no asyncio.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.domain import Tensor
from worker.prepared import Prepared
from worker.program import Program

__all__ = ["Empty", "split_outputs", "stack_inputs"]


Empty = Callable[[tuple[int, ...], "np.dtype[Any]"], npt.NDArray[Any]]
"""Allocates an uninitialised array (``np.empty``, or pinned host memory for a GPU)."""


def stack_inputs(
    model: Program, per_request: Sequence[Prepared], *, empty: Empty | None = None
) -> dict[str, Any]:
    """The batch's program inputs by name: concatenated, sequences padded to the longest.

    ``empty``: where the batch is assembled (default: ordinary memory; a lone fixed-shape
    request is then passed as it is, without a copy).
    """
    if empty is None:
        if len(per_request) == 1 and not model.config.is_sequence:
            return {
                a.name: array
                for a, array in zip(model.arguments, per_request[0].arrays, strict=True)
            }
        empty = _empty
    longest = max(p.length for p in per_request)
    batch: dict[str, Any] = {}
    for i, argument in enumerate(model.arguments):
        if argument.extra:
            batch[argument.name] = _extra(argument.name, per_request, longest, empty)
        elif argument.sequence:
            batch[argument.name] = _pad_concat([p.arrays[i] for p in per_request], longest,
                                               argument.pad_value, empty)  # fmt: skip
        else:
            arrays = [p.arrays[i] for p in per_request]
            first = arrays[0]
            out = empty((sum(a.shape[0] for a in arrays), *first.shape[1:]), first.dtype)
            batch[argument.name] = np.concatenate(arrays, axis=0, out=out)
    return batch


def _empty(shape: tuple[int, ...], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    return np.empty(shape, dtype)


def _pad_concat(
    arrays: Sequence[npt.NDArray[Any]], longest: int, pad_value: float, empty: Empty = _empty
) -> npt.NDArray[Any]:
    """Arrays of shape [rows, length, ...] as one [sum(rows), longest, ...], padded."""
    first = arrays[0]
    out = empty((sum(a.shape[0] for a in arrays), longest, *first.shape[2:]), first.dtype)
    row = 0
    for array in arrays:
        rows, length = array.shape[0], array.shape[1]
        out[row : row + rows, :length] = array
        out[row : row + rows, length:] = pad_value
        row += rows
    return out


def _extra(
    name: str, per_request: Sequence[Prepared], longest: int, empty: Empty = _empty
) -> npt.NDArray[np.int64]:
    """``attention_mask`` ([rows, longest]: 1 real, 0 padding) or ``lengths`` ([rows])."""
    if name == "lengths":
        out = empty((sum(p.rows for p in per_request),), np.dtype(np.int64))
        return np.concatenate([np.full(p.rows, p.length, np.int64) for p in per_request], out=out)
    masks = [np.ones((p.rows, p.length), np.int64) for p in per_request]
    return _pad_concat(masks, longest, 0, empty)


def split_outputs(
    model: Program, outputs: Mapping[str, npt.NDArray[Any]], per_request: Sequence[Prepared]
) -> list[list[Tensor]]:
    """Cut batch outputs back into each request's rows (and length), as wire tensors."""
    total = sum(p.rows for p in per_request)
    for spec in model.config.outputs:
        if outputs[spec.name].shape[0] != total:
            raise RuntimeError(
                f"model {model.name} v{model.version} output {spec.name!r} has "
                f"{outputs[spec.name].shape[0]} rows for a batch of {total}"
            )
    bounds = list(itertools.accumulate((p.rows for p in per_request), initial=0))
    columns = [
        _cut(spec.name, outputs[spec.name], per_request, bounds, sequence=spec.is_sequence)
        for spec in model.config.outputs
    ]
    if not columns:
        return [[] for _ in per_request]
    return [list(tensors) for tensors in zip(*columns, strict=True)]


def _cut(
    name: str,
    array: npt.NDArray[Any],
    per_request: Sequence[Prepared],
    bounds: Sequence[int],
    *,
    sequence: bool,
) -> list[Tensor]:
    """One output cut into each request's tensor (rows ``bounds[i]:bounds[i + 1]``)."""
    rows = itertools.pairwise(bounds)
    if sequence or array.dtype.kind in "OUS" or not per_request:  # per request: trimmed, strings
        return [
            Tensor.from_numpy(name, array[lo:hi, : p.length] if sequence else array[lo:hi])
            for p, (lo, hi) in zip(per_request, rows, strict=True)
        ]
    # Fixed shapes: the batch converted to wire bytes once, each request's rows a slice of them.
    whole = Tensor.from_numpy(name, array)
    row = len(whole.data) // array.shape[0] if array.shape[0] else 0
    rest = whole.shape[1:]
    return [
        Tensor(name, whole.datatype, (hi - lo, *rest), whole.data[lo * row : hi * row])
        for lo, hi in rows
    ]
