"""The model repository: which versions of which models are served, routing, and reloads.

Per model, ``config.toml`` says which version folders are served (``[version_policy]``: all,
the latest N, or a specific list) and where requests go (``[routing]``):

- a request naming a served version gets it; naming any other version: NOT_FOUND;
- a request naming none gets ``default_version`` (default: the highest served version), or,
  with a ``split`` (canary), a version picked by weight from a hash of its correlation id, so
  the same id always lands on the same version;
- with ``shadow``, requests naming no version are also run on the shadow version; its result
  is compared with the primary's and counted, never sent.

:meth:`ModelRepository.reload` re-reads the folder: unchanged versions are reused without
reloading, new ones are loaded and checked, and a model whose new state fails to load keeps
serving its old state (the error is returned, to be logged). Nothing here touches Kafka.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from worker.errors import ConfigError, ErrorCode, RequestError, shown
from worker.handler import HANDLER_FILE
from worker.model import LoadedModel
from worker.model_config import (
    CONFIG_FILE,
    DEFAULT_EXECUTION,
    MODEL_FILE,
    Execution,
    ModelConfig,
)
from worker.records import record

__all__ = ["LoadOptions", "ModelRepository", "Route", "ServedModel", "split_bucket"]


def split_bucket(request_id: str, total: int) -> int:
    """A stable bucket in ``[0, total)`` for a correlation id (same id, same bucket)."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % total


@record
class Route:
    """Where one request goes."""

    primary: LoadedModel
    """The version that answers it."""
    shadow: LoadedModel | None = None
    """A version that also runs it, for comparison only (its result is never sent)."""


@dataclass(frozen=True)
class ServedModel:
    """One model: its config and its served versions, loaded."""

    config: ModelConfig
    versions: Mapping[str, LoadedModel]
    artifacts: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    """Per version, (mtime_ns, size) of its files when loaded: unchanged ones are reused."""

    @property
    def name(self) -> str:
        """The model's name (its folder)."""
        return self.config.name

    @cached_property  # versions and routing never change: a reload makes a new ServedModel
    def default_version(self) -> str:
        """Where requests naming no version go when there is no split."""
        return self.config.routing.default_version or max(self.versions, key=int)

    def route(self, version: str | None, request_id: str) -> Route:
        """Where a request goes: its version, and the shadow that gets a copy, if any.

        Raises :class:`RequestError` NOT_FOUND if the named version is not served. Only a
        request naming no version is shadowed (one that names a version asked for exactly it),
        and never onto the version that answers it.
        """
        if version:
            model = self.versions.get(version)
            if model is None:
                raise RequestError(
                    ErrorCode.NOT_FOUND,
                    f"model {self.name!r} has no version {shown(version)}; served: "
                    f"{', '.join(sorted(self.versions, key=int))}",
                )
            return Route(model)
        routing = self.config.routing
        primary = self.versions[self.default_version]
        if routing.split:
            bucket = split_bucket(request_id, sum(w for _, w in routing.split))
            for name, weight in routing.split:
                if bucket < weight:
                    primary = self.versions[name]
                    break
                bucket -= weight
        shadow = None if routing.shadow is None else self.versions[routing.shadow]
        return Route(primary, shadow if shadow is not primary else None)

    def check_routing(self) -> None:
        """Raise :class:`ConfigError` if routing names a version that is not served."""
        routing = self.config.routing
        named = [
            ("default_version", routing.default_version),
            ("shadow", routing.shadow),
            *(("split", v) for v, _ in routing.split),
        ]
        for key, version in named:
            if version is not None and version not in self.versions:
                raise ConfigError(
                    f"{self.name}/{CONFIG_FILE}: routing.{key} names version {version!r}, which "
                    f"is not served (served: {', '.join(sorted(self.versions, key=int))})"
                )


VERSION_FILES = (MODEL_FILE, "tokenizer.json", HANDLER_FILE)
"""A version's files whose change reloads it (those present)."""


def _artifacts(folder: Path) -> tuple[int, ...]:
    """(mtime_ns, size) of each of a version's files (0, -1 for one that is absent)."""
    out: list[int] = []
    for name in VERSION_FILES:
        try:
            stat = (folder / name).stat()
        except FileNotFoundError:
            out += (0, -1)
            continue
        out += (stat.st_mtime_ns, stat.st_size)
    return tuple(out)


def _load_model(folder: Path, previous: ServedModel | None, options: LoadOptions) -> ServedModel:
    config = ModelConfig.load(folder)
    on_disk = [p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
    served = config.version_policy.select(on_disk)
    if not served:
        raise ConfigError(
            f"{folder}: no version folder is served (on disk: {sorted(on_disk) or 'none'}; "
            f"policy: {config.version_policy}); add e.g. {folder}/1/{MODEL_FILE}"
        )
    versions: dict[str, LoadedModel] = {}
    artifacts: dict[str, tuple[int, ...]] = {}
    for version in served:
        path = folder / version / MODEL_FILE
        try:
            path.stat()
            artifacts[version] = _artifacts(folder / version)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read model file: {exc}") from exc
        old = previous.versions.get(version) if previous else None
        if (
            old is not None
            and previous is not None
            and previous.artifacts.get(version) == artifacts[version]
            and _program_keys(old.config) == _program_keys(config)
        ):
            versions[version] = old.with_config(config, options.execution)
        else:
            versions[version] = LoadedModel.load(
                config, folder / version, allow_code=options.allow_code,
                defaults=options.execution, warm_up=config.max_batch_size or options.warm_up,
                compile_cache=options.compile_cache,
            )  # fmt: skip
    model = ServedModel(config, versions, artifacts)
    model.check_routing()
    return model


def _program_keys(config: ModelConfig) -> tuple[object, ...]:
    """What a loaded version depends on besides its files: a change reloads it."""
    return (
        config.inputs, config.outputs, config.quantize, config.tokenizer, config.extra_input,
        config.device, config.precision, config.compile,
        config.instances if config.compile == "aot" else None,  # a runner per instance
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """How versions are loaded: the settings that apply to every model."""

    allow_code: bool = False
    """Run a version's ``handler.py`` (``WORKER_MODELS__ALLOW_CODE``); refuse it otherwise."""
    execution: Execution = DEFAULT_EXECUTION
    """Device, precision, instances where a config leaves them out (``WORKER_MODELS__*``)."""
    warm_up: int = 32
    """On a GPU, > 0: each instance thread warms up before it serves, at its lane's batch size
    and token budget (:mod:`worker.warming`); 0: no warm-up."""
    compile_cache: Path | None = None
    """Where ``compile = "aot"`` keeps compiled packages (None:
    :data:`worker.compiling.DEFAULT_CACHE`)."""


class ModelRepository:
    """Every model served, by name; immutable (a reload builds a new one)."""

    def __init__(
        self, root: Path, models: Mapping[str, ServedModel], options: LoadOptions = LoadOptions()
    ) -> None:
        self.root = root
        self._models = dict(models)
        self.options = options

    @classmethod
    def load(
        cls, root: Path, *, allow_code: bool = False, options: LoadOptions | None = None
    ) -> ModelRepository:
        """Load every model under ``root``; any problem is a :class:`ConfigError`."""
        if not root.is_dir():
            raise ConfigError(f"model repository {root} is not a folder")
        folders = sorted(p for p in root.iterdir() if (p / CONFIG_FILE).is_file())
        if not folders:
            raise ConfigError(f"model repository {root} holds no model (<name>/{CONFIG_FILE})")
        options = options or LoadOptions(allow_code=allow_code)
        models = {f.name: _load_model(f, None, options) for f in folders}
        return cls(root, models, options)

    def reload(self) -> tuple[ModelRepository, list[ConfigError]]:
        """Re-read the folder. A model that fails keeps its current state; errors are returned."""
        errors: list[ConfigError] = []
        models: dict[str, ServedModel] = {}
        folders = sorted(p for p in self.root.iterdir() if (p / CONFIG_FILE).is_file())
        for folder in folders:
            current = self._models.get(folder.name)
            try:
                models[folder.name] = _load_model(folder, current, self.options)
            except ConfigError as exc:
                errors.append(exc)
                if current is not None:
                    models[folder.name] = current
        return ModelRepository(self.root, models, self.options), errors

    def fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        """What a file watch compares: every config and model file's path, mtime and size."""
        files = [
            *self.root.glob(f"*/{CONFIG_FILE}"),
            *(p for name in VERSION_FILES for p in self.root.glob(f"*/*/{name}")),
        ]
        stats = []
        for path in sorted(files):
            try:
                stat = path.stat()
            except OSError:
                continue
            stats.append((str(path), stat.st_mtime_ns, stat.st_size))
        return tuple(stats)

    @property
    def names(self) -> list[str]:
        """Names of the models served."""
        return sorted(self._models)

    def get(self, name: str) -> ServedModel:
        """A served model; :class:`RequestError` NOT_FOUND if there is none of that name."""
        model = self._models.get(name)
        if model is None:
            raise RequestError(
                ErrorCode.NOT_FOUND,
                f"no model named {shown(name)}; this worker serves: {', '.join(self.names)}",
            )
        return model

    def versions(self, name: str) -> list[str]:
        """Served versions of a model, oldest first."""
        return sorted(self.get(name).versions, key=int)

    def all(self) -> list[LoadedModel]:
        """Every served model version."""
        return [m for served in self._models.values() for m in served.versions.values()]

    def serves(self, name: str, version: str | None) -> bool:
        """True if ``name`` (and ``version``, when given) is served here."""
        model = self._models.get(name)
        return model is not None and (not version or version in model.versions)

    def route(self, name: str, version: str | None, request_id: str) -> Route:
        """Where a request for ``name`` goes (see :meth:`ServedModel.route`).

        Raises :class:`RequestError` NOT_FOUND for a model or version that is not served.
        """
        return self.get(name).route(version, request_id)
