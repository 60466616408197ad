"""The one settings object, read from the environment once at start-up and passed down.

Every field maps to an environment variable with the prefix ``WORKER_`` and ``__`` between
nested names, e.g. ``WORKER_KAFKA__BOOTSTRAP_SERVERS`` or ``WORKER_BATCHING__MAX_BATCH_SIZE``.
No other module reads the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, TypeVar

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
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from worker.errors import ConfigError
from worker.model_config import MAX_INSTANCES, Execution, check_device

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
    "unknown_env_vars",
]

ENV_PREFIX = "WORKER_"
SECRETS_DIR_VAR = "WORKER_SECRETS_DIR"
"""Names a folder whose files set settings: file ``WORKER_KAFKA__SASL_PASSWORD`` sets that one."""
ENCRYPTED_PROTOCOLS = ("SSL", "SASL_SSL")


class KafkaSettings(BaseModel):
    """Where the broker is, which topics and group the worker uses, and client tuning."""

    enabled: bool = True
    """Serve the requests topic; off: REST and/or gRPC only (no broker needed)."""
    bootstrap_servers: str = "127.0.0.1:9092"
    """Comma-separated ``host:port`` list of brokers."""
    client_id: str = "inference-worker"
    group_id: str = "inference-workers"
    """Consumer group shared by all workers serving the same requests topic."""
    requests_topic: str = "inference.requests"
    replies_topic: str = "inference.replies"
    """Default reply topic; a request's ``reply_to`` header overrides it."""
    dead_letter_topic: str = "inference.dlq"
    """Where records that cannot be decoded, or whose reply cannot be published, are copied."""
    reply_topics: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Topics a request may name in ``reply_to`` besides ``replies_topic``: names, or prefixes
    ending in ``*``; comma-separated in the environment. The requests, dead-letter and audit
    topics are never allowed."""
    manage_topics: bool = True
    """Create missing topics at start; false: managed elsewhere, a missing topic is an error."""
    topic_partitions: int = Field(default=6, ge=1)
    """Partitions for topics the worker creates; it bounds how many workers share the load."""
    topic_replication_factor: int = Field(default=1, ge=1)
    session_timeout_ms: int = Field(default=10_000, ge=1)
    heartbeat_interval_ms: int = Field(default=3_000, ge=1)
    max_poll_interval_ms: int = Field(default=300_000, ge=1)
    request_timeout_ms: int = Field(default=30_000, ge=1)
    fetch_max_records: int = Field(default=500, ge=1)
    """Most records taken from the consumer in one fetch round."""
    linger_ms: int = Field(default=0, ge=0)
    """How long the producer waits to fill a batch; 0: replies are batched by the worker."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """``SSL``: TLS; ``SASL_SSL``: TLS plus SASL authentication; ``SASL_PLAINTEXT``: no TLS."""
    refuse_plaintext: bool = False
    """Refuse to start unless ``security_protocol`` is ``SSL`` or ``SASL_SSL``."""
    ssl_cafile: FilePath | None = None
    """PEM file of the CA(s) that signed the brokers' certificates (unset: the system's CAs)."""
    ssl_certfile: FilePath | None = None
    """PEM client certificate (chain) for mutual TLS; may also hold the key."""
    ssl_keyfile: FilePath | None = None
    """PEM private key of ``ssl_certfile``."""
    ssl_key_password: SecretStr | None = None
    """Password of an encrypted ``ssl_keyfile``."""
    ssl_check_hostname: bool = True
    """Check that the broker's certificate names the host connected to."""
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    """Required with ``SASL_*`` protocols."""
    sasl_username: SecretStr | None = None
    sasl_password: SecretStr | None = None
    """Never logged or shown; best set through a file in ``WORKER_SECRETS_DIR``."""

    @field_validator("reply_topics", mode="before")
    @classmethod
    def _split_reply_topics(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        protocol = self.security_protocol
        if self.refuse_plaintext and protocol not in ENCRYPTED_PROTOCOLS:
            raise ValueError(
                f"security_protocol={protocol} sends data unencrypted and refuse_plaintext is "
                "set; use SSL or SASL_SSL"
            )
        tls = {
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
            "ssl_key_password": self.ssl_key_password,
        }
        given = sorted(name for name, value in tls.items() if value is not None)
        if given and protocol not in ENCRYPTED_PROTOCOLS:
            raise ValueError(
                f"{', '.join(given)} set, but security_protocol={protocol} does not use TLS"
            )
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("ssl_keyfile needs ssl_certfile (the certificate of that key)")
        sasl = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_username": self.sasl_username,
            "sasl_password": self.sasl_password,
        }
        if protocol.startswith("SASL_"):
            missing = sorted(name for name, value in sasl.items() if value is None)
            if missing:
                raise ValueError(f"security_protocol={protocol} needs {', '.join(missing)}")
        elif any(value is not None for value in sasl.values()):
            raise ValueError(f"sasl_* settings set, but security_protocol={protocol} has no SASL")
        return self


class BatchingSettings(BaseModel):
    """Default dynamic batching; a model's ``config.toml`` may override each value."""

    max_batch_size: int = Field(default=32, ge=1)
    """A batch closes when it holds this many requests..."""
    max_batch_delay_ms: float = Field(default=5.0, ge=0)
    """...or when its oldest request has waited this long."""
    start_when_idle: bool = True
    """A request arriving while its model is idle starts a batch at once (no delay)."""
    max_batches_per_run: int = Field(default=8, ge=1)
    """Under a backlog, full batches handed to the inference thread in one go."""
    max_batch_tokens: int | None = Field(default=None, ge=1)
    """Sequence models: most padded tokens (rows x longest length) per batch (none: no bound)."""
    sort_window: int = Field(default=8, ge=1)
    """Sequence models: batches' worth of waiting requests grouped by length (1: arrival order)."""
    min_padding_efficiency: float = Field(default=0.8, ge=0, le=1)
    """Sequence models: a batch is cut where the next request would bring real / padded tokens
    below this (0: cut by size and token budget only)."""


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


class HttpSettings(BaseModel):
    """The metrics and health endpoint."""

    enabled: bool = True
    host: str = "0.0.0.0"  # noqa: S104 - probes and Prometheus reach a container from outside
    port: int = Field(default=9464, ge=0, le=65535)
    """``/metrics``, ``/healthz``, ``/readyz``; 0 picks a free port."""


class EndpointSettings(BaseModel):
    """An Open Inference Protocol endpoint (REST or gRPC): off unless enabled."""

    enabled: bool = False
    host: str = "0.0.0.0"  # noqa: S104 - callers reach a container from outside
    port: int = Field(default=0, ge=0, le=65535)
    """0 picks a free port (tests)."""
    cert_file: FilePath | None = None
    """PEM server certificate: serve TLS (with ``key_file``)."""
    key_file: FilePath | None = None
    client_ca_file: FilePath | None = None
    """PEM CA of client certificates: mutual TLS, a client without one is refused."""
    token: SecretStr | None = None
    """Bearer token every call must carry (``authorization: Bearer ...``), best from the
    secrets folder; health checks excepted. None: no token asked."""
    request_timeout_s: float = Field(default=60.0, gt=0)
    """How long a request without a deadline may wait for its answer (its body's arrival
    included, over REST)."""
    max_request_bytes: int | None = Field(default=None, ge=1)
    """Most bytes of one request as received: a REST body (after any Content-Encoding), a gRPC
    message; a larger one is refused before it is read (413 / RESOURCE_EXHAUSTED). None:
    ``runtime.max_request_bytes``, filled in when :class:`Settings` is built."""

    @model_validator(mode="after")
    def _tls(self) -> EndpointSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (TLS)")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("client_ca_file (mutual TLS) needs cert_file and key_file")
        return self

    @property
    def secured(self) -> bool:
        """Clients are authenticated (a token, or client certificates) over TLS."""
        return self.cert_file is not None and (
            self.token is not None or self.client_ca_file is not None
        )


Endpoint = TypeVar("Endpoint", bound=EndpointSettings)


class RestSettings(EndpointSettings):
    """KServe V2 REST (``/v2/...``), on Triton's default HTTP port."""

    port: int = Field(default=8000, ge=0, le=65535)
    max_connections: int = Field(default=256, ge=1)
    """Most open connections (HTTP/1.1: each carries one request at a time); one more is
    answered 503 and closed."""


class GrpcSettings(EndpointSettings):
    """``inference.GRPCInferenceService``, on Triton's default gRPC port."""

    port: int = Field(default=8001, ge=0, le=65535)
    max_concurrent_rpcs: int = Field(default=512, ge=1)
    """Most calls being served at once; one more is refused RESOURCE_EXHAUSTED at once."""


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
