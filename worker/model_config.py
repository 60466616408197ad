"""A model's ``config.toml``: inputs, outputs, batching, version policy, routing, quantize.

Layout of the model repository (versions and routing: :mod:`worker.repository`; loading and
running a version: :mod:`worker.model`)::

    models/
      <name>/
        config.toml          inputs, outputs (name, datatype, shape; -1 = any), batching,
                             version_policy, routing, quantize ("none" or "int8")
        <version>/           a folder per version, named by an integer ("1", "2", ...)
          model.pt2          a torch.export program (loaded without unpickling code)
          metrics.json       optional: how the version was trained and evaluated

Parsing only: no torch, no Kafka. Every problem is a :class:`~worker.errors.ConfigError` naming
the file and what is wrong.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.codec import DATATYPES
from worker.errors import ConfigError

__all__ = [
    "CONFIG_FILE",
    "MODEL_FILE",
    "QUANTIZE_MODES",
    "ModelConfig",
    "Routing",
    "TensorSpec",
    "VersionPolicy",
]

MODEL_FILE = "model.pt2"
CONFIG_FILE = "config.toml"
QUANTIZE_MODES = ("none", "int8")
"""Values of a model's ``quantize`` key: float as exported, or int8 dynamic quantisation."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, OIP datatype and shape (``-1`` for any size) of a model input or output."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    allow_non_finite: bool = False
    """Inputs only: accept NaN and infinity in a floating-point input."""

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
class ModelConfig:
    """What ``<name>/config.toml`` declares."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int | None = None
    max_batch_delay_ms: float | None = None
    version_policy: VersionPolicy = VersionPolicy()
    routing: Routing = Routing()
    quantize: str = "none"
    """``"int8"``: the program's linear layers run with int8 dynamic quantisation."""

    @classmethod
    def load(cls, folder: Path) -> ModelConfig:
        """Parse ``folder/config.toml``; raise :class:`ConfigError` naming file and problem."""
        path = folder / CONFIG_FILE
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read model config: {exc}") from exc
        known = {"inputs", "outputs", "batching", "version_policy", "routing", "quantize"}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}")
        quantize = raw.get("quantize", "none")
        if quantize not in QUANTIZE_MODES:
            raise ConfigError(
                f"{path}: quantize = {quantize!r}; expected one of {', '.join(QUANTIZE_MODES)}"
            )
        try:
            max_batch_size, max_batch_delay_ms = _batching(_table(raw, "batching", path), path)
            config = cls(
                name=folder.name,
                inputs=tuple(_spec(s, path) for s in _tables(raw, "inputs", path)),
                outputs=tuple(_spec(s, path) for s in _tables(raw, "outputs", path)),
                max_batch_size=max_batch_size,
                max_batch_delay_ms=max_batch_delay_ms,
                version_policy=_policy(_table(raw, "version_policy", path), path),
                routing=_routing(_table(raw, "routing", path), path),
                quantize=quantize,
            )
        except KeyError as exc:
            raise ConfigError(f"{path}: missing key {exc}") from exc
        except (TypeError, ValueError, AttributeError) as exc:  # a value of the wrong kind
            raise ConfigError(f"{path}: invalid value: {type(exc).__name__}: {exc}") from exc
        if not config.inputs or not config.outputs:
            raise ConfigError(f"{path}: needs at least one [[inputs]] and one [[outputs]]")
        compare = config.routing.shadow_compare
        if compare is not None and compare not in {s.name for s in config.outputs}:
            raise ConfigError(f"{path}: routing.shadow_compare {compare!r} is not an output")
        return config


MAX_BATCH_SIZE = 65_536
"""The largest ``max_batch_size`` a config may ask for (the exported programs' batch bound)."""
MAX_BATCH_DELAY_MS = 60_000.0


def _table(raw: Mapping[str, Any], key: str, path: Path) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: [{key}] must be a table, not {type(value).__name__}")
    return value


def _tables(raw: Mapping[str, Any], key: str, path: Path) -> list[Mapping[str, Any]]:
    value = raw[key]
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise ConfigError(f"{path}: {key} must be an array of tables ([[{key}]])")
    return value


def _batching(raw: Mapping[str, Any], path: Path) -> tuple[int | None, float | None]:
    unknown = set(raw) - {"max_batch_size", "max_batch_delay_ms"}
    if unknown:
        raise ConfigError(f"{path}: unknown [batching] key(s) {sorted(unknown)}")
    size = raw.get("max_batch_size")
    if size is not None and (
        isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_BATCH_SIZE
    ):
        raise ConfigError(
            f"{path}: batching.max_batch_size = {size!r}; expected a whole number from 1 to "
            f"{MAX_BATCH_SIZE}"
        )
    delay = raw.get("max_batch_delay_ms")
    if delay is not None and (
        isinstance(delay, bool)
        or not isinstance(delay, int | float)
        or not 0 <= delay <= MAX_BATCH_DELAY_MS  # NaN fails this too
    ):
        raise ConfigError(
            f"{path}: batching.max_batch_delay_ms = {delay!r}; expected a number of "
            f"milliseconds from 0 to {MAX_BATCH_DELAY_MS:g}"
        )
    return size, None if delay is None else float(delay)


def _policy(raw: Mapping[str, Any], path: Path) -> VersionPolicy:
    chosen = set(raw) & {"all", "latest", "specific"}
    if set(raw) - chosen or len(chosen) > 1:
        raise ConfigError(
            f"{path}: [version_policy] takes exactly one of all = true, latest = N, "
            f'specific = ["1", ...]; found {sorted(raw)}'
        )
    if "latest" in raw:
        if not isinstance(raw["latest"], int) or raw["latest"] < 1:
            raise ConfigError(f"{path}: version_policy.latest must be a whole number >= 1")
        return VersionPolicy(latest=raw["latest"])
    if "specific" in raw:
        return VersionPolicy(specific=tuple(str(v) for v in raw["specific"]))
    return VersionPolicy()


def _routing(raw: Mapping[str, Any], path: Path) -> Routing:
    unknown = set(raw) - {"default_version", "split", "shadow", "shadow_compare"}
    if unknown:
        raise ConfigError(f"{path}: unknown [routing] key(s) {sorted(unknown)}")
    weights = raw.get("split", {})
    if not isinstance(weights, Mapping):
        raise ConfigError(f'{path}: routing.split must be a table like {{ "1" = 90, "2" = 10 }}')
    split = tuple((str(v), w) for v, w in weights.items())
    if any(not isinstance(w, int) or w < 0 for _, w in split) or (
        split and sum(w for _, w in split) == 0
    ):
        raise ConfigError(f"{path}: routing.split weights must be whole numbers >= 0, not all 0")

    def version(key: str) -> str | None:
        value = raw.get(key)
        return None if value is None else str(value)

    return Routing(version("default_version"), split, version("shadow"), raw.get("shadow_compare"))


MAX_SHAPE_DIMENSIONS = 32
"""Most dimensions a model input or output may declare (requests are held to the same)."""


def _spec(raw: Mapping[str, Any], path: Path) -> TensorSpec:
    datatype = raw["datatype"]
    if datatype not in DATATYPES:
        raise ConfigError(
            f"{path}: tensor {raw.get('name')!r} has datatype {datatype!r}; "
            f"expected one of {', '.join(DATATYPES)}"
        )
    dims = raw["shape"]
    if (
        not isinstance(dims, list)
        or not 1 <= len(dims) <= MAX_SHAPE_DIMENSIONS
        or any(isinstance(d, bool) or not isinstance(d, int) or (d < 1 and d != -1) for d in dims)
    ):
        raise ConfigError(
            f"{path}: tensor {raw.get('name')!r} shape = {dims!r}; expected 1 to "
            f"{MAX_SHAPE_DIMENSIONS} whole numbers, each -1 (any size) or at least 1"
        )
    shape = tuple(dims)
    if shape[0] != -1:
        raise ConfigError(f"{path}: tensor {raw['name']!r} shape {list(shape)} must start with -1")
    return TensorSpec(str(raw["name"]), datatype, shape, bool(raw.get("allow_non_finite", False)))
