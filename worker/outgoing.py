"""What the worker publishes for an answer to a Kafka record: plain data, no client, no asyncio.

:func:`messages` turns an :class:`~worker.answers.Answer` to a :class:`~worker.origins.Record`
into the :class:`Outgoing` messages that carry it:

- a **reply**: the response, encoded in the request's wire format, to the reply topic the
  request names (``reply_to`` or Spring's ``kafka_replyTopic`` header) or the default one, with
  the ``correlation_id`` header (the request record's own, else the response's id), the
  continued ``traceparent`` and the echoed headers; plus, when audit records go to a topic, its
  audit record;
- a **dead-letter copy**: the record itself with Kafka Connect's ``__connect.errors.*`` context
  headers, when it is not a request at all (or a bug stopped its answer), or when its reply
  cannot be published (:mod:`worker.replies`).

Direct calls are never encoded here: only their audit record, when audit records go to a topic
(:func:`audit_message`). :mod:`worker.replies` publishes what is built here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import structlog

from worker.answers import Answer, ReplyMeta, Settled, Stage, reply_meta
from worker.audit import audit_record
from worker.domain import ErrorInfo, InferenceResponse
from worker.errors import SHOWN_CHARS, ErrorCode
from worker.formats import Codecs
from worker.headers import Headers, header
from worker.origins import Origin, Record
from worker.tracing import continue_trace

__all__ = [
    "DEAD_LETTER_CLASS_NAME",
    "DLQ_HEADER_PREFIX",
    "ECHOED_HEADERS",
    "MAX_KEPT_KEY",
    "REPLY_TOPIC_HEADERS",
    "Destinations",
    "Outgoing",
    "audit_message",
    "dead_letter",
    "messages",
    "without_value",
]

log = structlog.get_logger(__name__)

DLQ_HEADER_PREFIX = "__connect.errors."
"""Prefix of the dead-letter context headers (Kafka Connect's names)."""
DEAD_LETTER_CLASS_NAME = "kafka-inference-worker"
"""Value of ``__connect.errors.class.name`` on every dead-letter copy: what wrote it.

A fixed name, not a module path, so that DLQ tooling filtering on it keeps working when the
code moves."""
MAX_KEPT_KEY = 1024
"""Longest record key a reduced dead-letter copy keeps (:func:`without_value`)."""
REPLY_TOPIC_HEADERS = ("reply_to", "kafka_replyTopic")
"""Request headers naming the reply topic (ours, then Spring's), in order of preference."""
ECHOED_HEADERS = ("tracestate", "kafka_correlationId")
"""Request headers copied unchanged onto the reply (``traceparent`` is continued, not copied)."""


@dataclass(frozen=True, slots=True)
class Destinations:
    """Where the worker writes, and where requests may steer its replies: from the settings."""

    replies_topic: str
    dead_letter_topic: str
    group_id: str
    audit_topic: str = ""
    """Also publish each reply's audit record here (empty: no audit topic)."""
    requests_topic: str = ""
    reply_topics: tuple[str, ...] = ()
    """Allowed ``reply_to`` topics besides ``replies_topic``: names, or prefixes ending in ``*``."""

    def allows(self, topic: str) -> bool:
        """May a request have its reply written to ``topic``? Never to the worker's own topics."""
        if topic in (self.requests_topic, self.dead_letter_topic, self.audit_topic):
            return False
        if topic == self.replies_topic:
            return True
        return any(
            topic.startswith(allowed[:-1]) if allowed.endswith("*") else topic == allowed
            for allowed in self.reply_topics
        )

    def requested(self, headers: Headers) -> str | None:
        """The reply topic a request's headers name (``reply_to``, then Spring's), if any."""
        for name in REPLY_TOPIC_HEADERS:
            value = header(headers, name)
            if value:
                return value.decode(errors="replace")
        return None


@dataclass(slots=True)
class Outgoing:
    """A message to publish: a record's reply or dead-letter copy, or an audit record."""

    origin: Origin
    """The request it is about: a record (a call only for its audit record)."""
    correlation_id: str | None
    topic: str
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp_ms: int | None = None
    stage: Stage | None = None
    """For a dead-letter copy: where the record failed; None for anything else."""
    meta: ReplyMeta | None = None
    """For a reply: what it answered (metrics, audit)."""
    attempts: int = field(default=0)
    value_dropped: bool = False
    """A dead-letter copy sent without the record's value and headers (too large)."""

    @property
    def key(self) -> bytes | None:
        """The record key to publish with: the request's, but not a long one on a reduced copy."""
        key = self.origin.key if isinstance(self.origin, Record) else None
        if self.value_dropped and key is not None and len(key) > MAX_KEPT_KEY:
            return None
        return key

    @property
    def is_dead_letter(self) -> bool:
        """True for a dead-letter copy."""
        return self.stage is not None


def messages(destinations: Destinations, codecs: Codecs, answer: Answer) -> list[Outgoing]:
    """What carries ``answer`` to a record: its dead-letter copy, its reply (and audit record).

    All of them are submitted together: the record is done when all are acknowledged.
    """
    record = answer.origin
    assert isinstance(record, Record), "only a record's answer is published"
    out: list[Outgoing] = []
    if answer.failed is not None:
        error = answer.error if answer.error is not None else RuntimeError(str(answer.failed))
        out.append(dead_letter(destinations, record, answer.failed, error))
    if answer.response is not None:
        out += _reply(destinations, codecs, record, answer, answer.response)
    return out


def _reply(
    destinations: Destinations,
    codecs: Codecs,
    record: Record,
    answer: Answer,
    response: InferenceResponse,
) -> list[Outgoing]:
    """The reply to a record (and its audit record, if audit records go to a topic)."""
    headers = dict(record.headers)  # one pass; the last value of a header wins
    requested = destinations.requested(record.headers)
    refused = requested is not None and not destinations.allows(requested)
    topic = destinations.replies_topic if requested is None or refused else requested
    trace = continue_trace(headers.get("traceparent"))
    response, value, content_headers = _encoded(codecs, record, response)
    reply_headers = [
        ("correlation_id", headers.get("correlation_id") or response.id.encode()),
        ("traceparent", trace.traceparent),
    ]
    for name in ECHOED_HEADERS:
        echoed = headers.get(name)
        if echoed is not None:
            reply_headers.append((name, echoed))
    meta = reply_meta(answer, response, trace, refused_topic=refused)
    message = Outgoing(
        record, response.id, topic, value, reply_headers + content_headers, meta=meta
    )
    if not destinations.audit_topic:
        return [message]
    return [message, audit_message(destinations, message)]


def audit_message(destinations: Destinations, settled: Settled) -> Outgoing:
    """The audit-topic record of an answer (a record's reply, or a call's), latency until now."""
    latency_s = max(0.0, time.time() * 1000 - settled.origin.timestamp_ms) / 1000
    value = json.dumps(audit_record(settled, latency_s)).encode()
    return Outgoing(settled.origin, settled.correlation_id, destinations.audit_topic, value, [])


def _encoded(
    codecs: Codecs, record: Record, response: InferenceResponse
) -> tuple[InferenceResponse, bytes, list[tuple[str, bytes]]]:
    """The response and its encoding in the request's format; never raises.

    A response whose text the format cannot carry (a string that is not Unicode, say) becomes
    an INTERNAL error reply with that text made safe, so one such request costs only itself.
    """
    try:
        response.id.encode()
        value, added = codecs.encode(record.value, record.headers, response)
    except Exception as exc:  # noqa: BLE001 - any encoder failure: answer with what can be said
        log.warning(
            "reply could not be encoded; an INTERNAL error reply is sent instead",
            error=f"{type(exc).__name__}: {_safe(str(exc))}",
            offset=record.offset,
        )
        response = InferenceResponse(
            id=_safe(response.id),
            model_name=_safe(response.model_name),
            model_version=_safe(response.model_version) if response.model_version else None,
            error=ErrorInfo(
                str(ErrorCode.INTERNAL),
                f"the reply could not be encoded ({type(exc).__name__}); its text was made "
                "safe and its outputs dropped",
            ),
        )
        value, added = codecs.encode(record.value, record.headers, response)
    return response, value, added


def _safe(text: str) -> str:
    """``text`` as UTF-8 can carry it (lone surrogates become ``?``), cut for a message."""
    return text[:SHOWN_CHARS].encode(errors="replace").decode()


def dead_letter(
    destinations: Destinations, record: Record, stage: Stage, error: BaseException
) -> Outgoing:
    """A copy of the request record for the dead-letter topic, with context headers."""
    context = {
        "topic": record.tp.topic,
        "partition": str(record.tp.partition),
        "offset": str(record.offset),
        "timestamp": str(record.timestamp_ms),
        "stage": str(stage),
        "connector.name": destinations.group_id,
        "class.name": DEAD_LETTER_CLASS_NAME,
        "exception.class.name": f"{type(error).__module__}.{type(error).__qualname__}",
        "exception.message": str(error),
    }
    headers = [*record.headers]
    headers += [(DLQ_HEADER_PREFIX + k, v.encode()) for k, v in context.items()]
    return Outgoing(
        origin=record,
        correlation_id=None,
        topic=destinations.dead_letter_topic,
        # Kafka refuses a record with neither key nor value: keep an empty value then.
        value=record.value if record.value is not None or record.key is not None else b"",
        headers=headers,
        timestamp_ms=record.timestamp_ms,
        stage=stage,
    )


def without_value(copy: Outgoing, error: BaseException) -> Outgoing:
    """A dead-letter copy without the record's value and headers, for when it is too large.

    It keeps the key (up to :data:`MAX_KEPT_KEY` bytes) and the context headers, and says what
    was dropped:
    ``__connect.errors.value.dropped`` (why), ``.value.size`` and ``.headers.size`` (bytes).
    """
    record = copy.origin
    assert isinstance(record, Record)
    context = [(k, v) for k, v in copy.headers if k.startswith(DLQ_HEADER_PREFIX)]
    header_bytes = sum(len(k) + len(v) for k, v in record.headers)
    dropped = {
        "value.dropped": f"the copy was too large for {copy.topic!r}: {error!r}"[:500],
        "value.size": str(len(record.value or b"")),
        "headers.size": str(header_bytes),
    }
    return Outgoing(
        origin=record,
        correlation_id=None,
        topic=copy.topic,
        value=b"",
        headers=context + [(DLQ_HEADER_PREFIX + k, v.encode()) for k, v in dropped.items()],
        timestamp_ms=copy.timestamp_ms,
        stage=copy.stage,
        value_dropped=True,
    )
