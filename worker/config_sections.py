"""A model's ``config.toml`` section by section, as values: tensors, versions, routing, execution.

Each section is a frozen dataclass with the defaults a config that leaves it out gets; beside
them, the values a key may take (:data:`PRECISIONS`, :data:`DEVICE_PATTERN`, ...). Reading
them from the file is :mod:`worker.config_parsing`; the whole config is
:class:`worker.model_config.ModelConfig`.

Values only: no torch, no Kafka, no files.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "COMPILE_MODES",
    "DEFAULT_EXECUTION",
    "DEVICE_PATTERN",
    "EXTRA_INPUTS",
    "MAX_CACHE_BYTES",
    "MAX_INSTANCES",
    "MAX_SHAPE_DIMENSIONS",
    "MAX_VOCAB_SIZE",
    "ON_CPU",
    "PRECISIONS",
    "QUANTIZE_MODES",
    "TOKENIZER_FEEDS",
    "CacheConfig",
    "Execution",
    "Routing",
    "TensorSpec",
    "TokenizerConfig",
    "VersionPolicy",
    "check_device",
]

TOKENIZER_FEEDS = ("input_ids", "attention_mask", "token_type_ids")
"""What a ``[tokenizer]`` step can feed the program (``tokenizer.feeds``)."""
EXTRA_INPUTS = ("none", "attention_mask", "lengths")
"""Values of ``[padding] extra_input``: what a sequence model gets after its inputs."""
QUANTIZE_MODES = ("none", "int8")
"""Values of a model's ``quantize`` key: float as exported, or int8 dynamic quantisation."""
COMPILE_MODES = ("none", "aot")
"""Values of a model's ``compile`` key: eager, or AOTInductor (:mod:`worker.compiling`)."""
PRECISIONS = ("fp32", "fp16", "bf16")
"""Values of ``precision``: as exported, or weights and float inputs cast to half precision."""
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:(0|[1-9][0-9]?))?")
"""Values of ``device`` (a CUDA index below 100)."""
MAX_INSTANCES = 64
"""Most instances of one version (each is a thread)."""
MAX_SHAPE_DIMENSIONS = 32
"""Most dimensions a model input or output may declare (requests are held to the same)."""
MAX_VOCAB_SIZE = 2**31
"""Largest ``vocab_size`` of an integer input."""
MAX_CACHE_BYTES = 2**40
"""Largest ``[cache] max_bytes`` (1 TiB: a bound on typos, not a recommendation)."""


def check_device(value: object) -> str:
    """``value`` if it is a device name the worker takes; ValueError saying which otherwise."""
    if not isinstance(value, str) or DEVICE_PATTERN.fullmatch(value) is None:
        raise ValueError(f"device {value!r}: expected auto, cpu, cuda or cuda:N (N below 100)")
    return value


@dataclass(frozen=True, slots=True)
class Execution:
    """Where a version runs: device, precision and how many batches at once (instances)."""

    device: str = "auto"
    """``auto`` (the first CUDA device when there is one, else the CPU), ``cpu``, ``cuda[:N]``."""
    precision: str = "fp32"
    instances: int = 1


DEFAULT_EXECUTION = Execution()
ON_CPU = Execution(device="cpu")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, OIP datatype and shape (``-1`` for any size) of a model input or output."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    allow_non_finite: bool = False
    """Inputs only: accept NaN and infinity in a floating-point input."""
    pad_value: float = 0.0
    """Sequence inputs only: what the batch is padded with beyond a request's length."""
    vocab_size: int | None = None
    """Integer inputs only: ids must lie in ``[0, vocab_size)`` (the rows of the embedding they
    index); others are refused at admission. On a GPU an index out of range is a device-side
    assert, which breaks the process's CUDA context."""

    @property
    def is_sequence(self) -> bool:
        """True when the second dimension is -1: a variable length, padded per batch."""
        return len(self.shape) > 1 and self.shape[1] == -1

    def describe(self) -> str:
        """E.g. ``pixels FP32 [-1, 64]``."""
        return f"{self.name} {self.datatype} {list(self.shape)}"


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """Which version folders are served: all (default), the ``latest`` N, or ``specific`` ones."""

    latest: int | None = None
    specific: tuple[str, ...] | None = None

    def select(self, available: Sequence[str]) -> list[str]:
        """The served versions among those on disk, oldest first."""
        ordered = sorted(available, key=int)
        if self.specific is not None:
            return [v for v in ordered if v in self.specific]
        if self.latest is not None:
            return ordered[-self.latest :]
        return ordered


@dataclass(frozen=True, slots=True)
class Routing:
    """Where requests that name no version go, and which version shadows the traffic."""

    default_version: str | None = None
    """Version for requests naming none (default: the highest served)."""
    split: tuple[tuple[str, int], ...] = ()
    """Canary: (version, weight) pairs for requests naming no version; stable per request id."""
    shadow: str | None = None
    """A version that gets a copy of the primary traffic; its results are compared, not sent."""
    shadow_compare: str | None = None
    """Output compared between primary and shadow (default: the last output)."""


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """``[cache]``: each version's response cache (:mod:`worker.response_cache`)."""

    max_bytes: int = 0
    """Most bytes a version's cache holds (entries counted at their real size); 0: no cache."""


@dataclass(frozen=True, slots=True)
class TokenizerConfig:
    """``[tokenizer]``: strings in the model's one BYTES input become token ids."""

    file: str = "tokenizer.json"
    """In the version folder."""
    max_length: int = 512
    """Strings are cut to this many tokens (special tokens included)."""
    feeds: tuple[str, ...] = ("input_ids", "attention_mask")
    """The program's arguments, in order: ``input_ids``, ``attention_mask``, ``token_type_ids``."""
