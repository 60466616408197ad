"""A model's ``config.toml``: inputs, outputs, batching, routing, where and how it runs.

Layout of the model repository (versions and routing: :mod:`worker.repository`; loading and
running a version: :mod:`worker.model`)::

    models/
      <name>/
        config.toml          inputs, outputs (name, datatype, shape; -1 = any), batching,
                             version_policy, routing, quantize ("none" or "int8"),
                             tokenizer, padding, device, precision, instances,
                             compile ("none" or "aot"), cache (response cache)
        <version>/           a folder per version, named by an integer ("1", "2", ...)
          model.pt2          a torch.export program (loaded without unpickling code)
          tokenizer.json     with a [tokenizer] table: the Hugging Face tokenizer
          metrics.json       optional: how the version was trained and evaluated

Variable lengths: an input or output whose second dimension is -1 is a *sequence*: requests of
different lengths share a batch, padded to the longest with the input's ``pad_value``; the
model can be given an ``attention_mask`` or the ``lengths`` as an extra last argument
(``[padding] extra_input``), and sequence outputs are cut back to each request's length. A
``[tokenizer]`` model takes one BYTES input of strings and feeds the program token ids.

Here: the whole config, its loading and the checks across its sections. The sections
themselves are :mod:`worker.config_sections` (re-exported here), each table's parsing
:mod:`worker.config_parsing`.

Parsing only: no torch, no Kafka. Every problem is a :class:`~worker.errors.ConfigError` naming
the file and what is wrong.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from worker import config_parsing as parse
from worker.config_sections import (
    COMPILE_MODES,
    DEFAULT_EXECUTION,
    DEVICE_PATTERN,
    EXTRA_INPUTS,
    MAX_INSTANCES,
    MAX_SHAPE_DIMENSIONS,
    ON_CPU,
    PRECISIONS,
    QUANTIZE_MODES,
    TOKENIZER_FEEDS,
    CacheConfig,
    Execution,
    Routing,
    TensorSpec,
    TokenizerConfig,
    VersionPolicy,
    check_device,
)
from worker.errors import ConfigError

__all__ = [
    "COMPILE_MODES",
    "CONFIG_FILE",
    "DEFAULT_EXECUTION",
    "DEVICE_PATTERN",
    "EXTRA_INPUTS",
    "MAX_INSTANCES",
    "MAX_SHAPE_DIMENSIONS",
    "MODEL_FILE",
    "ON_CPU",
    "PRECISIONS",
    "QUANTIZE_MODES",
    "TOKENIZER_FEEDS",
    "CacheConfig",
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


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What ``<name>/config.toml`` declares."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int | None = None
    max_batch_delay_ms: float | None = None
    version_policy: VersionPolicy = VersionPolicy()  # noqa: RUF009 - frozen: one default is safe
    routing: Routing = Routing()  # noqa: RUF009 - frozen: one default is safe
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
    compile: str = "none"
    """``"aot"``: the program is compiled with AOTInductor (:mod:`worker.compiling`)."""
    cache: CacheConfig = CacheConfig()  # noqa: RUF009 - frozen: one default is safe
    """``[cache]``: each version's response cache (off unless ``max_bytes`` > 0)."""

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
            "tokenizer", "padding", "device", "precision", "instances", "compile", "cache",
        }  # fmt: skip
        parse.only(raw, known, "section(s)", path)
        quantize = parse.choice(raw.get("quantize", "none"), QUANTIZE_MODES, "quantize", path)
        device, precision, instances = parse.execution_keys(raw, path)
        compile_mode = parse.choice(raw.get("compile", "none"), COMPILE_MODES, "compile", path)
        if compile_mode == "aot" and quantize == "int8":
            raise ConfigError(
                f'{path}: compile = "aot" cannot be combined with quantize = "int8" (the int8 '
                "layers are not compiled); choose one"
            )
        try:
            batching = parse.table(raw, "batching", path)
            max_batch_size, max_batch_delay_ms = parse.batching(batching, path)
            config = cls(
                name=folder.name,
                inputs=tuple(parse.tensor_spec(s, path) for s in parse.tables(raw, "inputs", path)),
                outputs=tuple(
                    parse.tensor_spec(s, path) for s in parse.tables(raw, "outputs", path)
                ),
                max_batch_size=max_batch_size,
                max_batch_delay_ms=max_batch_delay_ms,
                version_policy=parse.version_policy(parse.table(raw, "version_policy", path), path),
                routing=parse.routing(parse.table(raw, "routing", path), path),
                quantize=quantize,
                max_batch_tokens=parse.max_batch_tokens(batching, path),
                extra_input=parse.extra_input(parse.table(raw, "padding", path), path),
                tokenizer=parse.tokenizer(raw, path),
                device=device,
                precision=precision,
                instances=instances,
                compile=compile_mode,
                cache=parse.cache(parse.table(raw, "cache", path), path),
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
