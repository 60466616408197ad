"""The Kafka settings (``WORKER_KAFKA__*``): the broker, topics and group, client tuning, security.

Security is checked as a whole when the settings are built: TLS files only with a protocol
that uses TLS, SASL credentials exactly with a ``SASL_*`` protocol, and plain text refused when
``refuse_plaintext`` says so. Making clients of these settings is :mod:`worker.kafka`; the
settings object they belong to, :class:`worker.settings.Settings` (which re-exports these).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

__all__ = ["ENCRYPTED_PROTOCOLS", "KafkaSettings"]

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
    group_instance_id: str | None = Field(
        default=None, min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$"
    )
    """Static membership (KIP-345): a name unique to this worker in its group, stable across
    restarts (a StatefulSet pod's name). A restart within ``session_timeout_ms`` then causes no
    rebalance; a worker gone for good holds its partitions until its session times out. Unset:
    a dynamic member, which leaves the group when it stops."""
    session_timeout_ms: int = Field(default=10_000, ge=1)
    """How long the group waits for a silent member (a crash, a static member's restart) before
    it rebalances its partitions away; the broker bounds it (``group.min/max.session.timeout.ms``,
    6 s to 30 min by default)."""
    heartbeat_interval_ms: int = Field(default=1_000, ge=1)
    """How often a member heartbeats; it learns of a rebalance at its next heartbeat, so this
    bounds how long the other members wait for it to join one. At most a third of the session
    timeout."""
    rebalance_timeout_ms: int = Field(default=20_000, ge=1)
    """How long the group waits for every member to rejoin a rebalance; a revocation waits at
    most half of it for requests already running."""
    max_poll_interval_ms: int = Field(default=300_000, ge=1)
    request_timeout_ms: int = Field(default=30_000, ge=1)
    fetch_max_records: int = Field(default=500, ge=1)
    """Most records taken from the consumer in one fetch round."""
    delivery: Literal["at_least_once", "exactly_once"] = "at_least_once"
    """``exactly_once``: each assigned partition of the requests topic has a transactional
    producer; the replies, dead-letter copies and audit records of its answered records and the
    partition's next offset are committed in one transaction, so a ``read_committed`` reader sees
    each reply once, whatever crashes and rebalances happen (docs/delivery.md)."""
    transaction_interval_ms: int = Field(default=100, ge=0, le=60_000)
    """Exactly-once: a partition's transaction collects answers for at least this long (from the
    start of its previous one) before it commits; longer: fewer, larger transactions and later
    visible replies."""
    transaction_timeout_ms: int = Field(default=60_000, ge=1_000, le=900_000)
    """Exactly-once: the broker aborts a transaction left open this long (a worker that died
    mid-transaction); at most the broker's ``transaction.max.timeout.ms`` (15 min by default)."""
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
    def _check_group_timing(self) -> KafkaSettings:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError(
                f"heartbeat_interval_ms ({self.heartbeat_interval_ms}) must be at most a third "
                f"of session_timeout_ms ({self.session_timeout_ms}): otherwise one late "
                "heartbeat ends the member's session"
            )
        return self

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
