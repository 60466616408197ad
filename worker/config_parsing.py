"""Reading the tables of a model's ``config.toml``: each section checked, then made a value.

One function per section (:mod:`worker.config_sections` holds what they make) and the bounds
its values are held to. Every problem is a :class:`~worker.errors.ConfigError` naming the file
and what is wrong; a key the worker does not know is one too (a typo must not be ignored).
Checks across sections, and the file as a whole, are :meth:`worker.model_config.ModelConfig.load`.

Parsing only: no torch, no Kafka.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from worker.config_sections import (
    EXTRA_INPUTS,
    MAX_CACHE_BYTES,
    MAX_INSTANCES,
    MAX_SHAPE_DIMENSIONS,
    MAX_VOCAB_SIZE,
    PRECISIONS,
    TOKENIZER_FEEDS,
    CacheConfig,
    Routing,
    TensorSpec,
    TokenizerConfig,
    VersionPolicy,
    check_device,
)
from worker.domain import BYTES, DATATYPES
from worker.errors import ConfigError

__all__ = [
    "MAX_BATCH_DELAY_MS",
    "MAX_BATCH_SIZE",
    "MAX_BATCH_TOKENS",
    "MAX_TOKENIZER_LENGTH",
    "batching",
    "cache",
    "choice",
    "execution_keys",
    "extra_input",
    "max_batch_tokens",
    "only",
    "routing",
    "table",
    "tables",
    "tensor_spec",
    "tokenizer",
    "version_policy",
]

MAX_BATCH_SIZE = 65_536
"""The largest ``max_batch_size`` a config may ask for (the exported programs' batch bound)."""
MAX_BATCH_DELAY_MS = 60_000.0
MAX_BATCH_TOKENS = 16 * 1024 * 1024
MAX_TOKENIZER_LENGTH = 65_536


def table(raw: Mapping[str, Any], key: str, path: Path) -> Mapping[str, Any]:
    """The table ``[key]`` (empty when left out)."""
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: [{key}] must be a table, not {type(value).__name__}")
    return value


def tables(raw: Mapping[str, Any], key: str, path: Path) -> list[Mapping[str, Any]]:
    """The array of tables ``[[key]]`` (KeyError when left out)."""
    value = raw[key]
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise ConfigError(f"{path}: {key} must be an array of tables ([[{key}]])")
    return value


def only(raw: Mapping[str, Any], known: set[str], what: str, path: Path) -> None:
    """Refuse keys outside ``known`` (a typo must not be ignored)."""
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{path}: unknown {what} {sorted(unknown)}")


def choice(value: Any, choices: Sequence[str], key: str, path: Path) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{path}: {key} = {value!r}; expected one of {', '.join(choices)}")
    return str(value)


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def execution_keys(raw: Mapping[str, Any], path: Path) -> tuple[str | None, str | None, int | None]:
    """``device``, ``precision``, ``instances`` (None where the config leaves them out)."""
    device = raw.get("device")
    if device is not None:
        try:
            check_device(device)
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    precision = raw.get("precision")
    if precision is not None:
        choice(precision, PRECISIONS, "precision", path)
    instances = raw.get("instances")
    if instances is not None and not _whole(instances, 1, MAX_INSTANCES):
        raise ConfigError(
            f"{path}: instances = {instances!r}; expected a whole number from 1 to {MAX_INSTANCES}"
        )
    return device, precision, instances


def max_batch_tokens(raw: Mapping[str, Any], path: Path) -> int | None:
    """``[batching] max_batch_tokens`` (None when left out)."""
    tokens = raw.get("max_batch_tokens")
    if tokens is not None and not _whole(tokens, 1, MAX_BATCH_TOKENS):
        raise ConfigError(
            f"{path}: batching.max_batch_tokens = {tokens!r}; expected a whole number from 1 to "
            f"{MAX_BATCH_TOKENS}"
        )
    return tokens


def extra_input(raw: Mapping[str, Any], path: Path) -> str:
    """``[padding] extra_input``: what a sequence model gets after its inputs."""
    only(raw, {"extra_input"}, "[padding] key(s)", path)
    return choice(raw.get("extra_input", "none"), EXTRA_INPUTS, "padding.extra_input", path)


def tokenizer(raw: Mapping[str, Any], path: Path) -> TokenizerConfig | None:
    """The ``[tokenizer]`` table (None when there is none)."""
    if "tokenizer" not in raw:
        return None
    given = table(raw, "tokenizer", path)
    only(given, {"file", "max_length", "feeds"}, "[tokenizer] key(s)", path)
    default = TokenizerConfig()
    file = given.get("file", default.file)
    if not isinstance(file, str) or not file or "/" in file or "\\" in file or file[0] == ".":
        raise ConfigError(
            f"{path}: tokenizer.file = {file!r}; expected a file name in the version folder"
        )
    max_length = given.get("max_length", default.max_length)
    if not _whole(max_length, 2, MAX_TOKENIZER_LENGTH):
        raise ConfigError(
            f"{path}: tokenizer.max_length = {max_length!r}; expected a whole number from 2 to "
            f"{MAX_TOKENIZER_LENGTH}"
        )
    feeds = given.get("feeds", list(default.feeds))
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


def batching(raw: Mapping[str, Any], path: Path) -> tuple[int | None, float | None]:
    """``[batching]``: ``max_batch_size`` and ``max_batch_delay_ms`` (None where left out)."""
    only(
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


def cache(raw: Mapping[str, Any], path: Path) -> CacheConfig:
    """``[cache]``: ``max_bytes`` of each version's response cache (0 or left out: none)."""
    only(raw, {"max_bytes"}, "[cache] key(s)", path)
    size = raw.get("max_bytes", 0)
    if not _whole(size, 0, MAX_CACHE_BYTES):
        raise ConfigError(
            f"{path}: cache.max_bytes = {size!r}; expected a whole number of bytes from 0 (no "
            f"cache) to {MAX_CACHE_BYTES}"
        )
    return CacheConfig(int(size))


def version_policy(raw: Mapping[str, Any], path: Path) -> VersionPolicy:
    """``[version_policy]``: all, ``latest`` N or ``specific`` versions."""
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


def routing(raw: Mapping[str, Any], path: Path) -> Routing:
    """``[routing]``: default version, canary split, shadow."""
    only(raw, {"default_version", "split", "shadow", "shadow_compare"}, "[routing] key(s)", path)
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


def tensor_spec(raw: Mapping[str, Any], path: Path) -> TensorSpec:
    """One ``[[inputs]]`` or ``[[outputs]]`` table."""
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
        str(raw["name"]), datatype, shape, bool(raw.get("allow_non_finite", False)), float(pad),
        _vocab_size(raw, datatype, path),
    )  # fmt: skip


def _vocab_size(raw: Mapping[str, Any], datatype: str, path: Path) -> int | None:
    """A tensor's ``vocab_size`` (None when left out): a whole number, on integer ids only."""
    vocab = raw.get("vocab_size")
    if vocab is None:
        return None
    if not _whole(vocab, 1, MAX_VOCAB_SIZE):
        raise ConfigError(
            f"{path}: tensor {raw['name']!r} vocab_size = {vocab!r}; expected a whole number "
            f"from 1 to {MAX_VOCAB_SIZE}"
        )
    if datatype not in DATATYPES or DATATYPES[datatype].kind not in "iu":
        raise ConfigError(
            f"{path}: tensor {raw['name']!r}: vocab_size is for integer inputs (token ids), "
            f"not {datatype}"
        )
    return int(vocab)
