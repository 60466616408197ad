"""Priority classes: which waiting requests a batch takes first.

Three classes, a fixed set (never a new queue or a metric label from a request)::

    HIGH    direct calls (REST, gRPC) by default: a person or a service waiting on the answer
    NORMAL  Kafka records by default
    LOW     bulk work that may wait (re-indexing, back-fills)

A request chooses with a Kafka ``priority`` header or a ``priority`` request parameter (V2
JSON, gRPC, the Avro request's ``parameters``); the header wins when both are given. Values:
the names ``high``, ``normal``, ``low`` (any case) or Triton's numbers ``1``, ``2``, ``3``
(``0``: the default of the request's origin). Anything else is refused at admission with
INVALID_ARGUMENT, naming the values accepted: a typo never silently demotes a request.

The batcher (:mod:`worker.batching`) fills a batch from the highest class first, with aging: a
request of class *c* counts as if it arrived ``c x aging`` later than it did (HIGH 0), and the
batcher takes requests in that order. So a request is never overtaken by one of a higher class
that arrived more than ``aging`` per class between them after it: however much HIGH traffic
comes, a LOW request waits at most for what arrived within ``2 x aging`` of it
(``WORKER_BATCHING__PRIORITY_AGING_MS``). Deadlines apply to every class alike.
"""

from __future__ import annotations

from enum import IntEnum

from worker.domain import Parameters
from worker.errors import ErrorCode, RequestError, shown
from worker.headers import Headers, header

__all__ = ["PRIORITY_HEADER", "Priority", "choose"]

PRIORITY_HEADER = "priority"
"""The Kafka header (and the request parameter) that chooses a request's class."""


class Priority(IntEnum):
    """A request's class; lower values are taken first."""

    HIGH = 0
    NORMAL = 1
    LOW = 2

    @property
    def label(self) -> str:
        """``high``, ``normal`` or ``low``."""
        return self.name.lower()


_NAMED = {p.label: p for p in Priority}
_NUMBERED = {1: Priority.HIGH, 2: Priority.NORMAL, 3: Priority.LOW}
_LONGEST = 16
"""Longest value compared at all: a megabyte header is refused without being lowered."""


def choose(headers: Headers, parameters: Parameters | None, default: Priority) -> Priority:
    """The class a request asked for (header first, then parameter), else ``default``.

    Raises :class:`~worker.errors.RequestError` (INVALID_ARGUMENT) for a value not in the set.
    """
    raw = header(headers, PRIORITY_HEADER)
    if raw is not None:
        return _parse(raw.decode("ascii", errors="replace"), "header", default)
    if parameters is not None and PRIORITY_HEADER in parameters:
        return _parse(parameters[PRIORITY_HEADER], "parameter", default)
    return default


def _parse(value: object, where: str, default: Priority) -> Priority:
    if isinstance(value, bool):  # a bool is an int to Python; not a priority
        pass
    elif isinstance(value, int):
        if value == 0:
            return default
        if value in _NUMBERED:
            return _NUMBERED[value]
    elif isinstance(value, str) and len(value) <= _LONGEST:
        text = value.strip().lower()
        if text in _NAMED:
            return _NAMED[text]
        if text in ("0", "1", "2", "3"):  # ASCII only: str.isdigit() takes '²', int() does not
            return _parse(int(text), where, default)
    raise RequestError(
        ErrorCode.INVALID_ARGUMENT,
        f"priority {where} {shown(str(value))} is not one of high, normal, low "
        "(or 1, 2, 3; 0 for the default)",
    )
