"""What the worker publishes for a request record, built as plain data: no Kafka, no asyncio.

Every fetched record ends as one or more :class:`Outgoing` messages, built here:

- a **reply** (:func:`reply`): the response, Avro-encoded, to the reply topic the request names
  (``reply_to`` or Spring's ``kafka_replyTopic`` header) or the default one, with the
  ``correlation_id`` header (the request record's own, else the response's id), the
  continued ``traceparent`` and the echoed headers; plus, when audit records go to a topic,
  its audit record;
- a **dead-letter copy** (:func:`dead_letter`): the record itself with Kafka Connect's
  ``__connect.errors.*`` context headers, when it is not a request at all or its reply cannot
  be published.

The responses themselves come from :func:`error_response`, :func:`expired_response` and
:func:`model_response`. :mod:`worker.replies` publishes what is built here.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from aiokafka import TopicPartition  # a plain named tuple: (topic, partition)

from worker.domain import ErrorInfo, InferenceRequest, InferenceResponse, Tensor, Timing
from worker.errors import SHOWN_CHARS, ErrorCode, RequestError
from worker.formats import PLAIN, Codecs
from worker.headers import Headers, header
from worker.tracing import continue_trace

__all__ = [
    "DEAD_LETTER_CLASS_NAME",
    "DLQ_HEADER_PREFIX",
    "ECHOED_HEADERS",
    "MAX_KEPT_KEY",
    "REPLY_TOPIC_HEADERS",
    "UNSERVED",
    "Destinations",
    "Outgoing",
    "ReplyMeta",
    "Source",
    "Stage",
    "audit_record",
    "dead_letter",
    "error_response",
    "expired_response",
    "model_response",
    "reply",
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
UNSERVED = "_unserved"
"""The ``model`` and ``version`` metric label of replies about a model or version not served:
labels come only from the repository, never from what a request names."""
REPLY_TOPIC_HEADERS = ("reply_to", "kafka_replyTopic")
"""Request headers naming the reply topic (ours, then Spring's), in order of preference."""
ECHOED_HEADERS = ("tracestate", "kafka_correlationId")
"""Request headers copied unchanged onto the reply (``traceparent`` is continued, not copied)."""


class Stage(enum.StrEnum):
    """Values of the ``__connect.errors.stage`` header: where the record failed."""

    FETCH = "FETCH"
    """The Kafka client could not parse the record (its bytes are unknown: only its place)."""
    DECODE = "DECODE"
    """The value is not a request at all."""
    REPLY_PUBLISH = "REPLY_PUBLISH"
    """The reply could not be published."""
    ADMISSION = "ADMISSION"
    """Admitting the record raised unexpectedly (a bug): the last-resort guard copied it."""
    TOKENIZE = "TOKENIZE"
    """Tokenising its strings raised unexpectedly (a bug): the last-resort guard copied it."""
    BATCH = "BATCH"
    """Answering its batch raised unexpectedly (a bug): the last-resort guard copied it."""


@dataclass(frozen=True, slots=True)
class Source:
    """The request record an outgoing message answers (references, no copies).

    A request that came over REST or gRPC (:mod:`worker.direct`) is a source too: ``tp`` names
    its transport (offset: its sequence number), ``request`` is already decoded, and
    ``respond`` takes its reply instead of a reply topic.
    """

    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int
    request: InferenceRequest | None = None
    """Decoded already (a direct request); None: decode ``value``."""
    respond: Callable[[InferenceResponse, list[tuple[str, bytes]]], None] | None = None
    """A direct request's caller, given the response and the reply's headers (trace context);
    None: a Kafka record, answered on a topic."""

    def where(self) -> str:
        """``topic[partition]@offset``, for messages."""
        return f"{self.tp.topic}[{self.tp.partition}]@{self.offset}"


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
    codecs: Codecs = PLAIN
    """How requests are read and replies written, in every wire format (:mod:`worker.formats`)."""

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


@dataclass(frozen=True, slots=True)
class ReplyMeta:
    """What metrics and the audit trail need to know about a reply."""

    model: str
    """The model the request named (cut to a bounded length), for the audit trail."""
    version: str
    outcome: str
    """``ok`` or the reply's error code."""
    trace_id: str
    batch_id: str | None
    queue_s: float | None = None
    compute_s: float | None = None
    labels: tuple[str, str] = (UNSERVED, UNSERVED)
    """Metric labels (model, version): a served version's, or :data:`UNSERVED`."""
    refused_topic: bool = False
    """The request named a reply topic it may not use; this reply went to the default one."""


@dataclass(slots=True)
class Outgoing:
    """A message to publish for a request record: its reply, an audit record, a DLQ copy."""

    source: Source
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
    response: InferenceResponse | None = None
    """For a reply: the response it encodes (a direct request's caller gets this)."""

    @property
    def key(self) -> bytes | None:
        """The record key to publish with: the request's, but not a long one on a reduced copy."""
        key = self.source.key
        if self.value_dropped and key is not None and len(key) > MAX_KEPT_KEY:
            return None
        return key

    @property
    def is_dead_letter(self) -> bool:
        """True for a dead-letter copy."""
        return self.stage is not None


def reply(
    destinations: Destinations,
    source: Source,
    response: InferenceResponse,
    batch_id: str | None = None,
    *,
    served: bool = False,
) -> list[Outgoing]:
    """The reply to a record (and its audit record, if audit records go to a topic).

    ``served``: the response's model and version are served here, so they may label metrics;
    otherwise the labels are :data:`UNSERVED`.
    """
    headers = dict(source.headers)  # one pass; the last value of a header wins
    requested = destinations.requested(source.headers)
    refused = requested is not None and not destinations.allows(requested)
    topic = destinations.replies_topic if requested is None or refused else requested
    trace = continue_trace(headers.get("traceparent"))
    response, value, content_headers = _encoded(destinations, source, response)
    reply_headers = [
        ("correlation_id", headers.get("correlation_id") or response.id.encode()),
        ("traceparent", trace.traceparent),
    ]
    for name in ECHOED_HEADERS:
        echoed = headers.get(name)
        if echoed is not None:
            reply_headers.append((name, echoed))
    timing = response.timing
    model, version = response.model_name[:SHOWN_CHARS], (response.model_version or "")[:SHOWN_CHARS]
    meta = ReplyMeta(
        model=model,
        version=version,
        outcome=response.error.code if response.error else "ok",
        trace_id=trace.trace_id,
        batch_id=batch_id,
        queue_s=timing.queue_us / 1e6 if timing else None,
        compute_s=timing.compute_us / 1e6 if timing else None,
        labels=(model, version) if served else (UNSERVED, UNSERVED),
        refused_topic=refused,
    )
    message = Outgoing(
        source, response.id, topic, value, reply_headers + content_headers, meta=meta,
        response=response,
    )  # fmt: skip
    if not destinations.audit_topic:
        return [message]
    latency_s = max(0.0, time.time() * 1000 - source.timestamp_ms) / 1000
    record = json.dumps(audit_record(message, meta, latency_s)).encode()
    return [message, Outgoing(source, response.id, destinations.audit_topic, record, [])]


def _encoded(
    destinations: Destinations, source: Source, response: InferenceResponse
) -> tuple[InferenceResponse, bytes, list[tuple[str, bytes]]]:
    """The response and its encoding in the request's format; never raises.

    A response whose text the format cannot carry (a string that is not Unicode, say) becomes
    an INTERNAL error reply with that text made safe, so one such request costs only itself.
    """
    try:
        response.id.encode()
        value, added = destinations.codecs.encode(source.value, source.headers, response)
    except Exception as exc:  # noqa: BLE001 - any encoder failure: answer with what can be said
        log.warning(
            "reply could not be encoded; an INTERNAL error reply is sent instead",
            error=f"{type(exc).__name__}: {_safe(str(exc))}",
            offset=source.offset,
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
        value, added = destinations.codecs.encode(source.value, source.headers, response)
    return response, value, added


def _safe(text: str) -> str:
    """``text`` as UTF-8 can carry it (lone surrogates become ``?``), cut for a message."""
    return text[:SHOWN_CHARS].encode(errors="replace").decode()


def dead_letter(
    destinations: Destinations, source: Source, stage: Stage, error: BaseException
) -> Outgoing:
    """A copy of the request record for the dead-letter topic, with context headers."""
    context = {
        "topic": source.tp.topic,
        "partition": str(source.tp.partition),
        "offset": str(source.offset),
        "timestamp": str(source.timestamp_ms),
        "stage": str(stage),
        "connector.name": destinations.group_id,
        "class.name": DEAD_LETTER_CLASS_NAME,
        "exception.class.name": f"{type(error).__module__}.{type(error).__qualname__}",
        "exception.message": str(error),
    }
    headers = [*source.headers]
    headers += [(DLQ_HEADER_PREFIX + k, v.encode()) for k, v in context.items()]
    return Outgoing(
        source=source,
        correlation_id=None,
        topic=destinations.dead_letter_topic,
        # Kafka refuses a record with neither key nor value: keep an empty value then.
        value=source.value if source.value is not None or source.key is not None else b"",
        headers=headers,
        timestamp_ms=source.timestamp_ms,
        stage=stage,
    )


def without_value(copy: Outgoing, error: BaseException) -> Outgoing:
    """A dead-letter copy without the record's value and headers, for when it is too large.

    It keeps the key (up to :data:`MAX_KEPT_KEY` bytes) and the context headers, and says what
    was dropped:
    ``__connect.errors.value.dropped`` (why), ``.value.size`` and ``.headers.size`` (bytes).
    """
    source = copy.source
    context = [(k, v) for k, v in copy.headers if k.startswith(DLQ_HEADER_PREFIX)]
    header_bytes = sum(len(k) + len(v) for k, v in source.headers)
    dropped = {
        "value.dropped": f"the copy was too large for {copy.topic!r}: {error!r}"[:500],
        "value.size": str(len(source.value or b"")),
        "headers.size": str(header_bytes),
    }
    return Outgoing(
        source=source,
        correlation_id=None,
        topic=copy.topic,
        value=b"",
        headers=context + [(DLQ_HEADER_PREFIX + k, v.encode()) for k, v in dropped.items()],
        timestamp_ms=copy.timestamp_ms,
        stage=copy.stage,
        value_dropped=True,
    )


def audit_record(item: Outgoing, meta: ReplyMeta, latency_s: float) -> dict[str, Any]:
    """One request's audit record (JSON-ready)."""
    return {
        "correlation_id": item.correlation_id,
        "model": meta.model,
        "version": meta.version,
        "outcome": meta.outcome,
        "latency_ms": round(latency_s * 1000, 3),
        "queue_ms": None if meta.queue_s is None else round(meta.queue_s * 1000, 3),
        "compute_ms": None if meta.compute_s is None else round(meta.compute_s * 1000, 3),
        "batch_id": meta.batch_id,
        "transport": "kafka" if item.source.respond is None else item.source.tp.topic,
        "topic": item.source.tp.topic,
        "partition": item.source.tp.partition,
        "offset": item.source.offset,
        "reply_topic": item.topic,
        "trace_id": meta.trace_id,
    }


def error_response(request: InferenceRequest, exc: RequestError) -> InferenceResponse:
    """An error reply to ``request`` carrying the error's code and message."""
    return InferenceResponse(
        id=request.id,
        model_name=request.model_name,
        model_version=request.model_version,
        error=ErrorInfo(str(exc.code), exc.message),
    )


def expired_response(
    request: InferenceRequest,
    version: str,
    deadline_ms: int,
    now_ms: float,
    *,
    before: str = "its batch ran",
) -> InferenceResponse:
    """DEADLINE_EXCEEDED from ``version``: the deadline passed ``before`` (the batch ran)."""
    response = error_response(
        request,
        RequestError(
            ErrorCode.DEADLINE_EXCEEDED,
            f"deadline {deadline_ms} (Unix ms) passed {now_ms - deadline_ms:.0f} ms before "
            f"{before}; the model was not run",
        ),
    )
    return replace(response, model_version=version)


def model_response(
    request: InferenceRequest,
    model: str,
    version: str,
    result: list[Tensor] | Exception,
    timing: Timing,
    *,
    truncated: int = 0,
) -> InferenceResponse:
    """The reply for a request the model ran on: its outputs, or the error its rows raised.

    A :class:`RequestError` keeps its code (RESOURCE_EXHAUSTED: too big for the device's
    memory on its own); anything else the model raised is INTERNAL.

    ``truncated``: strings the tokenizer cut to its maximum length, said in the reply's
    parameters (``truncated``) when there were any.
    """
    if not isinstance(result, Exception):
        return InferenceResponse(
            id=request.id,
            model_name=model,
            model_version=version,
            outputs=result,
            timing=timing,
            parameters={"truncated": truncated} if truncated else None,
        )
    log.error(
        "model raised on a request",
        correlation_id=request.id[:SHOWN_CHARS],
        model=model,
        version=version,
        error=repr(result),
    )
    if isinstance(result, RequestError):
        error = ErrorInfo(str(result.code), result.message)
    else:
        error = ErrorInfo(
            str(ErrorCode.INTERNAL),
            f"model {model} v{version} failed on this request: {type(result).__name__}: {result}",
        )
    return InferenceResponse(
        id=request.id, model_name=model, model_version=version, error=error, timing=timing
    )
