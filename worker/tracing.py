"""W3C trace context: continue the request's ``traceparent`` on its reply.

A valid ``traceparent`` (``00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>``) is
continued: the reply carries the same trace id and flags with a new span id (the worker's
span, child of the caller's). A request without one, or with a malformed one, starts a new
trace, so every audit record and log line has a trace id. No spans are exported; see
docs/operations.md for wiring an OpenTelemetry collector to these ids.
"""

from __future__ import annotations

import re
from random import getrandbits

from worker.records import record

__all__ = ["Trace", "continue_trace"]

_TRACEPARENT = re.compile(rb"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


@record
class Trace:
    """The worker's span for one request."""

    trace_id: str
    span_id: str
    parent_id: str | None
    """The caller's span id, or None when the worker started the trace."""
    flags: str

    @property
    def traceparent(self) -> bytes:
        """The ``traceparent`` header value for the reply."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}".encode()


def _random_id(bits: int) -> str:
    """A random, non-zero id of ``bits`` bits in lower-case hex (W3C: random, not all zeros).

    Python's Mersenne Twister, seeded from the OS at start-up and again in a forked child:
    trace ids need to be unique, not secret, and ``secrets`` costs a system call each.
    """
    return (getrandbits(bits) or 1).to_bytes(bits // 8).hex()


def continue_trace(traceparent: bytes | None) -> Trace:
    """The worker's span: a child of ``traceparent`` if it is valid, else a new trace."""
    span_id = _random_id(64)
    match = _TRACEPARENT.match(traceparent.strip()) if traceparent else None
    if match:
        version, trace_id, parent_id, flags = (g.decode() for g in match.groups())
        if version != "ff" and trace_id != _ZERO_TRACE and parent_id != _ZERO_SPAN:
            return Trace(trace_id, span_id, parent_id, flags)
    return Trace(_random_id(128), span_id, None, "00")
