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
batch too big for the device) and the memory a CUDA device holds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.errors import ConfigError
from worker.model_config import check_device

__all__ = [
    "is_out_of_memory",
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


def memory(device: torch.device) -> tuple[int, int]:
    """Bytes (allocated, reserved) by torch on a CUDA device; (0, 0) on the CPU."""
    if device.type != "cuda":
        return 0, 0
    return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)


def release_cache(device: torch.device) -> None:
    """After running out of memory: give the device's cached, unused blocks back."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
