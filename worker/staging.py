"""A batch between host and device memory: its arguments to the device, its outputs back.

On a GPU a batch is assembled in page-locked host memory (:func:`pinned`) and copied on the
calling thread's copy stream without blocking (:func:`to_device`), so the copy overlaps the
compute of the batch before it; the compute stream waits on the copy's event
(:class:`Staged`), then records when the batch's compute begins (:class:`Launched`). Its
outputs are copied back without blocking, an event recorded after the copies
(:func:`copy_back`); :meth:`Fetched.wait` waits on that event alone (a blocking-sync event:
the thread sleeps, no core spins), so the host can launch the next batch first and the device
never idles between batches. On the CPU the arrays are used where they are. These are the
upload and download ends of :class:`~worker.model.LoadedModel`'s forward steps.

Blocking calls, no Kafka, no asyncio.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

__all__ = [
    "Fetched",
    "Launched",
    "Staged",
    "copy_back",
    "pinned",
    "to_device",
    "torch_dtype_of",
    "use_copy_stream",
]


@dataclass(slots=True)
class Staged:
    """A batch's program arguments on its device (the copy may still be under way)."""

    args: list[torch.Tensor]
    ready: torch.cuda.Event | None = None
    """CUDA: recorded on the copy stream after the copies; the compute stream waits on it."""
    host: list[torch.Tensor] = field(default_factory=list)
    """CUDA: the pinned host buffers, kept alive until the copies are done."""


def to_device(values: Sequence[Any], device: torch.device) -> Staged:
    """Arrays to ``device``: on a GPU, copied on the thread's copy stream (not waited for)."""
    host = [torch.from_numpy(_writable(np.asarray(v))) for v in values]
    if device.type != "cuda":
        return Staged(host)
    with torch.cuda.stream(_copy_stream(device)):
        args = [t.to(device, non_blocking=True) for t in host]
        ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
        ready.record()
    return Staged(args, ready, host)


@dataclass(slots=True)
class Launched:
    """A batch's outputs on its device (on a GPU: still being computed)."""

    outputs: tuple[torch.Tensor, ...]
    began: torch.cuda.Event | None = None
    """CUDA: recorded on the compute stream when the batch's compute begins (its timing)."""


@dataclass(slots=True)
class Fetched:
    """A batch's outputs on their way to the host: :meth:`wait` has them as arrays."""

    tensors: list[torch.Tensor]
    """In host memory (on a GPU: pinned, being filled until ``done``)."""
    done: torch.cuda.Event | None = None
    """CUDA: recorded on the compute stream after the copies back."""
    began: torch.cuda.Event | None = None

    def wait(self) -> tuple[npt.NDArray[Any], ...]:
        """The outputs as host arrays, once their copies are done (one wait per batch)."""
        if self.done is not None:
            self.done.synchronize()
        return tuple(t.detach().numpy() for t in self.tensors)

    def device_seconds(self) -> float | None:
        """CUDA, after :meth:`wait`: the batch's time on the device, compute and copy back."""
        if self.began is None or self.done is None:
            return None
        return float(self.began.elapsed_time(self.done)) / 1000


def copy_back(
    tensors: Sequence[torch.Tensor], device: torch.device, began: torch.cuda.Event | None = None
) -> Fetched:
    """Start copying outputs on ``device`` to the host (on a GPU: queued, not waited for)."""
    if device.type != "cuda":
        return Fetched([t.cpu() for t in tensors])
    host = [t.to("cpu", non_blocking=True) for t in tensors]  # into pinned memory
    done = torch.cuda.Event(enable_timing=began is not None, blocking=True)  # type: ignore[no-untyped-call]
    done.record(torch.cuda.current_stream(device))
    return Fetched(host, done, began)


_streams = threading.local()


def _copies() -> dict[int, torch.cuda.Stream]:
    """The calling thread's copy streams, by device index."""
    by_device: dict[int, torch.cuda.Stream] | None = getattr(_streams, "copy", None)
    if by_device is None:
        by_device = _streams.copy = {}
    return by_device


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The calling thread's stream for host-to-device copies to ``device`` (overlapping compute).

    One per thread and device: a thread serving versions on two GPUs (the shadow thread) copies
    to each on a stream of that GPU. An instance thread's is its lease (:func:`use_copy_stream`);
    any other thread's comes from torch's pool.
    """
    by_device = _copies()
    stream = by_device.get(_index(device))
    if stream is None:
        stream = by_device[_index(device)] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    return stream


def use_copy_stream(device: torch.device, stream: torch.cuda.Stream) -> None:
    """Make ``stream`` the calling thread's copy stream for ``device`` (an instance's lease)."""
    _copies()[_index(device)] = stream


def pinned(shape: tuple[int, ...], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """An uninitialised array in page-locked host memory (fast, non-blocking copies)."""
    return torch.empty(shape, dtype=torch_dtype_of(dtype), pin_memory=True).numpy()


def torch_dtype_of(dtype: np.dtype[Any]) -> torch.dtype:
    """The torch dtype of a numpy dtype."""
    return torch.from_numpy(np.empty(0, dtype)).dtype


def _writable(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Torch wants writable memory; a lone request's array is a read-only view of its bytes."""
    if array.flags.writeable and array.flags.c_contiguous:
        return array
    return np.array(array, order="C")
