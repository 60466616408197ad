"""Forward passes over batches: running them, pipelined, and isolating the requests that fail.

:func:`run_batches` runs a run of batches with the next batch's assembly and copy overlapping
the current one's compute (the three steps of a :class:`~worker.program.Program` such as
:class:`~worker.model.LoadedModel`: upload, launch, download); a batch that fails (a bad
request, or out of memory) is split in halves until the failing requests are alone
(:func:`run_isolated`); a request that alone does not fit in memory gets RESOURCE_EXHAUSTED.
A device that fails for good (a sticky CUDA error, :func:`worker.device.is_device_lost`) is
never retried: :class:`~worker.errors.DeviceLostError` ends the run, and the worker.
Assembling a batch and cutting its outputs back (:func:`stack_inputs`, :func:`split_outputs`,
re-exported here) is :mod:`worker.stacking`; the copies to and from the device
:mod:`worker.staging`.

Blocking calls, no Kafka, no asyncio: the worker runs them in a version's instances.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from worker.device import ensure_usable, is_device_lost, is_out_of_memory, mark_lost, release_cache
from worker.domain import Tensor
from worker.errors import ErrorCode, RequestError
from worker.prepared import Prepared
from worker.program import Program
from worker.stacking import Empty, split_outputs, stack_inputs
from worker.staging import Staged

__all__ = [
    "Empty",
    "Run",
    "Staged",
    "run_batches",
    "run_isolated",
    "split_outputs",
    "stack_inputs",
]


def run_isolated(model: Program, per_request: Sequence[Prepared]) -> list[list[Tensor] | Exception]:
    """Run a batch; if the model raises, split it in halves until the failing requests are alone.

    Every request gets its outputs, or the exception its own rows raise: one bad request costs
    its batch about log2(batch size) extra forward passes, never the good requests' results.
    Out of memory is handled the same way (cached device memory released first): a batch too
    big is split until its halves fit; a request that alone does not fit gets
    RESOURCE_EXHAUSTED. A device that cannot recover raises
    :class:`~worker.errors.DeviceLostError` instead (nothing is retried on it). Blocking: call
    it off the event loop.
    """
    ensure_usable(model.device)
    try:
        outputs = model.predict(stack_inputs(model, per_request))
        return list(split_outputs(model, outputs, per_request))
    except Exception as exc:  # noqa: BLE001 - a model may raise anything; it is reported per request
        error = _detached(exc)
    return _isolate(model, per_request, error)  # out of the handler: the failed pass is gone


def _detached(exc: Exception) -> Exception:
    """``exc`` without its traceback and chained exceptions, which hold the failed pass.

    A traceback references the frames of the forward pass that raised, and so its input,
    intermediate and output tensors: kept, they keep the memory of the failed attempt in use
    while its halves are retried (which then fail too). Only the exception's type and
    message are reported (:func:`worker.answers.model_response`), so nothing is lost.
    """
    exc.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None
    return exc


def _isolate(
    model: Program, per_request: Sequence[Prepared], error: Exception
) -> list[list[Tensor] | Exception]:
    """After ``error`` (detached) on the whole batch: each half on its own.

    A lone request gets the error. Out of memory: the device's cached blocks are released
    first; the caller holds nothing of the failed attempt by then. A device left broken
    raises :class:`~worker.errors.DeviceLostError`: every retry on it would fail.
    """
    if is_device_lost(error, model.device):
        raise mark_lost(model.device, error) from error
    if is_out_of_memory(error):
        release_cache(model.device)
        if len(per_request) == 1:
            return [_too_big(model, per_request[0])]
    if len(per_request) == 1:
        return [error]
    del error
    middle = len(per_request) // 2
    return run_isolated(model, per_request[:middle]) + run_isolated(model, per_request[middle:])


def _too_big(model: Program, alone: Prepared) -> RequestError:
    """RESOURCE_EXHAUSTED for a request that alone does not fit (the OOM is not chained)."""
    shape = f"{alone.rows} row(s)" + (f" x {alone.length}" if model.config.is_sequence else "")
    return RequestError(
        ErrorCode.RESOURCE_EXHAUSTED,
        f"model {model.name} v{model.version} ran out of memory on {model.device} with this "
        f"request alone ({shape}): send fewer or shorter rows per request",
    )


Run = list[tuple[float, float, list[list[Tensor] | Exception]]]
"""Per batch of a run: when it began (seconds after the first), its compute time, results."""


def run_batches(model: Program, batches: Sequence[Sequence[Prepared]]) -> Run:
    """Run batches back to back (blocking): each batch's outputs, or its requests' errors.

    Pipelined: once a batch is launched, the next one is assembled and its copy started while
    the device computes (on a GPU the launch returns at once); then the outputs come back. A
    batch that fails anywhere goes through :func:`run_isolated`'s halving. Raises
    :class:`~worker.errors.DeviceLostError` if the device fails for good (or had failed).
    """
    ensure_usable(model.device)
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
            error = _detached(results)
            del results
            current = launched = None  # nothing of the failed attempt stays referenced
            if is_out_of_memory(error):
                staged = None  # the next batch's copy is given up too; it is staged again
            results = _isolate(model, batch, error)  # releases cached memory on out of memory
            del error
        out.append((began - first, time.monotonic() - began, results))
        del current, launched  # not alive while the next batch is launched
        if staged is None and following is not None:
            staged = _attempt(model.stage, following)
    return out


def _finish(
    model: Program, batch: Sequence[Prepared]
) -> Callable[[tuple[torch.Tensor, ...]], list[list[Tensor]]]:
    """Outputs of a launched batch, back on the host and cut per request."""
    return lambda launched: split_outputs(model, model.download(launched), batch)


def _attempt(call: Callable[[Any], Any], value: Any) -> Any:
    """``call(value)``, or the exception it raised."""
    try:
        return call(value)
    except Exception as exc:  # noqa: BLE001 - reported per request by the caller
        return exc
