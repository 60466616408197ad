"""Audit records: one per answered request, written to the log and optionally to a topic.

A record says who asked what, which version answered, how and how fast: correlation id,
model, version, outcome code, latency (request timestamp to reply), queue and compute time,
batch id, request topic/partition/offset, reply topic, trace id.

:class:`AuditLog` writes them as JSON lines to stderr (the log stream), one write per group of
acknowledged replies. It bypasses structlog on purpose: formatting a structlog event per
request is the costliest way to write them (the README has the measured cost).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from worker.replies import Outgoing, ReplyMeta

__all__ = ["AuditLog", "audit_record"]


def audit_record(item: Outgoing, meta: ReplyMeta, latency_s: float) -> dict[str, Any]:
    """One request's audit record."""
    return {
        "correlation_id": item.correlation_id,
        "model": meta.model,
        "version": meta.version,
        "outcome": meta.outcome,
        "latency_ms": round(latency_s * 1000, 3),
        "queue_ms": None if meta.queue_s is None else round(meta.queue_s * 1000, 3),
        "compute_ms": None if meta.compute_s is None else round(meta.compute_s * 1000, 3),
        "batch_id": meta.batch_id,
        "topic": item.source.tp.topic,
        "partition": item.source.tp.partition,
        "offset": item.source.offset,
        "reply_topic": item.topic,
        "trace_id": meta.trace_id,
    }


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
