"""Where a request came from: a Kafka record, or a direct call (REST, gRPC).

Every request in the worker carries its :data:`Origin`. A :class:`Record` is answered on a
reply topic (or dead-lettered) and committed once that is acknowledged; a :class:`Call` is
already decoded and is answered to its caller through ``respond``, never encoded for Kafka.
A new transport (a WebSocket, an HTTP callback) is a new origin and its way of answering in
:mod:`worker.pipeline`; admission, the tokenizer stage and the lanes do not change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from aiokafka import TopicPartition  # a plain named tuple: (topic, partition)

from worker.domain import InferenceRequest, InferenceResponse
from worker.headers import Headers
from worker.records import record

__all__ = ["Call", "Origin", "Record", "Respond"]

Respond = Callable[[InferenceResponse, list[tuple[str, bytes]]], None]
"""A caller's answer: the response and the headers that go with it (``traceparent``)."""


@record
class Record:
    """A request record fetched from the requests topic (references, no copies)."""

    transport: ClassVar[str] = "kafka"

    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int
    generation: int = 0
    """The partition's generation when it was fetched (:class:`~worker.offsets.OffsetTracker`):
    once the partition is revoked, the record is stale and nothing of it is published."""

    def where(self) -> str:
        """``topic[partition]@offset``, for messages."""
        return f"{self.tp.topic}[{self.tp.partition}]@{self.offset}"


@dataclass(frozen=True, slots=True)
class Call:
    """A request that came over REST or gRPC, decoded by its endpoint, answered to its caller."""

    transport: str
    """``rest`` or ``grpc``."""
    number: int
    """Its sequence number among this worker's calls (for messages)."""
    request: InferenceRequest
    headers: Headers
    """The caller's headers passed on (trace context, ``correlation_id``; REST and gRPC name
    which in :data:`worker.rest_requests.PASSED_HEADERS` and the gRPC metadata they read)."""
    timestamp_ms: int
    """When it arrived (Unix ms): latency and the default deadline count from here."""
    respond: Respond

    def where(self) -> str:
        """``transport call #number``, for messages."""
        return f"{self.transport} call #{self.number}"


Origin = Record | Call
"""Where a request came from."""
