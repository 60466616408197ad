"""Unit tests of what a record's answer publishes (worker.outgoing), without a broker."""

from __future__ import annotations

import json

from aiokafka import TopicPartition
from aiokafka.errors import MessageSizeTooLargeError

from worker.answers import (
    Answer,
    ReplyMeta,
    Stage,
    error_response,
    expired_response,
    model_response,
)
from worker.codec import decode_response
from worker.domain import InferenceRequest, InferenceResponse, Tensor, Timing
from worker.errors import DecodeError, ErrorCode, RequestError
from worker.formats import PLAIN
from worker.origins import Call, Record
from worker.outgoing import (
    DEAD_LETTER_CLASS_NAME,
    DLQ_HEADER_PREFIX,
    Destinations,
    Outgoing,
    audit_message,
    dead_letter,
    messages,
    without_value,
)

DEST = Destinations("replies", "dlq", "g")
TRACE = "0af7651916cd43dd8448eb211c80319c"


def source(headers: list[tuple[str, bytes]] | None = None, key: bytes | None = b"k") -> Record:
    return Record(
        TopicPartition("requests", 4), 17, key, b"value", headers or [], 1_700_000_000_000
    )


def reply(
    destinations: Destinations,
    record: Record,
    response: InferenceResponse,
    batch_id: str | None = None,
) -> list[Outgoing]:
    """What is published for a record answered with ``response``."""
    return messages(destinations, PLAIN, Answer(record, response, batch_id=batch_id))


def request(rid: str = "r-1") -> InferenceRequest:
    return InferenceRequest(rid, "digits", [], model_version="2")


def test_dead_letter_copy_keeps_the_record_and_adds_connect_headers() -> None:
    """The DLQ copy keeps key, value, headers and timestamp, plus __connect.errors.* context."""
    copy = dead_letter(DEST, source([("h", b"1")]), Stage.DECODE, DecodeError("bad bytes"))
    headers = dict(copy.headers)
    assert copy.topic == "dlq"
    assert (copy.key, copy.value) == (b"k", b"value")
    assert copy.timestamp_ms == 1_700_000_000_000
    assert copy.is_dead_letter
    assert copy.meta is None
    assert headers["h"] == b"1"
    assert headers[DLQ_HEADER_PREFIX + "topic"] == b"requests"
    assert headers[DLQ_HEADER_PREFIX + "partition"] == b"4"
    assert headers[DLQ_HEADER_PREFIX + "offset"] == b"17"
    assert headers[DLQ_HEADER_PREFIX + "timestamp"] == b"1700000000000"
    assert headers[DLQ_HEADER_PREFIX + "stage"] == b"DECODE"
    assert headers[DLQ_HEADER_PREFIX + "connector.name"] == b"g"
    assert headers[DLQ_HEADER_PREFIX + "class.name"] == DEAD_LETTER_CLASS_NAME.encode()
    assert headers[DLQ_HEADER_PREFIX + "exception.class.name"] == b"worker.errors.DecodeError"
    assert b"bad bytes" in headers[DLQ_HEADER_PREFIX + "exception.message"]


def test_dead_letter_of_an_empty_record_still_has_a_value() -> None:
    """A record with neither key nor value is copied with an empty value (Kafka needs one)."""
    empty = Record(TopicPartition("t", 0), 0, None, None, [], 0)
    assert dead_letter(DEST, empty, Stage.DECODE, DecodeError("empty")).value == b""
    keyed = Record(TopicPartition("t", 0), 0, b"k", None, [], 0)
    assert dead_letter(DEST, keyed, Stage.DECODE, DecodeError("empty")).value is None


def test_reply_goes_to_the_default_topic_with_correlation_and_trace_headers() -> None:
    """Without reply_to: the default topic, correlation_id, a new traceparent, the response."""
    response = error_response(request(), RequestError(ErrorCode.NOT_FOUND, "no such model"))
    [message] = reply(DEST, source(), response)
    headers = dict(message.headers)
    assert message.topic == "replies"
    assert message.correlation_id == "r-1"
    assert headers["correlation_id"] == b"r-1"
    assert headers["traceparent"].startswith(b"00-")
    assert not message.is_dead_letter
    decoded = decode_response(message.value or b"")
    assert decoded.error is not None
    assert (decoded.error.code, decoded.error.message) == ("NOT_FOUND", "no such model")
    assert message.meta is not None
    assert (message.meta.model, message.meta.version, message.meta.outcome) == (
        "digits", "2", "NOT_FOUND",
    )  # fmt: skip


def test_reply_topic_headers_in_order_of_preference() -> None:
    """reply_to beats kafka_replyTopic; an empty reply_to falls through to the next."""
    response = error_response(request(), RequestError(ErrorCode.NOT_FOUND, "x"))
    open_ = Destinations("replies", "dlq", "g", reply_topics=("*",))
    both = [("kafka_replyTopic", b"spring"), ("reply_to", b"ours")]
    assert reply(open_, source(both), response)[0].topic == "ours"
    spring = [("reply_to", b""), ("kafka_replyTopic", b"spring")]
    assert reply(open_, source(spring), response)[0].topic == "spring"


def test_reply_topic_policy_allows_listed_names_and_prefixes_never_own_topics() -> None:
    """Listed names and prefixes are allowed; requests, dead-letter, audit topics never are."""
    policy = Destinations(
        "replies", "dlq", "g", audit_topic="audit", requests_topic="requests",
        reply_topics=("exact", "clients.*", "*"),
    )  # fmt: skip
    strict = Destinations("replies", "dlq", "g", reply_topics=("exact", "clients.*"))
    assert strict.allows("replies")
    assert strict.allows("exact")
    assert strict.allows("clients.a")
    assert not strict.allows("exactly")
    assert not strict.allows("client")
    assert not strict.allows("other")
    for own in ("requests", "dlq", "audit"):
        assert not policy.allows(own), own
    assert policy.allows("anything-else")


def test_a_refused_reply_topic_gets_its_reply_on_the_default_topic() -> None:
    """A reply to a topic that is not allowed goes to the default topic, marked refused."""
    response = error_response(request(), RequestError(ErrorCode.NOT_FOUND, "x"))
    [message] = reply(DEST, source([("reply_to", b"inference.requests")]), response)
    assert message.topic == "replies"
    assert message.meta is not None
    assert message.meta.refused_topic


def test_reply_continues_the_trace_and_echoes_headers() -> None:
    """Traceparent is continued (same trace id), tracestate and kafka_correlationId copied."""
    headers = [
        ("traceparent", f"00-{TRACE}-b7ad6b7169203331-01".encode()),
        ("tracestate", b"vendor=1"),
        ("kafka_correlationId", b"\x00\x01"),
        ("other", b"not echoed"),
    ]
    response = error_response(request(), RequestError(ErrorCode.NOT_FOUND, "x"))
    [message] = reply(DEST, source(headers), response)
    out = dict(message.headers)
    assert out["traceparent"].startswith(f"00-{TRACE}-".encode())
    assert out["traceparent"] != headers[0][1]
    assert out["tracestate"] == b"vendor=1"
    assert out["kafka_correlationId"] == b"\x00\x01"
    assert "other" not in out
    assert message.meta is not None
    assert message.meta.trace_id == TRACE


def test_reply_with_an_audit_topic_adds_its_audit_record() -> None:
    """With an audit topic, each reply brings a JSON audit record for the same source."""
    destinations = Destinations("replies", "dlq", "g", audit_topic="audit")
    timing = Timing(queue_us=2000, compute_us=1000, batch_size=3)
    response = model_response(request(), "digits", "2", [], timing)
    message, audit = reply(destinations, source(), response, batch_id="b-9")
    record = json.loads(audit.value or b"")
    assert audit.topic == "audit"
    assert audit.origin is message.origin
    assert record["correlation_id"] == "r-1"
    assert record["batch_id"] == "b-9"
    assert record["outcome"] == "ok"
    assert record["queue_ms"] == 2.0
    assert record["reply_topic"] == "replies"


def test_a_failed_answer_is_a_dead_letter_copy_and_a_reply_when_there_is_one() -> None:
    """A record's failure becomes its dead-letter copy; with a response, its reply follows."""
    record = source([("h", b"1")])
    [copy] = messages(DEST, PLAIN, Answer(record, failed=Stage.BATCH, error=ValueError("bug")))
    assert copy.is_dead_letter
    assert dict(copy.headers)[DLQ_HEADER_PREFIX + "stage"] == b"BATCH"
    response = error_response(request(), RequestError(ErrorCode.INVALID_ARGUMENT, "x"))
    both = messages(DEST, PLAIN, Answer(record, response, failed=Stage.DECODE, error=ValueError()))
    assert [m.topic for m in both] == ["dlq", "replies"]


def test_a_calls_audit_record_names_its_transport_and_no_topic() -> None:
    """A call's audit record says rest or grpc; topic, partition, offset and reply topic: null."""
    call = Call("grpc", 7, request(), [], 1_700_000_000_000, lambda _r, _h: None)

    class Handed:
        origin = call
        meta = ReplyMeta("digits", "2", "ok", TRACE, None)
        correlation_id = "r-1"
        stage = None
        topic = None

    audit = audit_message(Destinations("replies", "dlq", "g", audit_topic="audit"), Handed())
    record = json.loads(audit.value or b"")
    assert audit.topic == "audit"
    assert audit.key is None
    assert record["transport"] == "grpc"
    assert (record["topic"], record["partition"], record["offset"]) == (None, None, None)
    assert record["reply_topic"] is None
    assert record["correlation_id"] == "r-1"


def test_model_response_is_outputs_or_internal() -> None:
    """A result becomes outputs with timing; an exception becomes INTERNAL naming the model."""
    timing = Timing(1, 2, 3)
    tensors = [Tensor.from_numpy("label", [7])]
    ok = model_response(request(), "digits", "2", tensors, timing)
    assert ok.error is None
    assert ok.outputs == tensors
    assert ok.timing == timing
    failed = model_response(request(), "digits", "2", ValueError("poisoned row"), timing)
    assert failed.error is not None
    assert failed.error.code == "INTERNAL"
    assert "digits v2" in failed.error.message
    assert "ValueError: poisoned row" in failed.error.message
    assert failed.outputs == []


def test_expired_response_says_by_how_much() -> None:
    """DEADLINE_EXCEEDED names the deadline and how long ago it passed."""
    response = expired_response(request(), "3", 1_000, 1_250.0)
    assert response.model_version == "3"
    assert response.error is not None
    assert response.error.code == "DEADLINE_EXCEEDED"
    assert "deadline 1000" in response.error.message
    assert "250 ms" in response.error.message


def test_a_reduced_dead_letter_copy_keeps_context_and_says_what_was_dropped() -> None:
    """Without value and original headers; context kept; sizes and reason in headers."""
    big = Record(TopicPartition("requests", 1), 9, b"k" * 5000, b"v" * 9000, [("h", b"x" * 7)], 5)
    copy = dead_letter(DEST, big, Stage.DECODE, DecodeError("bad"))
    reduced = without_value(copy, MessageSizeTooLargeError("too big"))
    headers = dict(reduced.headers)
    assert reduced.value == b""
    assert reduced.value_dropped
    assert reduced.key is None, "a long key is dropped too"
    assert "h" not in headers
    assert headers[DLQ_HEADER_PREFIX + "offset"] == b"9"
    assert headers[DLQ_HEADER_PREFIX + "stage"] == b"DECODE"
    assert headers[DLQ_HEADER_PREFIX + "value.size"] == b"9000"
    assert headers[DLQ_HEADER_PREFIX + "headers.size"] == b"8"
    assert b"too large" in headers[DLQ_HEADER_PREFIX + "value.dropped"]
    assert sum(len(k) + len(v) for k, v in reduced.headers) < 2000
    short = without_value(dead_letter(DEST, source(), Stage.DECODE, DecodeError("x")), copy_error())
    assert short.key == b"k", "a short key is kept"


def copy_error() -> MessageSizeTooLargeError:
    return MessageSizeTooLargeError("too big")
