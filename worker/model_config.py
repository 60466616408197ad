"""A model's ``config.toml``: inputs, outputs, batching, routing, where and how it runs.

Layout of the model repository (versions and routing: :mod:`worker.repository`; loading and
running a version: :mod:`worker.model`)::

    models/
      <name>/
        config.toml          inputs, outputs (name, datatype, shape; -1 = any), batching,
                             version_policy, routing, quantize ("none" or "int8"),
                             tokenizer, padding, device, precision, instances
        <version>/           a folder per version, named by an integer ("1", "2", ...)
          model.pt2          a torch.export program (loaded without unpickling code)
          tokenizer.json     with a [tokenizer] table: the Hugging Face tokenizer
          metrics.json       optional: how the version was trained and evaluated

Variable lengths: an input or output whose second dimension is -1 is a *sequence*: requests of
different lengths share a batch, padded to the longest with the input's ``pad_value``; the
model can be given an ``attention_mask`` or the ``lengths`` as an extra last argument
(``[padding] extra_input``), and sequence outputs are cut back to each request's length. A
``[tokenizer]`` model takes one BYTES input of strings and feeds the program token ids.

Parsing only: no torch, no Kafka. Every problem is a :class:`~worker.errors.ConfigError` naming
the file and what is wrong.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.domain import BYTES, DATATYPES
from worker.errors import ConfigError

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_EXECUTION",
    "DEVICE_PATTERN",
    "EXTRA_INPUTS",
    "MAX_INSTANCES",
    "MODEL_FILE",
    "ON_CPU",
    "PRECISIONS",
    "QUANTIZE_MODES",
    "TOKENIZER_FEEDS",
    "Execution",
    "ModelConfig",
    "Routing",
    "TensorSpec",
    "TokenizerConfig",
    "VersionPolicy",
    "check_device",
]

MODEL_FILE = "model.pt2"
CONFIG_FILE = "config.toml"
TOKENIZER_FEEDS = ("input_ids", "attention_mask", "token_type_ids")
"""What a ``[tokenizer]`` step can feed the program (``tokenizer.feeds``)."""
EXTRA_INPUTS = ("none", "attention_mask", "lengths")
"""Values of ``[padding] extra_input``: what a sequence model gets after its inputs."""
QUANTIZE_MODES = ("none", "int8")
"""Values of a model's ``quantize`` key: float as exported, or int8 dynamic quantisation."""
PRECISIONS = ("fp32", "fp16", "bf16")
"""Values of ``precision``: as exported, or weights and float inputs cast to half precision."""
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:(0|[1-9][0-9]?))?")
"""Values of ``device`` (a CUDA index below 100)."""
MAX_INSTANCES = 64
"""Most instances of one version (each is a thread)."""


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
class TokenizerConfig:
    """``[tokenizer]``: strings in the model's one BYTES input become token ids."""

    file: str = "tokenizer.json"
    """In the version folder."""
    max_length: int = 512
    """Strings are cut to this many tokens (special tokens included)."""
    feeds: tuple[str, ...] = ("input_ids", "attention_mask")
    """The program's arguments, in order: ``input_ids``, ``attention_mask``, ``token_type_ids``."""


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
    max_batch_tokens: int | None = None
    """Sequence models: most padded tokens (rows x longest length) in one batch."""
    extra_input: str = "none"
    """Sequence models: ``attention_mask`` or ``lengths`` passed after the inputs."""
    tokenizer: TokenizerConfig | None = None
    device: str | None = None
    """None: the settings' default (``WORKER_MODELS__DEVICE``); likewise the next two."""
    precision: str | None = None
    instances: int | None = None

    def execution(self, defaults: Execution) -> Execution:
        """Device, precision and instances: this config's, else ``defaults``."""
        return Execution(
            self.device or defaults.device,
            self.precision or defaults.precision,
            self.instances or defaults.instances,
        )

    @property
    def is_sequence(self) -> bool:
        """True for a model whose inputs vary in length (padded per batch)."""
        return self.tokenizer is not None or any(s.is_sequence for s in self.inputs)

    @classmethod
    def load(cls, folder: Path) -> ModelConfig:
        """Parse ``folder/config.toml``; raise :class:`ConfigError` naming file and problem."""
        path = folder / CONFIG_FILE
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read model config: {exc}") from exc
        known = {
            "inputs", "outputs", "batching", "version_policy", "routing", "quantize",
            "tokenizer", "padding", "device", "precision", "instances",
        }  # fmt: skip
        _only(raw, known, "section(s)", path)
        quantize = _choice(raw.get("quantize", "none"), QUANTIZE_MODES, "quantize", path)
        device, precision, instances = _execution(raw, path)
        try:
            batching = _table(raw, "batching", path)
            max_batch_size, max_batch_delay_ms = _batching(batching, path)
            config = cls(
                name=folder.name,
                inputs=tuple(_spec(s, path) for s in _tables(raw, "inputs", path)),
                outputs=tuple(_spec(s, path) for s in _tables(raw, "outputs", path)),
                max_batch_size=max_batch_size,
                max_batch_delay_ms=max_batch_delay_ms,
                version_policy=_policy(_table(raw, "version_policy", path), path),
                routing=_routing(_table(raw, "routing", path), path),
                quantize=quantize,
                max_batch_tokens=_max_batch_tokens(batching, path),
                extra_input=_extra_input(_table(raw, "padding", path), path),
                tokenizer=_tokenizer(raw, path),
                device=device,
                precision=precision,
                instances=instances,
            )
        except KeyError as exc:
            raise ConfigError(f"{path}: missing key {exc}") from exc
        except (TypeError, ValueError, AttributeError) as exc:  # a value of the wrong kind
            raise ConfigError(f"{path}: invalid value: {type(exc).__name__}: {exc}") from exc
        if not config.inputs or not config.outputs:
            raise ConfigError(f"{path}: needs at least one [[inputs]] and one [[outputs]]")
        _check_sequences(config, path)
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


MAX_BATCH_TOKENS = 16 * 1024 * 1024
MAX_TOKENIZER_LENGTH = 65_536


def _only(raw: Mapping[str, Any], known: set[str], what: str, path: Path) -> None:
    """Refuse keys outside ``known`` (a typo must not be ignored)."""
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{path}: unknown {what} {sorted(unknown)}")


def _choice(value: Any, choices: Sequence[str], key: str, path: Path) -> str:
    if value not in choices:
        raise ConfigError(f"{path}: {key} = {value!r}; expected one of {', '.join(choices)}")
    return str(value)


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _execution(raw: Mapping[str, Any], path: Path) -> tuple[str | None, str | None, int | None]:
    """``device``, ``precision``, ``instances`` (None where the config leaves them out)."""
    device = raw.get("device")
    if device is not None:
        try:
            check_device(device)
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    precision = raw.get("precision")
    if precision is not None:
        _choice(precision, PRECISIONS, "precision", path)
    instances = raw.get("instances")
    if instances is not None and not _whole(instances, 1, MAX_INSTANCES):
        raise ConfigError(
            f"{path}: instances = {instances!r}; expected a whole number from 1 to {MAX_INSTANCES}"
        )
    return device, precision, instances


def _max_batch_tokens(raw: Mapping[str, Any], path: Path) -> int | None:
    tokens = raw.get("max_batch_tokens")
    if tokens is not None and not _whole(tokens, 1, MAX_BATCH_TOKENS):
        raise ConfigError(
            f"{path}: batching.max_batch_tokens = {tokens!r}; expected a whole number from 1 to "
            f"{MAX_BATCH_TOKENS}"
        )
    return tokens


def _extra_input(raw: Mapping[str, Any], path: Path) -> str:
    _only(raw, {"extra_input"}, "[padding] key(s)", path)
    return _choice(raw.get("extra_input", "none"), EXTRA_INPUTS, "padding.extra_input", path)


def _tokenizer(raw: Mapping[str, Any], path: Path) -> TokenizerConfig | None:
    if "tokenizer" not in raw:
        return None
    table = _table(raw, "tokenizer", path)
    _only(table, {"file", "max_length", "feeds"}, "[tokenizer] key(s)", path)
    default = TokenizerConfig()
    file = table.get("file", default.file)
    if not isinstance(file, str) or not file or "/" in file or "\\" in file or file[0] == ".":
        raise ConfigError(
            f"{path}: tokenizer.file = {file!r}; expected a file name in the version folder"
        )
    max_length = table.get("max_length", default.max_length)
    if not _whole(max_length, 2, MAX_TOKENIZER_LENGTH):
        raise ConfigError(
            f"{path}: tokenizer.max_length = {max_length!r}; expected a whole number from 2 to "
            f"{MAX_TOKENIZER_LENGTH}"
        )
    feeds = table.get("feeds", list(default.feeds))
    allowed = TOKENIZER_FEEDS
    if (
        not isinstance(feeds, list)
        or not feeds
        or any(f not in allowed for f in feeds)
        or len(set(feeds)) != len(feeds)
    ):
        raise ConfigError(
            f"{path}: tokenizer.feeds = {feeds!r}; expected distinct names among "
            f"{', '.join(allowed)}"
        )
    return TokenizerConfig(file, max_length, tuple(feeds))


def _check_sequences(config: ModelConfig, path: Path) -> None:
    """Where strings, variable lengths and token budgets may appear."""
    strings = [s for s in config.inputs if s.datatype == "BYTES"]
    if config.tokenizer is not None:
        if len(config.inputs) != 1 or not strings or strings[0].shape != (-1,):
            raise ConfigError(
                f"{path}: a [tokenizer] model takes exactly one input, of datatype BYTES and "
                "shape [-1] (one string per row)"
            )
        if config.extra_input != "none":
            raise ConfigError(
                f"{path}: padding.extra_input is for models without a tokenizer; list "
                '"attention_mask" in tokenizer.feeds instead'
            )
    elif strings:
        raise ConfigError(
            f"{path}: input {strings[0].name!r} is BYTES; strings need a [tokenizer] table"
        )
    if any(s.datatype == "BYTES" for s in config.outputs):
        raise ConfigError(f"{path}: outputs cannot be BYTES (a program returns tensors)")
    for spec in (*config.inputs, *config.outputs):
        if any(d == -1 for d in spec.shape[2:]):
            raise ConfigError(
                f"{path}: tensor {spec.name!r} shape {list(spec.shape)}: only the second "
                "dimension may be -1 (the sequence length, padded per batch)"
            )
    if not config.is_sequence and (config.extra_input != "none" or config.max_batch_tokens):
        raise ConfigError(
            f"{path}: padding.extra_input and batching.max_batch_tokens need a sequence input "
            "(second dimension -1) or a [tokenizer]"
        )


def _batching(raw: Mapping[str, Any], path: Path) -> tuple[int | None, float | None]:
    _only(
        raw, {"max_batch_size", "max_batch_delay_ms", "max_batch_tokens"}, "[batching] key(s)", path
    )
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
    _only(raw, {"default_version", "split", "shadow", "shadow_compare"}, "[routing] key(s)", path)
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
    if datatype not in DATATYPES and datatype != BYTES:
        raise ConfigError(
            f"{path}: tensor {raw.get('name')!r} has datatype {datatype!r}; "
            f"expected one of {', '.join(DATATYPES)}, {BYTES}"
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
    pad = raw.get("pad_value", 0)
    if isinstance(pad, bool) or not isinstance(pad, int | float) or pad != pad:  # noqa: PLR0124 - NaN
        raise ConfigError(f"{path}: tensor {raw['name']!r} pad_value = {pad!r}; expected a number")
    return TensorSpec(
        str(raw["name"]), datatype, shape, bool(raw.get("allow_non_finite", False)), float(pad)
    )
