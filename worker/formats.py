"""Wire formats: which one a record speaks, its request decoded, the reply encoded in kind.

One decision per record, from its headers and first byte::

    header content-type: application/json           ─> KServe V2 JSON       (worker.v2json)
      (or seldon-infer-type: json/inferModelRequest)
    header content-type: application/x-protobuf     ─> OIP ModelInferRequest (worker.v2proto)
      (or application/protobuf; seldon-infer-type: proto/InferModelRequest)
    first byte 0x00                                 ─> Schema Registry framing: 0x00, a 4-byte
                                                       big-endian schema id, the Avro body
                                                       (Confluent's wire format); without a
                                                       registry, bare Avro is tried first
    anything else                                   ─> Avro single-object encoding, or bare
                                                       Avro of a known schema (worker.codec)

The reply goes out in the format its request came in (a record that could not be decoded at
all is answered in the format it claimed): V2 JSON and Protobuf with their content type,
registry-framed Avro with the response schema's registered id. All formats feed the same
lanes: a batch may mix them.

The registry's schemas are looked up beforehand (:mod:`worker.schema_registry`); here only a
lookup that is already answered is read, so decoding never waits.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

from worker.codec import decode_request, decode_request_body, encode_response, encode_response_body
from worker.domain import InferenceRequest, InferenceResponse
from worker.errors import DecodeError, RequestError
from worker.headers import Headers
from worker.v2 import first_header
from worker.v2json import CONTENT_TYPE as JSON_CONTENT_TYPE
from worker.v2json import decode_json_request, encode_json_response
from worker.v2proto import CONTENT_TYPE as PROTO_CONTENT_TYPE
from worker.v2proto import CONTENT_TYPES as PROTO_CONTENT_TYPES
from worker.v2proto import decode_proto_request, encode_proto_response

__all__ = [
    "MAGIC",
    "PLAIN",
    "Codecs",
    "Schemas",
    "WireFormat",
    "framed_schema_id",
    "wire_format",
]

MAGIC = b"\x00"
"""First byte of a Schema Registry framed record (Confluent's wire format)."""
FRAME = 5
"""Bytes before the Avro body of a framed record: the magic byte and the schema id."""
SELDON_TYPE = "seldon-infer-type"
"""Seldon Core 2's Kafka header naming a V2 message's encoding."""
_FORMAT_HEADERS = frozenset(("content-type", "Content-Type", SELDON_TYPE))
"""Headers that can name a record's format; without any, its first byte decides."""


class WireFormat(enum.StrEnum):
    """How a request record is written (and its reply will be)."""

    AVRO = "avro"
    REGISTRY = "registry"
    JSON = "json"
    PROTOBUF = "protobuf"


def wire_format(value: bytes | None, headers: Headers) -> WireFormat:
    """The format a record speaks: its content type first, then its first byte."""
    for key, _ in headers:
        if key in _FORMAT_HEADERS:
            return _by_headers(value, headers)
    return _by_first_byte(value)  # the usual record: no header says a format


def _by_headers(value: bytes | None, headers: Headers) -> WireFormat:
    content = first_header(headers, ("content-type", "Content-Type"))
    if content is not None:
        kind = content.split(";")[0].strip().lower()
        if kind == JSON_CONTENT_TYPE:
            return WireFormat.JSON
        if kind in PROTO_CONTENT_TYPES:
            return WireFormat.PROTOBUF
    seldon = first_header(headers, (SELDON_TYPE,))
    if seldon is not None:
        if seldon.startswith("json/"):
            return WireFormat.JSON
        if seldon.startswith("proto/"):
            return WireFormat.PROTOBUF
    return _by_first_byte(value)


def _by_first_byte(value: bytes | None) -> WireFormat:
    if value and value[:1] == MAGIC:
        return WireFormat.REGISTRY
    return WireFormat.AVRO


def framed_schema_id(value: bytes | None) -> int | None:
    """The schema id of a registry-framed value (None: too short to hold one)."""
    if not value or len(value) < FRAME or value[:1] != MAGIC:
        return None
    return int.from_bytes(value[1:FRAME], "big")


class Schemas(Protocol):
    """What decoding and encoding need of the schema registry (:mod:`worker.schema_registry`)."""

    reply_id: int
    """The response schema's id in the registry: replies are framed with it."""

    def writer(self, schema_id: int) -> Any:
        """The parsed writer schema of ``schema_id``; RequestError if it cannot be had."""


@dataclass(frozen=True)
class Codecs:
    """Decodes requests and encodes replies in every format; ``schemas``: the registry's."""

    schemas: Schemas | None = None

    def decode(self, value: bytes | None, headers: Headers, key: bytes | None) -> InferenceRequest:
        """A record's request, in whatever format it is written; DecodeError if none."""
        kind = wire_format(value, headers)
        if kind is WireFormat.AVRO:
            return decode_request(value)
        if not value:
            raise DecodeError(f"record value is empty; its headers say {kind} (V2)")
        if kind is WireFormat.JSON:
            return decode_json_request(value, headers, key)
        if kind is WireFormat.PROTOBUF:
            return decode_proto_request(value, headers, key)
        return self._decode_framed(value)

    def _decode_framed(self, value: bytes) -> InferenceRequest:
        schema_id = framed_schema_id(value)
        if schema_id is None:
            raise DecodeError(
                "record starts with the schema registry's magic byte 0 but is shorter than its "
                "5-byte header (magic, schema id)"
            )
        if self.schemas is None:
            try:  # without a registry, a leading 0 is bare Avro (an empty id, say)
                return decode_request(value)
            except DecodeError:
                raise DecodeError(
                    f"record looks framed for a schema registry (schema id {schema_id}), but "
                    "this worker has none: set WORKER_SCHEMA_REGISTRY__URL"
                ) from None
        try:
            writer = self.schemas.writer(schema_id)
        except RequestError as exc:
            raise DecodeError(exc.message, code=exc.code) from exc
        return decode_request_body(memoryview(value)[FRAME:], writer)

    def encode(
        self, value: bytes | None, headers: Headers, response: InferenceResponse
    ) -> tuple[bytes, list[tuple[str, bytes]]]:
        """The reply to a request record, in its format: the value and the headers it adds."""
        kind = wire_format(value, headers)
        if kind is WireFormat.JSON:
            added = [("content-type", JSON_CONTENT_TYPE.encode())]
            if first_header(headers, (SELDON_TYPE,)) is not None:
                added.append((SELDON_TYPE, b"json/inferModelResponse"))
            return encode_json_response(response), added
        if kind is WireFormat.PROTOBUF:
            added = [("content-type", PROTO_CONTENT_TYPE.encode())]
            if first_header(headers, (SELDON_TYPE,)) is not None:
                added.append((SELDON_TYPE, b"proto/InferModelResponse"))
            return encode_proto_response(response), added
        if kind is WireFormat.REGISTRY and self.schemas is not None:
            return MAGIC + self.schemas.reply_id.to_bytes(4, "big") + encode_response_body(
                response
            ), []
        return encode_response(response), []


PLAIN = Codecs()
"""Every format but registry framing (no registry configured)."""
