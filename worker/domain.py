"""The domain model, with no wire format in it: tensors, requests, responses, timing, errors.

Every codec (Avro in :mod:`worker.codec`, the schema registry's framing and the V2 JSON and
Protobuf bodies in :mod:`worker.formats`, :mod:`worker.v2json`, :mod:`worker.v2proto`) reads
into and writes from these types; nothing here knows how they travel.

Strings (``BYTES``): each element is a 4-byte little-endian length, then its bytes, as the Open
Inference Protocol's binary tensor format lays them out; :meth:`Tensor.to_numpy` gives a numpy
object array of ``bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import field
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.errors import ErrorCode, ReplyError, RequestError, cut, shown
from worker.records import record

__all__ = [
    "BYTES",
    "DATATYPES",
    "MAX_STRINGS",
    "ErrorInfo",
    "InferenceRequest",
    "InferenceResponse",
    "Parameters",
    "Tensor",
    "Timing",
]

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


@record
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
        if self.shape and min(self.shape) < 0:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"input {shown(self.name)}: shape {cut(str(list(self.shape)))} has a negative "
                "dimension",
            )
        count = math.prod(self.shape)
        if count * dtype.itemsize != len(self.data):
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"input {shown(self.name)}: shape {cut(str(list(self.shape)))} of "
                f"{self.datatype} needs {cut(str(count * dtype.itemsize))} bytes, data has "
                f"{len(self.data)}",
            )
        # A read-only view of the bytes (``np.frombuffer(...).reshape(...)`` in one call).
        try:
            return np.ndarray(self.shape, dtype, self.data)
        except ValueError as exc:  # an empty shape numpy cannot index, e.g. (1, 0, 2**62)
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"input {shown(self.name)}: shape {cut(str(list(self.shape)))} cannot be held "
                f"({exc})",
            ) from exc

    def _strings(self) -> npt.NDArray[Any]:
        def invalid(why: str) -> RequestError:
            return RequestError(
                ErrorCode.INVALID_ARGUMENT, f"input {shown(self.name)}: BYTES tensor {why}"
            )

        if self.shape and min(self.shape) < 0:
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
        try:
            return out.reshape(self.shape)
        except ValueError as exc:  # no elements in a shape numpy cannot index: (0, 2**62, 2**62)
            raise invalid(f"shape {cut(str(list(self.shape)))} cannot be held ({exc})") from exc


@record
class ErrorInfo:
    """Why a request failed: an :class:`~worker.errors.ErrorCode` value and a message."""

    code: str
    message: str


@record
class Timing:
    """Where the time went for one reply."""

    queue_us: int
    compute_us: int
    batch_size: int


Parameters = dict[str, str | int | float | bool]


@record
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


@record
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
