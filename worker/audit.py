"""Audit records: one per answered request, written to the log and optionally to a topic.

A record (:func:`audit_record`) says who asked what, which version
answered, how and how fast: correlation id, model, version, outcome code, latency (request
timestamp to reply), queue and compute time, batch id, the transport (``kafka``, ``rest``,
``grpc``), for a record its topic/partition/offset and reply topic, trace id.

:class:`AuditLog` writes them as JSON lines to stderr (the log stream), one write per group of
acknowledged replies. It bypasses structlog on purpose: formatting a structlog event per
request is the costliest way to write them (docs/operations.md has the measured cost).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from worker.answers import Settled
from worker.origins import Record

__all__ = ["AuditLog", "audit_record"]


class AuditLog:
    """Writes audit records as JSON lines (logger ``worker.audit``), a group per write."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        """Write one line per record, all in one write."""
        if not records:
            return
        head = {
            "event": "audit",
            "level": "info",
            "logger": "worker.audit",
            "timestamp": datetime.now(UTC).isoformat(),
        }
        stream = self._stream or sys.stderr
        stream.write("".join(json.dumps(head | record) + "\n" for record in records))

    def acknowledged(self, items: Sequence[Settled], now_ms: float) -> None:
        """Write the audit records of the replies among ``items`` (acknowledged at ``now_ms``)."""
        self.write(
            [
                audit_record(item, max(0.0, now_ms - item.origin.timestamp_ms) / 1000)
                for item in items
                if item.meta is not None
            ]
        )


def audit_record(item: Settled, latency_s: float) -> dict[str, Any]:
    """One request's audit record (JSON-ready); ``item`` is a reply (its ``meta`` is set).

    ``topic``, ``partition``, ``offset`` and ``reply_topic`` are a record's; a call's are null.
    """
    meta = item.meta
    assert meta is not None, "only replies have audit records"
    origin = item.origin
    record = origin if isinstance(origin, Record) else None
    return {
        "correlation_id": item.correlation_id,
        "model": meta.model,
        "version": meta.version,
        "outcome": meta.outcome,
        "latency_ms": round(latency_s * 1000, 3),
        "queue_ms": None if meta.queue_s is None else round(meta.queue_s * 1000, 3),
        "compute_ms": None if meta.compute_s is None else round(meta.compute_s * 1000, 3),
        "batch_id": meta.batch_id,
        "transport": origin.transport,
        "topic": record.tp.topic if record else None,
        "partition": record.tp.partition if record else None,
        "offset": record.offset if record else None,
        "reply_topic": item.topic,
        "trace_id": meta.trace_id,
    }
