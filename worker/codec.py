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

Strings (``BYTES``): each element is a 4-byte little-endian length, then its bytes, as the Open
Inference Protocol's binary tensor format lays them out; :meth:`Tensor.to_numpy` gives a numpy
object array of ``bytes``.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import fastavro
import numpy as np
import numpy.typing as npt
from fastavro.schema import fingerprint, to_parsing_canonical_form

from worker.errors import DecodeError, ErrorCode, ReplyError, RequestError, shown

__all__ = [
    "BYTES",
    "DATATYPES",
    "MAX_STRINGS",
    "SOE_MARKER",
    "ErrorInfo",
    "InferenceRequest",
    "InferenceResponse",
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

DATATYPES: Mapping[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
"""Open Inference Protocol datatype -> little-endian numpy dtype."""

BYTES = "BYTES"
"""The Open Inference Protocol's datatype for strings and byte strings."""

MAX_STRINGS = 65_536
"""Most elements a ``BYTES`` tensor may hold (each is parsed on its own)."""

_DATATYPE_OF_KIND: dict[tuple[str, int], str] = {
    (dt.kind, dt.itemsize): name for name, dt in DATATYPES.items()
}


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


@dataclass(frozen=True, slots=True)
class Tensor:
    """A named tensor as it travels: OIP datatype, shape and raw little-endian bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes

    @classmethod
    def from_numpy(cls, name: str, array: npt.ArrayLike) -> Tensor:
        """Wrap an array; its dtype picks the datatype (little-endian, row-major bytes).

        Arrays of ``str`` or ``bytes`` (numpy ``U``, ``S`` or object dtype) become ``BYTES``
        tensors, ``str`` encoded as UTF-8.
        """
        arr = np.asarray(array)
        if arr.dtype.kind in "OUS":
            return cls.from_strings(name, arr.ravel().tolist(), shape=arr.shape)
        key = ("b", 1) if arr.dtype == np.bool_ else (arr.dtype.kind, arr.dtype.itemsize)
        datatype = _DATATYPE_OF_KIND.get(key)
        if datatype is None:
            raise ValueError(f"numpy dtype {arr.dtype} has no Open Inference Protocol datatype")
        wire = arr.astype(DATATYPES[datatype], copy=False)
        return cls(name, datatype, tuple(int(d) for d in arr.shape), wire.tobytes(order="C"))

    @classmethod
    def from_strings(
        cls, name: str, items: Sequence[str | bytes], shape: Sequence[int] | None = None
    ) -> Tensor:
        """A ``BYTES`` tensor of ``items`` (``str`` as UTF-8); shape ``[len(items)]`` by default."""
        parts: list[bytes] = []
        for item in items:
            raw = item.encode() if isinstance(item, str) else bytes(item)
            parts += (len(raw).to_bytes(4, "little"), raw)
        dims = (len(items),) if shape is None else tuple(int(d) for d in shape)
        return cls(name, BYTES, dims, b"".join(parts))

    def to_numpy(self) -> npt.NDArray[Any]:
        """A read-only view of ``data`` with the declared dtype and shape (no copy).

        ``BYTES``: a new object array of ``bytes``, one per element. Raises
        :class:`RequestError` (INVALID_ARGUMENT) if the datatype is unknown, a dimension is
        negative, or the byte length does not match the shape.
        """
        if self.datatype == BYTES:
            return self._strings()
        dtype = DATATYPES.get(self.datatype)
        if dtype is None:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"input {shown(self.name)}: unknown datatype {shown(self.datatype)}; "
                f"expected one of {', '.join(DATATYPES)}",
            )
        if any(d < 0 for d in self.shape):
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"input {shown(self.name)}: shape {shown(str(list(self.shape)))} has a negative "
                "dimension",
            )
        count = math.prod(self.shape)
        if count * dtype.itemsize != len(self.data):
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"input {shown(self.name)}: shape {list(self.shape)} of {self.datatype} needs "
                f"{count * dtype.itemsize} bytes, data has {len(self.data)}",
            )
        return np.frombuffer(self.data, dtype=dtype).reshape(self.shape)

    def _strings(self) -> npt.NDArray[Any]:
        def invalid(why: str) -> RequestError:
            return RequestError(
                ErrorCode.INVALID_ARGUMENT, f"input {shown(self.name)}: BYTES tensor {why}"
            )

        if any(d < 0 for d in self.shape):
            raise invalid("shape has a negative dimension")
        count = 1
        for dim in self.shape:  # stops early: no huge products from hostile shapes
            count *= dim
            if count > MAX_STRINGS:
                raise invalid(f"holds more than {MAX_STRINGS} elements")
        data = self.data
        if count * 4 > len(data):
            raise invalid(f"of {count} elements needs at least {count * 4} bytes, has {len(data)}")
        out = np.empty(count, dtype=object)
        at = 0
        for i in range(count):
            if at + 4 > len(data):
                raise invalid(f"ends inside the length of element {i}")
            size = int.from_bytes(data[at : at + 4], "little")
            at += 4
            if at + size > len(data):
                raise invalid(f"element {i} declares {size} bytes; {len(data) - at} are left")
            out[i] = data[at : at + size]
            at += size
        if at != len(data):
            raise invalid(f"has {len(data) - at} bytes after its {count} elements")
        return out.reshape(self.shape)


def _tensor_to_avro(t: Tensor) -> dict[str, Any]:
    return {"name": t.name, "datatype": t.datatype, "shape": t.shape, "data": t.data}


def _tensor_from_avro(rec: Mapping[str, Any]) -> Tensor:
    return Tensor(rec["name"], rec["datatype"], tuple(rec["shape"]), rec["data"])


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why a request failed: an :class:`~worker.errors.ErrorCode` value and a message."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Timing:
    """Where the time went for one reply."""

    queue_us: int
    compute_us: int
    batch_size: int


Parameters = dict[str, str | int | float | bool]


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """An inference request (``schemas/inference_request.avsc``)."""

    id: str
    model_name: str
    inputs: list[Tensor]
    model_version: str | None = None
    parameters: Parameters | None = None
    deadline_ms: int | None = None
    """Unix epoch milliseconds after which the answer is useless (None: no deadline)."""

    def input(self, name: str) -> Tensor | None:
        """The input tensor called ``name``, if present."""
        return next((t for t in self.inputs if t.name == name), None)


@dataclass(frozen=True, slots=True)
class InferenceResponse:
    """A reply (``schemas/inference_response.avsc``): outputs, or an error."""

    id: str
    model_name: str
    model_version: str | None = None
    outputs: list[Tensor] = field(default_factory=list)
    error: ErrorInfo | None = None
    timing: Timing | None = None
    parameters: Parameters | None = None

    def output(self, name: str) -> npt.NDArray[Any]:
        """The output called ``name`` as a numpy array; raises on an error reply."""
        self.raise_for_error()
        for tensor in self.outputs:
            if tensor.name == name:
                return tensor.to_numpy()
        raise KeyError(f"no output {name!r}; outputs are {[t.name for t in self.outputs]}")

    def raise_for_error(self) -> None:
        """Raise :class:`~worker.errors.ReplyError` if this is an error reply."""
        if self.error is not None:
            raise ReplyError(self.id, self.error.code, self.error.message)


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


def decode_request(value: bytes | None) -> InferenceRequest:
    """Decode a request; raises :class:`~worker.errors.DecodeError` on anything else."""
    if not value:
        raise DecodeError("record value is empty; expected an Avro-encoded InferenceRequest")
    return _request(_REQUEST.decode(value))


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
    return _RESPONSE.encode(_response_record(response))


def encode_response_body(response: InferenceResponse) -> bytes:
    """A response as bare Avro of the current schema (for a schema registry's framing)."""
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
