"""What the KServe V2 (Open Inference Protocol) wire formats share: names, ids, typed values.

A V2 request over Kafka (JSON, :mod:`worker.v2json`; Protobuf, :mod:`worker.v2proto`) leaves
the model to the record: the body's ``model_name`` (Protobuf), else header ``model_name``, else
MLServer's ``mlserver-model``; the version likewise (``model_version``, ``mlserver-version``).
The correlation id is the body's ``id``, else the ``correlation_id`` header, else the record
key. Typed values (a JSON ``data`` list, Protobuf ``contents``) become the same
:class:`~worker.codec.Tensor` bytes as Avro carries, checked against the declared shape.

Every problem is a :class:`~worker.errors.DecodeError` saying what was wrong; nothing here
allocates more than the values given (a shape is checked against the values' count before
anything is built from it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from worker.domain import BYTES, DATATYPES, InferenceResponse, Tensor
from worker.errors import DecodeError, cut, shown
from worker.model_config import MAX_SHAPE_DIMENSIONS

__all__ = [
    "MAX_DIMENSION",
    "MAX_ID_BYTES",
    "Headers",
    "checked_shape",
    "first_header",
    "reply_parameters",
    "request_id",
    "request_model",
    "tensor_from_values",
    "tensor_values",
]

Headers = Sequence[tuple[str, bytes]]

MAX_ID_BYTES = 1024
"""Longest correlation id, model name or version taken from headers or the key."""
MAX_DIMENSION = 2**31 - 1
"""Largest size of one dimension of a decoded shape (far beyond any request the limits let in)."""
MODEL_HEADERS = ("model_name", "mlserver-model")
VERSION_HEADERS = ("model_version", "mlserver-version")


def first_header(headers: Headers, names: Sequence[str]) -> str | None:
    """The first of ``names`` present (in that order) as text, or None; the last value wins."""
    found = {key: value for key, value in headers if key in names}  # only the names asked for
    for name in names:
        value = found.get(name)
        if value:
            return value[:MAX_ID_BYTES].decode(errors="replace")
    return None


def request_model(body_name: str, body_version: str, headers: Headers) -> tuple[str, str | None]:
    """Model name and version: the body's, else the headers' (``model_name``, MLServer's)."""
    name = body_name or first_header(headers, MODEL_HEADERS)
    if not name:
        raise DecodeError(
            "no model named: set header model_name (or mlserver-model) to the model's name"
        )
    version = body_version or first_header(headers, VERSION_HEADERS)
    return name, version or None


def request_id(body_id: str, headers: Headers, key: bytes | None) -> str:
    """The correlation id: the body's ``id``, else header ``correlation_id``, else the key."""
    if body_id:
        return body_id
    given = first_header(headers, ("correlation_id",))
    if given:
        return given
    return key[:MAX_ID_BYTES].decode(errors="replace") if key else ""


def tensor_from_values(name: str, datatype: str, shape: Sequence[int], values: Any) -> Tensor:
    """A tensor from typed values (a flat or nested list, or a Protobuf repeated field).

    BYTES values are strings (UTF-8) or bytes. The values' count must equal the shape's
    product; numbers must fit the datatype.
    """
    dims = checked_shape(name, shape)
    if not isinstance(values, list | tuple):
        raise DecodeError(f"input {shown(name)}: data must be a list, not {type(values).__name__}")
    if datatype == BYTES:
        items = _flat_strings(name, values)
        _check_count(name, dims, len(items))
        return Tensor.from_strings(name, items, shape=dims)
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise DecodeError(
            f"input {shown(name)}: unknown datatype {shown(datatype)}; expected one of "
            f"{', '.join(DATATYPES)}, {BYTES}"
        )
    try:
        array = _numbers(np.asarray(values), dtype)
        problem = _value_problem(array, dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        problem = str(exc)[:200]
    if problem:
        raise DecodeError(f"input {shown(name)}: data is not {datatype} values: {problem}")
    _check_count(name, dims, array.size)
    try:
        converted = array.astype(dtype).reshape(dims)
    except ValueError as exc:  # no values in a shape numpy cannot index, e.g. (0, 2**31, 2**31)
        raise DecodeError(
            f"input {shown(name)}: shape {cut(str(list(dims)))} cannot be held"
        ) from exc
    return Tensor.from_numpy(name, converted)


def _numbers(array: np.ndarray[Any, Any], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """The values as numbers a float ``dtype`` can be checked against (float64), else as given.

    numpy makes an object array of integers beyond 64 bits (or of anything mixed with them):
    only plain numbers pass, as float64 for a float datatype (an integer one is refused later).
    Strings are never parsed as numbers.
    """
    if array.dtype.kind in "US":
        raise ValueError("strings, not numbers (numbers are never parsed from text)")
    if array.dtype.kind == "O":
        if not all(type(v) in (int, float) for v in array.flat):
            raise ValueError("values that are not numbers")
        if dtype.kind != "f":
            raise ValueError(f"integers outside the range of {dtype.name}")
        return array.astype(np.float64)  # OverflowError beyond float64
    if dtype.kind == "f" and array.dtype.kind in "iu":
        return array.astype(np.float64)
    return array


def _value_problem(array: np.ndarray[Any, Any], dtype: np.dtype[Any]) -> str | None:
    """Why ``array`` cannot be held in ``dtype`` without changing a value (None: it can)."""
    if array.dtype.kind not in "biuf":
        return f"values of kind {array.dtype}"
    if array.size and (array.dtype.kind == "b") != (dtype.kind == "b"):
        return "true/false for BOOL only, and only true/false for BOOL"
    if dtype.kind == "f" and dtype.itemsize < array.dtype.itemsize and array.size:
        finite = np.abs(array[np.isfinite(array)])
        if finite.size and finite.max() > np.finfo(dtype).max:  # the cast would make it inf
            return f"values outside the range of {dtype.name}"
    if dtype.kind in "iu" and array.size:
        if array.dtype.kind == "f":
            return "floating-point values for an integer datatype"
        info = np.iinfo(dtype)
        if int(array.min()) < info.min or int(array.max()) > info.max:  # as Python ints:
            # numpy compares a bool or int64 with 2**64 - 1 by overflowing
            return f"values outside {info.min}..{info.max}"
    return None


def checked_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` as a tuple, if it has at most 32 dimensions, each 0..:data:`MAX_DIMENSION`.

    Every V2 decoder checks a shape with this before it is used.

    Checked before anything is computed from it: no product of huge numbers, no message that
    prints them.
    """
    if len(shape) > MAX_SHAPE_DIMENSIONS:
        raise DecodeError(
            f"input {shown(name)}: shape has {len(shape)} dimensions; at most "
            f"{MAX_SHAPE_DIMENSIONS} are accepted"
        )
    dims = tuple(int(d) for d in shape)
    for i, d in enumerate(dims):
        if d < 0:
            raise DecodeError(f"input {shown(name)}: shape has a negative dimension ({i})")
        if d > MAX_DIMENSION:  # not printed: it may have thousands of digits
            raise DecodeError(
                f"input {shown(name)}: shape dimension {i} is larger than {MAX_DIMENSION}"
            )
    return dims


def _check_count(name: str, dims: tuple[int, ...], count: int) -> None:
    """DecodeError unless ``dims`` (checked) hold exactly ``count`` values."""
    needs = math.prod(dims)
    if needs != count:
        said = str(needs) if needs < 10**18 else "more than 10^18"  # never hundreds of digits
        raise DecodeError(
            f"input {shown(name)}: shape {cut(str(list(dims)))} needs {said} values; data has "
            f"{count}"
        )


def _flat_strings(name: str, values: Any) -> list[bytes]:
    """Strings of a (nested) list, flattened, each as bytes."""
    out: list[bytes] = []
    stack = [iter(values)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        elif isinstance(item, str):
            out.append(item.encode())
        elif isinstance(item, bytes):
            out.append(item)
        else:
            raise DecodeError(f"input {shown(name)}: BYTES data holds {type(item).__name__}")
    return out


_END = object()


def tensor_values(tensor: Tensor) -> list[Any]:
    """A tensor's elements as a flat list (BYTES as text; bytes not UTF-8 replaced)."""
    array = tensor.to_numpy().ravel()
    if tensor.datatype != BYTES:
        return list(array.tolist())
    return [item.decode(errors="replace") for item in array]


def reply_parameters(response: InferenceResponse) -> dict[str, Any]:
    """The reply's parameters with what has no field of its own in V2: error code, timing."""
    params: dict[str, Any] = dict(response.parameters or {})
    if response.error is not None:
        params["error_code"] = response.error.code
    if response.timing is not None:
        params["queue_us"] = response.timing.queue_us
        params["compute_us"] = response.timing.compute_us
        params["batch_size"] = response.timing.batch_size
    return params
