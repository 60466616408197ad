"""Forward passes over batches: assembling inputs, running them, cutting outputs back.

:func:`stack_inputs` pads and concatenates the :class:`~worker.model.Prepared` inputs of a
batch (into pinned host memory on a GPU); :func:`split_outputs` cuts the outputs back into
each request's rows and length. :func:`run_batches` runs a run of batches with the next
batch's assembly and copy overlapping the current one's compute (the three steps of
:class:`~worker.model.LoadedModel`: upload, launch, download); a batch that fails (a bad
request, or out of memory) is split in halves until the failing requests are alone
(:func:`run_isolated`); a request that alone does not fit in memory gets RESOURCE_EXHAUSTED.

Blocking calls, no Kafka, no asyncio: the worker runs them in a version's instances.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from worker.device import is_out_of_memory, release_cache
from worker.domain import Tensor
from worker.errors import ErrorCode, RequestError

if TYPE_CHECKING:
    from worker.model import LoadedModel, Prepared

__all__ = [
    "Empty",
    "Run",
    "Staged",
    "run_batches",
    "run_isolated",
    "split_outputs",
    "stack_inputs",
]


@dataclass(slots=True)
class Staged:
    """A batch's program arguments on its device (the copy may still be under way)."""

    args: list[torch.Tensor]
    ready: torch.cuda.Event | None = None
    """CUDA: recorded on the copy stream after the copies; the compute stream waits on it."""
    host: list[torch.Tensor] = field(default_factory=list)
    """CUDA: the pinned host buffers, kept alive until the copies are done."""


Empty = Callable[[tuple[int, ...], "np.dtype[Any]"], npt.NDArray[Any]]
"""Allocates an uninitialised array (``np.empty``, or pinned host memory for a GPU)."""


def stack_inputs(
    model: LoadedModel, per_request: Sequence[Prepared], *, empty: Empty | None = None
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
    Out of memory is handled the same way (cached device memory released first): a batch too
    big is split until its halves fit; a request that alone does not fit gets
    RESOURCE_EXHAUSTED. Blocking: call it off the event loop.
    """
    try:
        outputs = model.predict(stack_inputs(model, per_request))
        return list(split_outputs(model, outputs, per_request))
    except Exception as exc:  # noqa: BLE001 - a model may raise anything; it is reported per request
        return _isolate(model, per_request, exc)


def _isolate(
    model: LoadedModel, per_request: Sequence[Prepared], exc: Exception
) -> list[list[Tensor] | Exception]:
    """After ``exc`` on the whole batch: each half on its own (a lone request gets the error)."""
    if is_out_of_memory(exc):
        release_cache(model.device)
        if len(per_request) == 1:
            return [_too_big(model, per_request[0], exc)]
    if len(per_request) == 1:
        return [exc]
    middle = len(per_request) // 2
    return run_isolated(model, per_request[:middle]) + run_isolated(model, per_request[middle:])


def _too_big(model: LoadedModel, alone: Prepared, exc: Exception) -> RequestError:
    shape = f"{alone.rows} row(s)" + (f" x {alone.length}" if model.config.is_sequence else "")
    error = RequestError(
        ErrorCode.RESOURCE_EXHAUSTED,
        f"model {model.name} v{model.version} ran out of memory on {model.device} with this "
        f"request alone ({shape}): send fewer or shorter rows per request",
    )
    error.__cause__ = exc
    return error


Run = list[tuple[float, float, list[list[Tensor] | Exception]]]
"""Per batch of a run: when it began (seconds after the first), its compute time, results."""


def run_batches(model: LoadedModel, batches: Sequence[Sequence[Prepared]]) -> Run:
    """Run batches back to back (blocking): each batch's outputs, or its requests' errors.

    Pipelined: once a batch is launched, the next one is assembled and its copy started while
    the device computes (on a GPU the launch returns at once); then the outputs come back. A
    batch that fails anywhere goes through :func:`run_isolated`'s halving.
    """
    first = time.monotonic()
    out: Run = []
    staged = _attempt(model.stage, batches[0]) if batches else None
    for i, batch in enumerate(batches):
        began = time.monotonic()
        current = staged  # its host buffers stay alive until its outputs are back
        launched = _attempt(model.launch, current) if isinstance(current, Staged) else current
        following = batches[i + 1] if i + 1 < len(batches) else None
        staged = _attempt(model.stage, following) if following is not None else None
        results: list[list[Tensor] | Exception] | Exception
        if isinstance(launched, tuple):
            results = _attempt(_finish(model, batch), launched)
        else:
            results = launched if launched is not None else RuntimeError("not staged")
        if isinstance(results, Exception):
            if is_out_of_memory(results) and isinstance(staged, Staged):
                staged = None  # the next batch's copy is given up too; it is staged again
                release_cache(model.device)
            results = _isolate(model, batch, results)
        out.append((began - first, time.monotonic() - began, results))
        del current
        if staged is None and following is not None:
            staged = _attempt(model.stage, following)
    return out


def _finish(
    model: LoadedModel, batch: Sequence[Prepared]
) -> Callable[[tuple[torch.Tensor, ...]], list[list[Tensor]]]:
    """Outputs of a launched batch, back on the host and cut per request."""
    return lambda launched: split_outputs(model, model.download(launched), batch)


def _attempt(call: Callable[[Any], Any], value: Any) -> Any:
    """``call(value)``, or the exception it raised."""
    try:
        return call(value)
    except Exception as exc:  # noqa: BLE001 - reported per request by the caller
        return exc
