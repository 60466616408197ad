"""Forward passes over batches: running them, pipelined, and isolating the requests that fail.

:func:`run_batches` runs a run of batches pipelined (the steps of a
:class:`~worker.program.Program` such as :class:`~worker.model.LoadedModel`: stage, launch,
fetch, collect): once a batch is launched and its copy back queued, the next batch is
assembled and its copy started, then launched, and only then does the host wait for the
batch before; on a GPU the device always has a batch queued. A batch that fails (a bad
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

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from worker.device import ensure_usable, is_device_lost, is_out_of_memory, mark_lost, release_cache
from worker.domain import Tensor
from worker.errors import ErrorCode, RequestError, detached
from worker.prepared import Prepared
from worker.program import Program
from worker.stacking import Empty, split_outputs, stack_inputs
from worker.staging import Fetched, Staged

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
        error = detached(exc)
    return _isolate(model, per_request, error)  # out of the handler: the failed pass is gone


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

Results = list[list[Tensor] | Exception]


@dataclass(slots=True)
class _Flight:
    """A launched batch whose outputs are on their way back."""

    batch: Sequence[Prepared]
    began: float
    """When its launch began (seconds after the run's first)."""
    launch_s: float
    staged: Staged | None
    """Its inputs, kept until its outputs are back."""
    fetched: Fetched | None


def run_batches(
    model: Program, batches: Sequence[Sequence[Prepared]], stop: threading.Event | None = None
) -> Run:
    """Run batches back to back (blocking): each batch's outputs, or its requests' errors.

    Pipelined: batch i is launched and its copy back queued; batch i+1 is assembled and its
    copy started; then the host waits for batch i-1's outputs and cuts them, while the device
    computes batch i (on a GPU launching and fetching return at once). A batch's compute time
    is its own: on a GPU its span on the device (events), elsewhere the host's time in its
    launch and in waiting for it; never the next batch's staging. A batch that fails anywhere
    goes through :func:`run_isolated`'s halving, after the batch before it is collected.
    Raises :class:`~worker.errors.DeviceLostError` if the device fails for good (or had).

    ``stop`` (set by the batcher when a high-priority request arrives): the run ends after the
    batches already launched or staged, and returns fewer results than batches; the caller
    hands the rest back to the batcher. Nothing of a batch not run is staged.
    """
    ensure_usable(model.device)
    first = time.monotonic()
    out: Run = []
    staged: Staged | Exception | None = None
    flight: _Flight | None = None
    for i, batch in enumerate(batches):
        if staged is None and i and stop is not None and stop.is_set():
            break  # preempted: the rest go back to the batcher
        if staged is None:  # the first batch, or the one after a failure
            staged = _attempt(model.stage, batch)
        began = time.monotonic()
        fetched = (
            _attempt(partial(_launch, model), staged) if isinstance(staged, Staged) else staged
        )
        launch_s = time.monotonic() - began
        current, staged = staged, None
        going_on = i + 1 < len(batches) and not (stop is not None and stop.is_set())
        if isinstance(fetched, Fetched) and going_on:
            staged = _attempt(model.stage, batches[i + 1])  # its copy overlaps this compute
        if flight is not None:  # the batch before: the device has this one queued meanwhile
            out.append(_land(model, flight))
            flight = None
        if isinstance(fetched, Fetched):
            assert isinstance(current, Staged)
            flight = _Flight(batch, began - first, launch_s, current, fetched)
        else:
            error = detached(fetched if isinstance(fetched, Exception) else RuntimeError("lost"))
            del fetched
            current = None  # nothing of the failed attempt stays referenced
            isolating = time.monotonic()
            results = _isolate(model, batch, error)  # releases cached memory on out of memory
            del error
            out.append((began - first, launch_s + time.monotonic() - isolating, results))
        del current
    if flight is not None:
        out.append(_land(model, flight))
    return out


def _launch(model: Program, staged: Staged) -> Fetched:
    """Launch a staged batch and queue its outputs' copy back."""
    return model.fetch(model.launch(staged))


def _land(model: Program, flight: _Flight) -> tuple[float, float, Results]:
    """A launched batch's results: its outputs waited for and cut, or its failure isolated."""
    waiting = time.monotonic()
    results = _attempt(partial(_collect, model, flight.batch), flight.fetched)
    if isinstance(results, Exception):
        error = detached(results)
        del results
        flight.staged = flight.fetched = None  # nothing of the failed attempt stays referenced
        results = _isolate(model, flight.batch, error)
        del error
        device_s = None
    else:
        device_s = flight.fetched.device_seconds() if flight.fetched is not None else None
    host_s = flight.launch_s + time.monotonic() - waiting
    return flight.began, host_s if device_s is None else device_s, results


def _collect(model: Program, batch: Sequence[Prepared], fetched: Fetched) -> list[list[Tensor]]:
    """A fetched batch's outputs, on the host and cut per request."""
    return split_outputs(model, model.collect(fetched), batch)


def _attempt(call: Callable[[Any], Any], value: Any) -> Any:
    """``call(value)``, or the exception it raised."""
    try:
        return call(value)
    except Exception as exc:  # noqa: BLE001 - reported per request by the caller
        return exc
