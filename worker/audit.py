"""Audit records: one per answered request, written to the log and optionally to a topic.

A record (built by :func:`worker.outgoing.audit_record`) says who asked what, which version
answered, how and how fast: correlation id, model, version, outcome code, latency (request
timestamp to reply), queue and compute time, batch id, request topic/partition/offset, reply
topic, trace id.

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

from worker.outgoing import Outgoing, audit_record

__all__ = ["AuditLog"]


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

    def acknowledged(self, items: Sequence[Outgoing], now_ms: float) -> None:
        """Write the audit records of the replies among ``items`` (acknowledged at ``now_ms``)."""
        self.write(
            [
                audit_record(item, item.meta, max(0.0, now_ms - item.source.timestamp_ms) / 1000)
                for item in items
                if item.meta is not None
            ]
        )
