"""Avro bytes <-> requests and responses, and tensor bytes <-> numpy arrays.

Wire format: Avro *single-object encoding* (the Avro spec's framing for messages): the two
bytes ``C3 01``, the 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's
parsing canonical form, then the Avro binary body. Java's ``BinaryMessageEncoder`` and
``BinaryMessageDecoder`` speak it natively; any Avro library decodes the body after skipping
10 bytes. Bare Avro binary (no header) is accepted too, tried against the current schema first
and then against each earlier one.

Schema evolution: earlier schemas live in ``schemas/history/``. A message written with one of
them is read through Avro schema resolution, so fields added since take their defaults and old
writers keep working. Every message is written with the *current* schema's fingerprint, so a
reader holding only the current ``schemas/*.avsc`` reads every message; a reader still on an
earlier version adds the current schema as a known writer schema (Java:
``BinaryMessageDecoder.addSchema``) and resolves into its own. Schemas are read and parsed once,
at import.

The domain types (:class:`Tensor`, :class:`InferenceRequest`, ...) live in :mod:`worker.domain`;
they are re-exported here, where 0.1 and 0.2 callers found them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from worker.avro_binary import read_request, write_response
from worker.domain import (
    BYTES,
    DATATYPES,
    MAX_STRINGS,
    ErrorInfo,
    InferenceRequest,
    InferenceResponse,
    Parameters,
    Tensor,
    Timing,
)
from worker.errors import DecodeError, shown

__all__ = [
    "BYTES",
    "DATATYPES",
    "MAX_STRINGS",
    "SOE_MARKER",
    "ErrorInfo",
    "InferenceRequest",
    "InferenceResponse",
    "Parameters",
    "Tensor",
    "Timing",
    "decode_request",
    "decode_request_body",
    "decode_response",
    "encode_request",
    "encode_response",
    "encode_response_body",
    "schema_dir",
    "schema_text",
]

SOE_MARKER = b"\xc3\x01"
"""First two bytes of every Avro single-object encoded message."""


def schema_dir() -> Path:
    """The folder holding the ``.avsc`` files (repository checkout or installed wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "schemas", here.parent / "schemas"):
        if (candidate / "inference_request.avsc").is_file():
            return candidate
    raise FileNotFoundError(f"inference_request.avsc not found beside {here}")


def _parse(path: Path) -> tuple[Any, bytes]:
    """A parsed schema and the 10-byte single-object header of messages written with it."""
    parsed = fastavro.parse_schema(json.loads(path.read_text()))
    canonical = to_parsing_canonical_form(parsed)
    return parsed, SOE_MARKER + bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))


class _Schema:
    """The current schema of a message type, and the earlier ones it can still read."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.parsed, self.header = _parse(schema_dir() / f"{name}.avsc")
        history = sorted((schema_dir() / "history").glob(f"{name}.v*.avsc"), reverse=True)
        # Writer schemas by header, newest first; the current schema reads them all.
        self.writers: dict[bytes, Any] = {self.header: self.parsed}
        for path in history:
            parsed, header = _parse(path)
            self.writers[header] = parsed

    def encode(self, record: Mapping[str, Any], *, framed: bool = True) -> bytes:
        """Encode ``record`` with the current schema (``framed=False``: no 10-byte header)."""
        buf = io.BytesIO()
        if framed:
            buf.write(self.header)
        fastavro.schemaless_writer(buf, self.parsed, record)
        return buf.getvalue()

    def decode(self, value: bytes) -> dict[str, Any]:
        """Decode a single-object message of a known schema version, or bare Avro binary."""
        if value[:2] == SOE_MARKER:
            writer = self.writers.get(value[:10])
            if writer is None:
                raise DecodeError(
                    f"Avro single-object message with schema fingerprint {value[2:10].hex()}, "
                    f"which is no version of {self.name} this worker knows (known: "
                    f"{', '.join(h[2:].hex() for h in self.writers)}; see schemas/)"
                )
            return self.read(memoryview(value)[10:], writer)
        failure: DecodeError | None = None
        for writer in self.writers.values():
            try:
                return self.read(memoryview(value), writer)
            except DecodeError as exc:
                failure = failure or exc
        assert failure is not None
        raise failure

    def read(self, body: memoryview, writer: Any) -> dict[str, Any]:
        """A bare Avro body written with ``writer``, read into this (the current) schema."""
        buf = io.BytesIO(body)
        try:
            record = fastavro.schemaless_reader(buf, writer, self.parsed)
        except Exception as exc:  # fastavro raises many types on garbage
            raise DecodeError(
                f"value is not an Avro-encoded {self.name} ({type(exc).__name__}: "
                f"{shown(str(exc), 200)})"
            ) from exc
        if buf.tell() != len(body):
            raise DecodeError(
                f"{len(body) - buf.tell()} bytes left after decoding {self.name}: "
                "the value was written with another schema"
            )
        return cast(dict[str, Any], record)


_REQUEST = _Schema("inference_request")
_RESPONSE = _Schema("inference_response")
_ERROR_RECORD = "inference.v2.Error"
_TIMING_RECORD = "inference.v2.Timing"


def _tensor_to_avro(t: Tensor) -> dict[str, Any]:
    return {"name": t.name, "datatype": t.datatype, "shape": t.shape, "data": t.data}


def _tensor_from_avro(rec: Mapping[str, Any]) -> Tensor:
    return Tensor(rec["name"], rec["datatype"], tuple(rec["shape"]), rec["data"])


def encode_request(request: InferenceRequest) -> bytes:
    """Encode a request as an Avro single-object message."""
    return _REQUEST.encode(
        {
            "id": request.id,
            "model_name": request.model_name,
            "model_version": request.model_version,
            "inputs": [_tensor_to_avro(t) for t in request.inputs],
            "parameters": request.parameters,
            "deadline_ms": request.deadline_ms,
        }
    )


def decode_request(value: bytes | bytearray | memoryview | None) -> InferenceRequest:
    """Decode a request; raises :class:`~worker.errors.DecodeError` on anything else."""
    if not value:
        raise DecodeError("record value is empty; expected an Avro-encoded InferenceRequest")
    # The current schema, framed or bare, is read by hand (worker.avro_binary); anything it is
    # not sure of, and every earlier schema, by fastavro.
    value = value if isinstance(value, bytes) else bytes(value)
    header = _REQUEST.header
    fast = read_request(value, 10) if value[:10] == header else None
    if fast is None and value[:2] != SOE_MARKER:
        fast = read_request(value)
    return fast if fast is not None else _request(_REQUEST.decode(value))


def decode_request_body(body: bytes | memoryview, writer: Any) -> InferenceRequest:
    """A bare Avro request body written with ``writer`` (a parsed schema), resolved to ours.

    Avro schema resolution: fields the writer lacks take our defaults, fields we lack are
    skipped; a writer that cannot be resolved to our schema is a DecodeError saying so.
    """
    return _request(_REQUEST.read(memoryview(body), writer))


def schema_text(name: str) -> str:
    """The current schema of ``inference_request`` or ``inference_response``, as JSON text."""
    return (schema_dir() / f"{name}.avsc").read_text()


def _request(rec: Mapping[str, Any]) -> InferenceRequest:
    return InferenceRequest(
        id=rec["id"],
        model_name=rec["model_name"],
        model_version=rec["model_version"],
        inputs=[_tensor_from_avro(t) for t in rec["inputs"]],
        parameters=rec["parameters"],
        deadline_ms=rec["deadline_ms"],
    )


def encode_response(response: InferenceResponse) -> bytes:
    """Encode a response as an Avro single-object message."""
    return _RESPONSE.header + encode_response_body(response)


def encode_response_body(response: InferenceResponse) -> bytes:
    """A response as bare Avro of the current schema (for a schema registry's framing)."""
    fast = write_response(response)  # by hand (worker.avro_binary), or None: fastavro
    if fast is not None:
        return fast
    return _RESPONSE.encode(_response_record(response), framed=False)


def _response_record(response: InferenceResponse) -> dict[str, Any]:
    """The Avro record of a response.

    Optional records are passed in fastavro's tuple notation, ``(record name, value)``, which
    names the union branch: fastavro otherwise validates the value against every branch
    (about a fifth of the encoding time of a typical reply).
    """
    error = response.error
    timing = response.timing
    return {
        "id": response.id,
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": [_tensor_to_avro(t) for t in response.outputs],
        "error": None
        if error is None
        else (_ERROR_RECORD, {"code": error.code, "message": error.message}),
        "timing": None
        if timing is None
        else (
            _TIMING_RECORD,
            {
                "queue_us": timing.queue_us,
                "compute_us": timing.compute_us,
                "batch_size": timing.batch_size,
            },
        ),
        "parameters": response.parameters,
    }


def decode_response(value: bytes) -> InferenceResponse:
    """Decode a response; raises :class:`~worker.errors.DecodeError` on anything else."""
    rec = _RESPONSE.decode(value)
    error = rec["error"]
    timing = rec["timing"]
    return InferenceResponse(
        id=rec["id"],
        model_name=rec["model_name"],
        model_version=rec["model_version"],
        outputs=[_tensor_from_avro(t) for t in rec["outputs"]],
        error=None if error is None else ErrorInfo(error["code"], error["message"]),
        timing=None if timing is None else Timing(**timing),
        parameters=rec["parameters"],
    )
