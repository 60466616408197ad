"""The request and reply of the current schemas in Avro binary, written out by hand: a fast path.

fastavro reads and writes any schema, which costs about 10 us a record in the calls around
its work (a stream, a resolution check, a dict per record). Every request the worker serves
and every reply it sends has the same two schemas, so this module reads and writes exactly
those, a few microseconds each:

- :func:`read_request`: the body of an ``inference_request`` written with the *current*
  schema, straight into an :class:`~worker.domain.InferenceRequest`. Anything it is not sure
  of (a varint past 64 bits, a negative block count, an unknown enum index, bytes left over,
  text that is not UTF-8, a count larger than the bytes left) makes it return ``None``, and
  the caller reads the record with fastavro, which then decides (and words the error). So
  this path only ever accepts what fastavro reads the same way; tests/test_avro_binary.py
  checks that on generated and mangled records. The bytes from the model name to the data's
  length of a one-tensor request (its *layout*) repeat from request to request of a producer,
  so the last few dozen layouts are kept: a request that starts with one is its id, one
  lookup, its data and a three-byte tail (2-3 us instead of 5-8).
- :func:`write_response`: the body of an ``inference_response`` of the current schema, byte
  for byte what fastavro writes. A one-output reply's bytes from the model name to its data's
  length (its *head*) repeat from reply to reply of a model version, so the last few hundred
  heads are kept: only the id, the output bytes and the timing are new in each reply. Replies
  it does not cover (an error, a ``parameters`` map) return ``None`` for fastavro to write.

Nothing here allocates more than the record's own length: every count is checked against
the bytes left before anything is built. The layouts kept are bounded in number, in distinct
lengths and in bytes, and only records read whole teach one.
"""

from __future__ import annotations

import struct
from functools import lru_cache

from worker.domain import InferenceRequest, InferenceResponse, Parameters, Tensor, Timing

__all__ = ["DATATYPE_SYMBOLS", "read_request", "write_response"]

DATATYPE_SYMBOLS = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
)  # fmt: skip
"""The ``DataType`` enum's symbols, in the schemas' order (checked against them in tests)."""

_INDEX = {symbol: i for i, symbol in enumerate(DATATYPE_SYMBOLS)}
_DOUBLE = struct.Struct("<d")
_SMALL = tuple(bytes((n,)) for n in range(128))
_MORE = 0x80
"""A varint byte's continuation bit; below it, a byte is a varint's last."""
_TWO_BYTES = 1 << 14
"""Values below this take two varint bytes."""
_LAST_SHIFT = 63
"""A varint's tenth byte holds bits 63-69: none past 64 bits may be set, no byte follows."""
_STRING, _LONG, _DOUBLE_BRANCH, _BOOLEAN = range(4)
"""The branches of a parameter's union, ``["string", "long", "double", "boolean"]``."""


class _Unsure(Exception):  # noqa: N818 - internal signal, never leaves this module
    """What is left to fastavro."""


# -- reading ----------------------------------------------------------------------------------


def _long(buf: bytes, at: int) -> tuple[int, int]:
    """A zig-zag varint at ``at``: its value and the position after it."""
    byte = buf[at]
    if byte < _MORE:
        return (byte >> 1) ^ -(byte & 1), at + 1
    value = byte & 0x7F
    shift = 7
    while True:
        at += 1
        byte = buf[at]
        value |= (byte & 0x7F) << shift
        if byte < _MORE:
            break
        shift += 7
        if shift > _LAST_SHIFT:
            raise _Unsure
    if value >> 64:
        raise _Unsure
    return (value >> 1) ^ -(value & 1), at + 1


def _raw(buf: bytes, at: int) -> tuple[bytes, int]:
    """Avro ``bytes``: a length, then that many bytes."""
    size, at = _long(buf, at)
    end = at + size
    if size < 0 or end > len(buf):
        raise _Unsure
    return buf[at:end], end


def _text(buf: bytes, at: int) -> tuple[str, int]:
    """Avro ``string``: UTF-8 (strict, as fastavro reads it)."""
    raw, at = _raw(buf, at)
    return raw.decode(), at


def _count(buf: bytes, at: int, smallest: int) -> tuple[int, int]:
    """An array or map block's item count; each item takes at least ``smallest`` bytes."""
    count, at = _long(buf, at)
    if count < 0 or count * smallest > len(buf) - at:
        raise _Unsure
    return count, at


def _tensor(buf: bytes, at: int) -> tuple[Tensor, int]:
    name, at = _text(buf, at)
    index, at = _long(buf, at)
    if not 0 <= index < len(DATATYPE_SYMBOLS):
        raise _Unsure
    shape: list[int] = []
    count, at = _count(buf, at, 1)
    while count:
        for _ in range(count):
            dim, at = _long(buf, at)
            shape.append(dim)
        count, at = _count(buf, at, 1)
    data, at = _raw(buf, at)
    return Tensor(name, DATATYPE_SYMBOLS[index], tuple(shape), data), at


def _parameter(buf: bytes, at: int) -> tuple[str | int | float | bool, int]:
    branch, at = _long(buf, at)
    if branch == _STRING:
        return _text(buf, at)
    if branch == _LONG:
        return _long(buf, at)
    if branch == _DOUBLE_BRANCH:
        if at + 8 > len(buf):
            raise _Unsure
        return _DOUBLE.unpack_from(buf, at)[0], at + 8
    if branch == _BOOLEAN and at < len(buf) and buf[at] in (0, 1):
        return buf[at] == 1, at + 1
    raise _Unsure


def _present(buf: bytes, at: int) -> tuple[bool, int]:
    """A ``["null", X]`` union's branch: whether an X follows."""
    branch, at = _long(buf, at)
    if branch not in (0, 1):
        raise _Unsure
    return branch == 1, at


def _parameters(buf: bytes, at: int) -> tuple[Parameters | None, int]:
    present, at = _present(buf, at)
    if not present:
        return None, at
    out: Parameters = {}
    count, at = _count(buf, at, 2)
    while count:
        for _ in range(count):
            key, at = _text(buf, at)
            out[key], at = _parameter(buf, at)
        count, at = _count(buf, at, 2)
    return out, at


def _optional_text(buf: bytes, at: int) -> tuple[str | None, int]:
    present, at = _present(buf, at)
    return _text(buf, at) if present else (None, at)


def read_request(body: bytes, start: int = 0) -> InferenceRequest | None:
    """The request body of the current schema in ``body[start:]``, or None: fastavro reads it."""
    try:
        ident, at = _text(body, start)
        for size in _LAYOUT_SIZES:
            layout = _LAYOUTS.get(body[at : at + size])
            if layout is not None:
                return _laid_out(body, ident, at, at + size, layout)
        return _read_rest(body, ident, at)
    except (_Unsure, IndexError, UnicodeDecodeError):
        return None


def _read_rest(body: bytes, ident: str, after_id: int) -> InferenceRequest | None:
    """Everything after the id, field by field; a one-tensor request's layout is kept."""
    model, at = _text(body, after_id)
    version, at = _optional_text(body, at)
    inputs: list[Tensor] = []
    count, at = _count(body, at, 4)
    blocks = [count]
    data_end = 0
    while count:
        for _ in range(count):
            tensor, at = _tensor(body, at)
            inputs.append(tensor)
            data_end = at
        count, at = _count(body, at, 4)
        blocks.append(count)
    request = _tail(body, at, ident=ident, model=model, version=version, inputs=inputs)
    if request is not None and blocks == [1, 0]:  # only what was read whole teaches a layout
        _learn(body[after_id : data_end - len(inputs[0].data)], model, version, inputs[0])
    return request


def _tail(
    body: bytes, at: int, *, ident: str, model: str, version: str | None, inputs: list[Tensor]
) -> InferenceRequest | None:
    """The parameters and the deadline, then the end of the body."""
    parameters, at = _parameters(body, at)
    present, at = _present(body, at)
    deadline = None
    if present:
        deadline, at = _long(body, at)
    if at != len(body):
        return None
    return InferenceRequest(ident, model, inputs, version, parameters, deadline)


# A layout: the bytes from the model name to the length of a one-tensor request's data, and
# what they say. Requests of one producer and model repeat it, so each is read in one lookup.
_Layout = tuple[str, "str | None", str, str, tuple[int, ...], int]
_LAYOUTS: dict[bytes, _Layout] = {}
_LAYOUT_SIZES: list[int] = []
_MAX_LAYOUTS = 64
"""Layouts kept (all forgotten when more come: any traffic only ever costs the slow path)."""
_MAX_LAYOUT_SIZES = 8
"""Distinct layout lengths kept: a request is looked up once per length."""
_MAX_LAYOUT_BYTES = 256
"""Longest layout kept: a name or shape longer than that is read field by field."""


def _learn(prefix: bytes, model: str, version: str | None, tensor: Tensor) -> None:
    if len(prefix) > _MAX_LAYOUT_BYTES:
        return
    fresh_size = len(prefix) not in _LAYOUT_SIZES
    if len(_LAYOUTS) >= _MAX_LAYOUTS or (fresh_size and len(_LAYOUT_SIZES) >= _MAX_LAYOUT_SIZES):
        _LAYOUTS.clear()
        _LAYOUT_SIZES.clear()
        fresh_size = True
    layout = (model, version, tensor.name, tensor.datatype, tensor.shape, len(tensor.data))
    _LAYOUTS[prefix] = layout
    if fresh_size:
        _LAYOUT_SIZES.append(len(prefix))


def _laid_out(
    body: bytes, ident: str, after_id: int, at: int, layout: _Layout
) -> InferenceRequest | None:
    """A request whose bytes up to its data match ``layout``: its data, then its tail."""
    model, version, name, datatype, shape, size = layout
    end = at + size
    if end > len(body):
        return None
    inputs = [Tensor(name, datatype, shape, body[at:end])]
    if body[end:] == _NOTHING_MORE:
        return InferenceRequest(ident, model, inputs, version)
    if body[end : end + 1] != b"\x00":  # more tensors: read field by field
        return _read_rest(body, ident, after_id)
    return _tail(body, end + 1, ident=ident, model=model, version=version, inputs=inputs)


_NOTHING_MORE = b"\x00\x00\x00"
"""The inputs' end, no parameters, no deadline."""


# -- writing ----------------------------------------------------------------------------------


def _varint(value: int, bits: int = 64) -> bytes:
    """``value`` as a zig-zag varint (an Avro ``long``; ``bits=32``: an ``int``)."""
    if type(value) is not int or not -(1 << (bits - 1)) <= value < 1 << (bits - 1):
        raise _Unsure
    value = (value << 1) ^ (value >> 63)
    if value < _MORE:
        return _SMALL[value]
    if value < _TWO_BYTES:  # timings of a few ms, shapes, lengths: one or two bytes mostly
        return bytes((value & 0x7F | _MORE, value >> 7))
    out = bytearray()
    while value >= _MORE:
        out.append((value & 0x7F) | _MORE)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    return _varint(len(raw)) + raw


def _shape(shape: tuple[int, ...]) -> bytes:
    if type(shape) is not tuple:
        raise _Unsure
    if not shape:
        return b"\x00"
    return _varint(len(shape)) + b"".join(_varint(d) for d in shape) + b"\x00"


def _output(tensor: Tensor) -> bytes:
    data = tensor.data
    if type(data) is not bytes:
        raise _Unsure
    return b"".join((
        _string(tensor.name), _SMALL[_INDEX[tensor.datatype] << 1], _shape(tensor.shape),
        _varint(len(data)), data,
    ))  # fmt: skip


def _start(model: str, version: str | None) -> bytes:
    """The model name and version of a reply."""
    return _string(model) + (b"\x00" if version is None else b"\x02" + _string(version))


# A head: a one-output reply's bytes from the model name to its data's length, by what they
# say. The replies of one model version repeat it (but for the batch's row count).
_Head = tuple[str, "str | None", str, str, tuple[int, ...], int]
_HEADS: dict[_Head, bytes] = {}
_MAX_HEADS = 256
"""Heads kept (all forgotten when more come)."""


def _head(key: _Head) -> bytes:
    model, version, name, datatype, shape, size = key
    head = b"".join((
        _start(model, version), b"\x02", _string(name), _SMALL[_INDEX[datatype] << 1],
        _shape(shape), _varint(size),
    ))  # fmt: skip
    if len(_HEADS) >= _MAX_HEADS:
        _HEADS.clear()
    _HEADS[key] = head
    return head


def _end(timing: Timing | None) -> bytes:
    """After the outputs: their end, no error, the timing, no parameters."""
    if timing is None:
        return b"\x00\x00\x00\x00"
    return b"\x00\x00\x02" + _varint(timing.queue_us) + _batch(timing.compute_us, timing.batch_size)


@lru_cache(maxsize=64)
def _batch(compute_us: int, batch_size: int) -> bytes:
    """The timing a batch's replies share, and the parameters' null: encoded once a batch."""
    return _varint(compute_us) + _varint(batch_size, 32) + b"\x00"


def write_response(response: InferenceResponse) -> bytes | None:
    """A response body of the current schema, or None when fastavro must write it.

    Raises what fastavro would for text UTF-8 cannot carry (``UnicodeEncodeError``).
    """
    if response.parameters is not None or response.error is not None:
        return None
    outputs = response.outputs
    try:
        if len(outputs) == 1 and type(data := outputs[0].data) is bytes:
            out = outputs[0]
            key = (
                response.model_name, response.model_version, out.name, out.datatype, out.shape,
                len(data),
            )  # fmt: skip
            head = _HEADS.get(key) or _head(key)
            return b"".join((_string(response.id), head, data, _end(response.timing)))
        parts = [_string(response.id), _start(response.model_name, response.model_version)]
        if outputs:
            parts.append(_varint(len(outputs)))
            parts += [_output(t) for t in outputs]
        parts.append(_end(response.timing))
    except (_Unsure, KeyError, TypeError, AttributeError):  # fastavro words the refusal
        return None
    return b"".join(parts)
