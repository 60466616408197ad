"""Unit tests of W3C trace continuation and the audit log writer (no Kafka)."""

from __future__ import annotations

import io
import json
import re

import pytest
from aiokafka import TopicPartition

from worker import tracing
from worker.answers import ReplyMeta
from worker.audit import AuditLog, audit_record
from worker.origins import Record
from worker.outgoing import Outgoing
from worker.tracing import continue_trace

TRACE = "0af7651916cd43dd8448eb211c80319c"


def test_valid_traceparent_is_continued_with_a_child_span() -> None:
    """Same trace id and flags, the caller's span as parent, a fresh span id."""
    trace = continue_trace(f"00-{TRACE}-b7ad6b7169203331-01".encode())
    assert trace.trace_id == TRACE
    assert trace.parent_id == "b7ad6b7169203331"
    assert trace.flags == "01"
    assert trace.span_id != trace.parent_id
    assert trace.traceparent == f"00-{TRACE}-{trace.span_id}-01".encode()


@pytest.mark.parametrize(
    "header",
    [
        None,
        b"",
        b"garbage",
        f"ff-{TRACE}-b7ad6b7169203331-01".encode(),
        b"00-00000000000000000000000000000000-b7ad6b7169203331-01",
        f"00-{TRACE}-0000000000000000-01".encode(),
        f"00-{TRACE.upper()}-b7ad6b7169203331-01".encode(),
    ],
)
def test_missing_or_invalid_traceparent_starts_a_new_trace(header: bytes | None) -> None:
    """Absent, malformed, version ff or all-zero ids: a new trace, never the bad one."""
    trace = continue_trace(header)
    assert trace.parent_id is None
    assert len(trace.trace_id) == 32
    assert trace.trace_id != TRACE
    assert len(trace.span_id) == 16


def test_span_ids_differ_between_requests() -> None:
    """Two replies to the same caller span get different span ids."""
    header = f"00-{TRACE}-b7ad6b7169203331-01".encode()
    assert continue_trace(header).span_id != continue_trace(header).span_id


def test_new_ids_are_lower_hex_of_full_width_and_never_all_zeros(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new trace's ids: 32 and 16 lower-case hex digits, padded; an all-zero draw is not used."""
    for _ in range(200):
        trace = continue_trace(None)
        assert re.fullmatch(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-00", trace.traceparent)
    monkeypatch.setattr(tracing, "getrandbits", lambda _bits: 0)
    trace = continue_trace(None)
    assert trace.trace_id != "0" * 32
    assert trace.span_id != "0" * 16
    monkeypatch.setattr(tracing, "getrandbits", lambda _bits: 5)
    assert continue_trace(None).span_id == "0000000000000005"


class CountingStream(io.StringIO):
    """A text stream that counts write calls."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_audit_log_writes_one_json_line_per_record_in_one_write() -> None:
    """A group of records becomes JSON lines with the audit fields, in a single write."""
    source = Record(TopicPartition("requests", 2), 41, None, b"v", [], 1_700_000_000_000)
    meta = ReplyMeta("digits", "2", "ok", TRACE, "w-7", queue_s=0.002, compute_s=0.001)
    reply = Outgoing(source, "id-1", "replies", b"r", [], meta=meta)
    records = [audit_record(reply, 0.0125), audit_record(reply, 0.02)]
    stream = CountingStream()
    AuditLog(stream).write(records)
    AuditLog(stream).write([])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert stream.writes == 1
    assert len(lines) == 2
    first = lines[0]
    assert first["event"] == "audit"
    assert first["logger"] == "worker.audit"
    assert first["correlation_id"] == "id-1"
    assert (first["model"], first["version"], first["outcome"]) == ("digits", "2", "ok")
    assert (first["topic"], first["partition"], first["offset"]) == ("requests", 2, 41)
    assert first["latency_ms"] == 12.5
    assert first["queue_ms"] == 2.0
    assert first["batch_id"] == "w-7"
    assert first["trace_id"] == TRACE
