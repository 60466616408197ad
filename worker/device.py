"""Where and how a model version runs: device, precision and instances.

A model's ``config.toml`` may say ``device``, ``precision`` and ``instances``; what it leaves out
comes from the settings (``WORKER_MODELS__DEVICE``, ``__PRECISION``, ``__INSTANCES``):

- ``device``: ``"auto"`` (the first CUDA device when there is one, else the CPU), ``"cpu"``,
  ``"cuda"`` or ``"cuda:N"``. Asking for CUDA where there is none fails at start-up, saying so.
- ``precision``: ``"fp32"`` (as exported), ``"fp16"`` or ``"bf16"``: the program's weights and
  floating-point inputs are cast to it; outputs go back in the datatype the config declares.
- ``instances``: how many batches of the version run at once, each in its own thread (and, on
  a GPU, its own CUDA streams). The instances share one copy of the weights (read-only).

Parsing those values is :mod:`worker.model_config` (no torch); here: what a device value
means on this machine, the precision's torch dtype, recognising an out-of-memory error (a
batch too big for the device) and a device that cannot recover (:func:`is_device_lost`; once
one is, :func:`mark_lost` records it and :func:`ensure_usable` refuses it), and the memory a
CUDA device holds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from worker.errors import ConfigError, DeviceLostError
from worker.model_config import check_device

__all__ = [
    "STICKY_ERRORS",
    "ensure_usable",
    "forget_lost",
    "is_device_lost",
    "is_out_of_memory",
    "lost_devices",
    "mark_lost",
    "memory",
    "release_cache",
    "resolve_device",
    "torch_dtype",
]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a ``precision`` name."""
    return _DTYPES[precision]


def resolve_device(
    requested: str,
    *,
    available: Callable[[], bool] = torch.cuda.is_available,
    count: Callable[[], int] = torch.cuda.device_count,
) -> torch.device:
    """The device a ``device`` value means on this machine; ConfigError if it is not here."""
    check_device(requested)
    if requested == "auto":
        return torch.device("cuda", 0) if available() else torch.device("cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if not available():
        build = torch.version.cuda
        raise ConfigError(
            f'device = "{requested}" but no CUDA device is present (torch {torch.__version__}, '
            + (f"built for CUDA {build}" if build else "a CPU-only build")
            + '); use device = "auto" (CUDA when present, else the CPU) or "cpu", or run it '
            "where a GPU is visible (Compose profile gpu, Kubernetes nvidia.com/gpu)"
        )
    index = int(requested.partition(":")[2] or 0)
    present = count()
    if index >= present:
        raise ConfigError(
            f'device = "{requested}" but this machine has {present} CUDA device(s) '
            f"(cuda:0 to cuda:{present - 1})"
        )
    return torch.device("cuda", index)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device (or host) allocation failure: a batch too big, not a bad request."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text.lower() or "can't allocate memory" in text
    )


STICKY_ERRORS = (
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "uncorrectable ECC error",
    "launch timed out",
    "hardware stack error",
    "an illegal address",
)
"""Fragments of CUDA's errors after which the process's context is broken ("sticky"): every
later call on it fails too (torch raises them as ``torch.AcceleratorError``, a RuntimeError)."""


def _synchronize(device: torch.device) -> None:
    torch.cuda.synchronize(device)


def is_device_lost(
    exc: BaseException,
    device: torch.device,
    *,
    probe: Callable[[torch.device], None] = _synchronize,
) -> bool:
    """True if ``exc`` left ``device`` unusable: retrying on it would fail every later batch.

    A sticky CUDA error (:data:`STICKY_ERRORS`, by message: a device-side assert such as an
    out-of-range index, an illegal memory access, a launch failure), never out of memory. On a
    CUDA device any other error is also checked by ``probe`` (synchronising the device): a
    broken context fails that too, whatever the first message said.
    """
    if is_out_of_memory(exc):
        return False
    if isinstance(exc, RuntimeError) and any(f in str(exc) for f in STICKY_ERRORS):
        return True
    if device.type != "cuda":
        return False
    try:
        probe(device)
    except Exception:  # noqa: BLE001 - whatever it raises, the context is broken
        return True
    return False


_lost: dict[str, str] = {}
"""Devices that failed for good in this process: device name -> what happened."""
_lost_lock = threading.Lock()


def mark_lost(device: torch.device, error: BaseException) -> DeviceLostError:
    """Record that ``device`` failed for good; the error that stops the worker, saying why."""
    first_line = (str(error).splitlines() or [""])[0]
    what = f"{type(error).__name__}: {first_line}"
    with _lost_lock:
        _lost.setdefault(str(device), what)
    return DeviceLostError(
        f"{device} failed and cannot recover ({what}); the worker stops so that a fresh "
        "process serves again (what was not answered is served again)"
    )


def ensure_usable(device: torch.device) -> None:
    """Raise :class:`DeviceLostError` if ``device`` failed for good earlier in this process."""
    what = _lost.get(str(device))
    if what is not None:
        raise DeviceLostError(f"{device} failed earlier and cannot recover ({what})")


def lost_devices() -> dict[str, str]:
    """Devices that failed for good in this process, and what happened (health: unhealthy)."""
    with _lost_lock:
        return dict(_lost)


def forget_lost() -> None:
    """Forget every lost device (tests: a process that lost one is otherwise done with it)."""
    with _lost_lock:
        _lost.clear()


def memory(device: torch.device) -> tuple[int, int]:
    """Bytes (allocated, reserved) by torch on a CUDA device; (0, 0) on the CPU."""
    if device.type != "cuda":
        return 0, 0
    return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)


def release_cache(device: torch.device) -> None:
    """After running out of memory: give the device's cached, unused blocks back."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
