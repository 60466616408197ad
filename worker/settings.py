"""The one settings object, read from the environment once at start-up and passed down.

Every field maps to an environment variable with the prefix ``WORKER_`` and ``__`` between
nested names, e.g. ``WORKER_KAFKA__BOOTSTRAP_SERVERS`` or ``WORKER_BATCHING__MAX_BATCH_SIZE``.
No other module reads the environment. :class:`Settings` is composed of one section per
prefix: the Kafka section is :mod:`worker.kafka_settings`, the HTTP, REST and gRPC endpoints'
:mod:`worker.endpoint_settings` (both re-exported here), the others are defined here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import (
    BaseModel,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from worker.config_sections import MAX_INSTANCES, Execution, check_device
from worker.endpoint_settings import EndpointSettings, GrpcSettings, HttpSettings, RestSettings
from worker.errors import ConfigError
from worker.kafka_settings import ENCRYPTED_PROTOCOLS, KafkaSettings

__all__ = [
    "ENCRYPTED_PROTOCOLS",
    "ENV_PREFIX",
    "SECRETS_DIR_VAR",
    "AuditSettings",
    "BatchingSettings",
    "EndpointSettings",
    "GrpcSettings",
    "HttpSettings",
    "KafkaSettings",
    "LogSettings",
    "ModelSettings",
    "RestSettings",
    "RuntimeSettings",
    "SchemaRegistrySettings",
    "Settings",
    "env_var_names",
    "env_vars",
    "load_settings",
    "redacted_url",
    "unknown_env_vars",
]

ENV_PREFIX = "WORKER_"
SECRETS_DIR_VAR = "WORKER_SECRETS_DIR"
"""Names a folder whose files set settings: file ``WORKER_KAFKA__SASL_PASSWORD`` sets that one."""


MIN_RUN_MS = 0.001
"""The shortest run time bound (``max_run_ms``) other than 0 (no bound)."""


class BatchingSettings(BaseModel):
    """Default dynamic batching; a model's ``config.toml`` may override each value."""

    max_batch_size: int = Field(default=32, ge=1)
    """A batch closes when it holds this many requests..."""
    max_batch_delay_ms: float = Field(default=5.0, ge=0)
    """...or when its oldest request has waited this long."""
    start_when_idle: bool = True
    """A request arriving while its model is idle starts a batch at once (no delay)."""
    max_batches_per_run: int = Field(default=64, ge=1, le=4096)
    """Under a backlog, full batches handed to the inference thread in one go (a *run*)..."""
    max_run_ms: float = Field(default=50.0, ge=0, le=60_000)
    """...and only as many full batches as take about this long at the lane's measured time
    per request (:mod:`worker.pacing`): a run's answers go out when it ends (0: no time bound)."""

    @field_validator("max_run_ms")
    @classmethod
    def _off_or_measurable(cls, value: float) -> float:
        if 0 < value < MIN_RUN_MS:  # would round to no bound at all (0) on the way to seconds
            raise ValueError(f"max_run_ms must be 0 (no time bound) or at least {MIN_RUN_MS}")
        return value

    max_batch_tokens: int | None = Field(default=None, ge=1)
    """Sequence models: most padded tokens (rows x longest length) per batch (none: no bound)."""
    sort_window: int = Field(default=8, ge=1)
    """Sequence models: batches' worth of waiting requests grouped by length (1: arrival order)."""
    min_padding_efficiency: float = Field(default=0.8, ge=0, le=1)
    """Sequence models: a batch is cut where the next request would bring real / padded tokens
    below this (0: cut by size and token budget only)."""
    priority_aging_ms: float = Field(default=60_000.0, ge=0, le=3_600_000)
    """Priority classes (high, normal, low): a lower class counts as arriving this much later
    per class, so none starves (a low request waits at most for what came within twice this)."""


class ModelSettings(BaseModel):
    """Where models come from and how they run."""

    repository: Path = Path("models")
    """Folder laid out as ``<name>/config.toml`` and ``<name>/<version>/model.pt2``."""
    torch_threads: int = Field(default=0, ge=0)
    """Intra-op threads for torch; 0: one per core but one, which is left to the event loop.
    A version with several instances splits them (each instance at least one)."""

    @property
    def threads(self) -> int:
        """The intra-op thread count to use: ``torch_threads``, or cores minus one (at least 1)."""
        return self.torch_threads or max(1, (os.cpu_count() or 2) - 1)

    device: str = "auto"
    """Where a model runs unless its config.toml says: auto (CUDA when present), cpu, cuda[:N]."""
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Compute precision unless a model's config says: weights and float inputs cast to it."""
    instances: int = Field(default=1, ge=1, le=MAX_INSTANCES)
    """Batches of one version running at once (a thread each) unless a model's config says."""

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device(value)

    @property
    def execution(self) -> Execution:
        """The defaults for models whose config.toml leaves device, precision or instances out."""
        return Execution(self.device, self.precision, self.instances)

    allow_code: bool = False
    """Run a version folder's ``handler.py`` (pre/post-processing code from the repository).
    Off: a version with one fails to load. Whoever can write the repository then runs code."""
    poll_interval_s: float = Field(default=0.0, ge=0)
    """Watch the repository: reload when a config or model file changes, checked this often.
    0: reload only on SIGHUP."""
    compile_cache: Path | None = None
    """Where ``compile = "aot"`` keeps compiled packages (a writable volume, or one filled
    ahead of time); unset: ``~/.cache/kafka-inference-worker/compiled``. The packages are
    native code the worker loads: whoever can write here can run code in the worker."""


class RuntimeSettings(BaseModel):
    """Flow control, commits and shutdown."""

    max_in_flight: int = Field(default=2_000, ge=1)
    """Most requests decoded but not yet answered; at the bound the worker stops fetching."""
    commit_interval_ms: int = Field(default=200, ge=1)
    """How often finished offsets are committed (also on rebalance and shutdown)."""
    shutdown_timeout_s: float = Field(default=30.0, gt=0)
    """On SIGTERM/SIGINT, how long in-flight requests may take to be answered and committed."""
    default_timeout_ms: int = Field(default=0, ge=0)
    """Deadline for requests without ``deadline_ms``, from the record's timestamp; 0: none."""
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1)
    """Largest record value served; larger ones are answered RESOURCE_EXHAUSTED."""
    max_request_elements: int = Field(default=1_000_000, ge=1)
    """Most tensor elements (all inputs together) in one request; more: RESOURCE_EXHAUSTED."""
    reply_retries: int = Field(default=3, ge=0)
    """Retries of a reply whose publish failed with a retriable error, before dead-lettering."""
    watchdog_timeout_s: float = Field(default=120.0, ge=0)
    """No progress for this long while there is work: exit non-zero. 0 disables the watchdog."""
    reserved_for_calls: float = Field(default=0.1, ge=0, lt=1)
    """Share of ``max_in_flight`` that Kafka records may never take, kept for REST and gRPC
    calls (only while an endpoint is enabled): a Kafka backlog queues calls, never refuses them."""


Endpoint = TypeVar("Endpoint", bound=EndpointSettings)


class AuditSettings(BaseModel):
    """One audit record per request."""

    log: bool = True
    """Write each audit record to the log (logger ``worker.audit``)."""
    topic: str = ""
    """Also publish each audit record (JSON) to this topic, with the reply; empty: don't."""


class SchemaRegistrySettings(BaseModel):
    """A Confluent-compatible schema registry, for records in its wire format (off: no URL)."""

    url: str = ""
    """E.g. ``https://registry:8081``; empty: no registry (framed records are refused)."""
    username: str = ""
    """HTTP basic auth user (with ``password``); empty: no authentication."""
    password: SecretStr | None = None
    ca_file: FilePath | None = None
    """PEM CA bundle to verify the registry's certificate (default: the system's)."""
    cert_file: FilePath | None = None
    """PEM client certificate for mutual TLS (with ``key_file``)."""
    key_file: FilePath | None = None
    reply_schema_id: int | None = Field(default=None, ge=0)
    """The response schema's id, where the worker may not register it; else it registers it
    under ``<replies topic>-value`` at start."""
    timeout_s: float = Field(default=5.0, gt=0)
    """Per registry request."""
    retry_s: float = Field(default=5.0, ge=0)
    """How long a lookup of a new schema id is retried while the registry cannot be reached."""
    cache_size: int = Field(default=1_000, ge=1)
    """Writer schemas kept (least recently used go first)."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"url {redacted_url(value)!r} must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _pairs(self) -> SchemaRegistrySettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS)")
        if bool(self.username) != (self.password is not None):
            raise ValueError("username and password go together (HTTP basic auth)")
        return self


class LogSettings(BaseModel):
    """Logging output."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = "auto"
    """``auto``: readable console lines on a TTY, JSON lines otherwise."""
    child: int | None = Field(default=None, ge=0)
    """Set by ``serve --processes`` in each child: every line it logs carries ``child``."""


class Settings(BaseSettings):
    """All settings of the worker, the client and the CLI."""

    model_config = SettingsConfigDict(
        env_prefix="WORKER_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        secrets_nested_delimiter="__",
        secrets_dir_missing="error",
    )

    kafka: KafkaSettings = KafkaSettings()
    batching: BatchingSettings = BatchingSettings()
    models: ModelSettings = ModelSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    http: HttpSettings = HttpSettings()
    audit: AuditSettings = AuditSettings()
    log: LogSettings = LogSettings()
    schema_registry: SchemaRegistrySettings = SchemaRegistrySettings()
    rest: RestSettings = Field(default=RestSettings(), validate_default=True)
    grpc: GrpcSettings = Field(default=GrpcSettings(), validate_default=True)

    @field_validator("rest", "grpc")
    @classmethod
    def _endpoint_request_bytes(cls, value: Endpoint, info: ValidationInfo) -> Endpoint:
        """An endpoint without its own ``max_request_bytes`` reads the runtime's."""
        runtime = info.data.get("runtime")
        if value.max_request_bytes is None and isinstance(runtime, RuntimeSettings):
            return value.model_copy(update={"max_request_bytes": runtime.max_request_bytes})
        return value

    @model_validator(mode="after")
    def _something_to_serve(self) -> Settings:
        if not (self.kafka.enabled or self.rest.enabled or self.grpc.enabled):
            raise ValueError("kafka, rest and grpc are all disabled: nothing to serve")
        if not self.kafka.enabled and self.audit.topic:
            raise ValueError("audit.topic needs kafka enabled (the records go to Kafka)")
        return self

    def topics(self) -> list[str]:
        """Every topic the worker needs at start (it creates them when it manages topics)."""
        kafka = self.kafka
        topics = [kafka.requests_topic, kafka.replies_topic, kafka.dead_letter_topic]
        return [*topics, *filter(None, [self.audit.topic])]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then environment, then files in the secrets folder (nested by ``__``)."""
        del settings_cls, dotenv_settings  # no .env files: the environment is the interface
        return init_settings, env_settings, NestedSecretsSettingsSource(file_secret_settings)


def redacted_url(url: str) -> str:
    """``url`` for logs and messages: anything between ``://`` and its last ``@`` is ``***``.

    Cut by hand, not parsed: a password holding ``?``, ``#`` or ``/`` would mislead a parser
    into showing it as a query or a path.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def env_var_names() -> set[str]:
    """Every environment variable that sets a field, e.g. ``WORKER_KAFKA__GROUP_ID``."""
    names = set()
    for section, info in Settings.model_fields.items():
        model = info.annotation
        assert isinstance(model, type)
        assert issubclass(model, BaseModel)
        for name in model.model_fields:
            names.add(f"{ENV_PREFIX}{section}__{name}".upper())
    return names


def env_vars(section: BaseModel, name: str) -> dict[str, str]:
    """``WORKER_<NAME>__<FIELD>`` variables that give another process this section's values.

    Secrets are written as their values (not ``**********``); unset (None) fields are left out.
    """
    out = {}
    for field, value in section.model_dump().items():
        if value is not None:
            plain = value.get_secret_value() if isinstance(value, SecretStr) else value
            text = ",".join(plain) if isinstance(plain, list) else str(plain)
            out[f"{ENV_PREFIX}{name}__{field}".upper()] = text
    return out


def unknown_env_vars(environ: Mapping[str, str]) -> list[str]:
    """``WORKER_*`` names in ``environ`` that set no field (misspellings, removed settings)."""
    known = env_var_names()
    known.add(SECRETS_DIR_VAR)
    return sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)


def load_settings() -> Settings:
    """Build the settings from the environment; unknown ``WORKER_*`` variables are an error.

    A misspelt variable would otherwise be ignored silently, leaving a default in force.
    """
    unknown = unknown_env_vars(os.environ)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; see docs/settings.md")
    secrets_dir = os.environ.get(SECRETS_DIR_VAR)
    try:
        return Settings(_secrets_dir=secrets_dir or None)  # type: ignore[call-arg]
    except ValidationError as exc:
        # Never str(exc): pydantic would print the inputs, passwords included.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'settings'}: {error['msg']}"
            for error in exc.errors(include_input=False, include_url=False)
        )
        raise ConfigError(f"invalid settings: {problems}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{SECRETS_DIR_VAR}={secrets_dir}: {exc}") from None
