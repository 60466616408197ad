"""Kafka glue: clients built with explicit, safe settings, and the worker's topics.

aiokafka's defaults do not suit a worker that must not lose requests, so every setting that
matters is spelt out here:

- consumer: ``enable_auto_commit=False`` (auto-commit commits what was handed out, not what was
  answered; the worker commits explicit offsets itself), ``auto_offset_reset="earliest"`` (a new
  group answers requests published before any worker started), ``isolation_level=
  "read_committed"`` (requests from aborted producer transactions are never served);
- producer: ``acks="all"`` and ``enable_idempotence=True`` (a reply is acknowledged only once it
  is on every in-sync replica, and retries do not duplicate it).

Every client (worker, client, CLI, benchmark, admin) takes its security from
:func:`security_config`: TLS with a verifying context (hostname checked unless turned off),
optional client certificate, SASL PLAIN or SCRAM. :func:`check_connection` connects and
authenticates once before any client starts, so a wrong password or an untrusted certificate
ends start-up with a :class:`~worker.errors.ConnectError` saying so, instead of a bootstrap
retry loop that logs the cause and raises "Unable to bootstrap".
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.errors import (
    BrokerResponseError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
    kafka_errors,
)

from worker.errors import ConfigError, ConnectError
from worker.settings import ENCRYPTED_PROTOCOLS, KafkaSettings

__all__ = [
    "FencedInstanceIdError",
    "assign_all",
    "check_connection",
    "consumer_config",
    "delete_topics",
    "ensure_topics",
    "is_fenced",
    "list_topics",
    "make_consumer",
    "make_producer",
    "producer_config",
    "security_config",
    "ssl_context",
]

log = structlog.get_logger(__name__)


class FencedInstanceIdError(BrokerResponseError):  # type: ignore[misc]  # aiokafka untyped
    """FENCED_INSTANCE_ID (82), which aiokafka 0.14 does not know (it reads it as UNKNOWN).

    Registered in aiokafka's table of error codes so that a fenced static member's error names
    its cause (:func:`is_fenced`).
    """

    errno = 82
    message = "FENCED_INSTANCE_ID"
    description = "another member joined the group with this member's group instance id"


kafka_errors.setdefault(FencedInstanceIdError.errno, FencedInstanceIdError)


def is_fenced(error: BaseException) -> bool:
    """True if the group fenced this member out (another joined with its group instance id)."""
    return isinstance(error, FencedInstanceIdError) or FencedInstanceIdError.__name__ in str(error)


_TOPIC_ALREADY_EXISTS = 36
_UNKNOWN_TOPIC = 3


def ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    """A client TLS context: certificates verified against ``ssl_cafile`` (or the system's)."""
    try:
        context = ssl.create_default_context(
            cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"WORKER_KAFKA__SSL_CAFILE={settings.ssl_cafile}: {exc}") from exc
    context.check_hostname = settings.ssl_check_hostname
    if settings.ssl_certfile is not None:
        password = settings.ssl_key_password
        try:
            context.load_cert_chain(
                settings.ssl_certfile,
                settings.ssl_keyfile,
                password.get_secret_value() if password else None,
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"WORKER_KAFKA__SSL_CERTFILE={settings.ssl_certfile} / SSL_KEYFILE="
                f"{settings.ssl_keyfile}: cannot load the client certificate and key "
                f"({type(exc).__name__}: {exc})"
            ) from None  # the exception may hold the key password's failure details
    return context


def security_config(settings: KafkaSettings) -> dict[str, Any]:
    """Client keyword arguments for ``security_protocol``: TLS context, SASL credentials."""
    protocol = settings.security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ENCRYPTED_PROTOCOLS:
        options["ssl_context"] = ssl_context(settings)
    if protocol.startswith("SASL_"):
        username, password = settings.sasl_username, settings.sasl_password
        assert username is not None  # checked by KafkaSettings
        assert password is not None
        options |= {
            "sasl_mechanism": settings.sasl_mechanism,
            "sasl_plain_username": username.get_secret_value(),
            "sasl_plain_password": password.get_secret_value(),
        }
    return options


def _common(settings: KafkaSettings) -> dict[str, Any]:
    return {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "request_timeout_ms": settings.request_timeout_ms,
        **security_config(settings),
    }


async def check_connection(settings: KafkaSettings) -> None:
    """Connect, negotiate TLS and authenticate with one bootstrap server, or say why not.

    Raises :class:`ConnectError`; ``retriable`` is False when the cause is configuration
    (certificate, hostname, password, mechanism, protocol mismatch).
    """
    options = security_config(settings)
    problems: list[tuple[str, bool]] = []
    for server in settings.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            async with asyncio.timeout(settings.request_timeout_ms / 1000):
                conn = await create_conn(
                    host.strip("[]"), int(port), client_id=settings.client_id,
                    request_timeout_ms=settings.request_timeout_ms, **options,
                )  # fmt: skip
        except (OSError, KafkaError, TimeoutError, ValueError) as exc:
            problems.append(_explain(server.strip(), settings, exc))
            continue
        conn.close()
        return
    raise ConnectError(
        f"cannot use Kafka at {settings.bootstrap_servers} "
        f"(security_protocol={settings.security_protocol}): "
        + "; ".join(message for message, _ in problems),
        retriable=all(retriable for _, retriable in problems),
    )


def _explain(server: str, settings: KafkaSettings, exc: BaseException) -> tuple[str, bool]:
    """What went wrong with one server, in words, and whether retrying may help."""
    protocol = settings.security_protocol
    retriable = False
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or str(exc)
        if "hostname" in reason.lower() or "ip address mismatch" in reason.lower():
            hint = (
                "the certificate does not name this host; connect by a name it lists, or set "
                "WORKER_KAFKA__SSL_CHECK_HOSTNAME=false"
            )
        else:
            trusted = settings.ssl_cafile or "the system's CAs"
            hint = f"the broker's certificate is not signed by a CA in {trusted}"
        text = f"TLS certificate verification failed: {reason} ({hint})"
    elif isinstance(exc, ssl.SSLError):
        text = (
            f"TLS handshake failed ({exc.reason or exc}); is this listener TLS, and does it "
            "accept this client's certificate?"
        )
    elif isinstance(exc, SaslAuthenticationFailed):
        text = (
            f"SASL authentication failed with mechanism {settings.sasl_mechanism}: wrong "
            "username or password, or no such user for this mechanism"
        )
    elif isinstance(exc, UnsupportedSaslMechanismError):
        text = f"the listener does not enable SASL mechanism {settings.sasl_mechanism}"
    elif isinstance(exc, TimeoutError):
        text = f"no answer within {settings.request_timeout_ms} ms (is the listener {protocol}?)"
        retriable = True
    elif isinstance(exc, ConnectionRefusedError):
        text = "connection refused (no broker listening there)"
        retriable = True
    elif isinstance(exc, ConnectionError | KafkaError) and protocol not in ENCRYPTED_PROTOCOLS:
        text = (
            f"the connection closed during the handshake ({type(exc).__name__}): what a "
            f"{protocol} client sees when it talks to a TLS listener"
        )
    elif isinstance(exc, ConnectionError | KafkaError):
        sent = (
            f"refused the client certificate {settings.ssl_certfile}"
            if settings.ssl_certfile
            else "requires a client certificate (WORKER_KAFKA__SSL_CERTFILE and SSL_KEYFILE)"
        )
        text = (
            f"the broker closed the connection right after the TLS handshake "
            f"({type(exc).__name__}): the listener probably {sent}"
        )
    else:
        text = f"{type(exc).__name__}: {exc}"
        retriable = True
    return f"{server}: {text}", retriable


def consumer_config(settings: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for the worker's group consumer."""
    return {
        **_common(settings),
        "group_id": settings.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        "rebalance_timeout_ms": settings.rebalance_timeout_ms,
        "max_poll_interval_ms": settings.max_poll_interval_ms,
        "group_instance_id": settings.group_instance_id,
        # One assignor, named: partitions of the requests topic spread evenly over members.
        "partition_assignment_strategy": (RoundRobinPartitionAssignor,),
        "max_poll_records": settings.fetch_max_records,
    }


def producer_config(settings: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for the reply producer."""
    return {
        **_common(settings),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": settings.linger_ms,
    }


def make_consumer(settings: KafkaSettings, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer with :func:`consumer_config` (not started, not subscribed)."""
    return AIOKafkaConsumer(**{**consumer_config(settings), **overrides})


def make_producer(settings: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    """A producer with :func:`producer_config` (not started)."""
    return AIOKafkaProducer(**{**producer_config(settings), **overrides})


async def assign_all(
    consumer: AIOKafkaConsumer, topic: str, partitions: Iterable[int], *, from_end: bool
) -> None:
    """Assign every partition of ``topic`` to a group-less consumer, from its end or beginning.

    Positions are resolved before returning, so nothing published afterwards is missed.
    """
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    if from_end:
        await consumer.seek_to_end(*tps)
    else:
        await consumer.seek_to_beginning(*tps)
    for tp in tps:
        await consumer.position(tp)


@contextlib.asynccontextmanager
async def _admin(settings: KafkaSettings) -> AsyncIterator[AIOKafkaAdminClient]:
    """An admin client, started once the connection is checked (its errors explained)."""
    await check_connection(settings)
    admin = AIOKafkaAdminClient(**_common(settings))
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def ensure_topics(settings: KafkaSettings, topics: Iterable[str]) -> None:
    """Create missing ``topics``; raise :class:`ConfigError` if topics are managed elsewhere."""
    wanted = sorted(set(topics))
    async with _admin(settings) as admin:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if not missing:
            return
        if not settings.manage_topics:
            raise ConfigError(
                f"topic(s) {', '.join(missing)} do not exist on {settings.bootstrap_servers}, "
                "or this user may not Describe them (ACLs); create them (or grant Describe), "
                "or set WORKER_KAFKA__MANAGE_TOPICS=true to let the worker create them"
            )
        response = await admin.create_topics(
            [
                NewTopic(t, settings.topic_partitions, settings.topic_replication_factor)
                for t in missing
            ]
        )
        for topic, code, *rest in response.topic_errors:
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                message = rest[0] if rest else ""
                raise ConfigError(f"cannot create topic {topic!r}: error {code} {message}")
        log.info("topics created", topics=missing, partitions=settings.topic_partitions)


async def list_topics(settings: KafkaSettings) -> set[str]:
    """The names of the cluster's topics (those this user may describe).

    Raises :class:`~worker.errors.ConnectError` saying why when the cluster cannot be reached.
    """
    async with _admin(settings) as admin:
        return set(await admin.list_topics())


async def delete_topics(settings: KafkaSettings, topics: Iterable[str]) -> None:
    """Delete ``topics`` (a bench leg's or a test's own); those that do not exist are skipped.

    Raises :class:`ConfigError` if the broker refuses to delete one, and
    :class:`~worker.errors.ConnectError` if it cannot be reached.
    """
    wanted = sorted(set(topics))
    if not wanted:
        return
    async with _admin(settings) as admin:
        response = await admin.delete_topics(wanted)
    for topic, code, *_ in response.topic_error_codes:
        if code not in (0, _UNKNOWN_TOPIC):
            raise ConfigError(
                f"cannot delete topic {topic!r}: error {code} "
                "(29: no permission to delete, 73: the broker has topic deletion turned off)"
            )
