"""The hand-written Avro of worker.avro_binary against fastavro, the reference (no Kafka)."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from typing import Any

import fastavro
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import avro_binary
from worker.avro_binary import DATATYPE_SYMBOLS, read_request, write_response
from worker.codec import (
    SOE_MARKER,
    decode_request,
    encode_request,
    encode_response,
    encode_response_body,
    schema_dir,
)
from worker.domain import ErrorInfo, InferenceRequest, InferenceResponse, Tensor, Timing

REQUEST = fastavro.parse_schema(json.loads((schema_dir() / "inference_request.avsc").read_text()))
RESPONSE = fastavro.parse_schema(json.loads((schema_dir() / "inference_response.avsc").read_text()))
LONGS = st.integers(-(2**63), 2**63 - 1)
TEXT = st.text(max_size=12)
PARAMETER = st.one_of(TEXT, LONGS, st.floats(allow_nan=False), st.booleans())
TENSORS = st.builds(
    Tensor,
    name=TEXT,
    datatype=st.sampled_from(DATATYPE_SYMBOLS),
    shape=st.lists(LONGS, max_size=4).map(tuple),
    data=st.binary(max_size=24),
)
REQUESTS = st.builds(
    InferenceRequest,
    id=TEXT,
    model_name=TEXT,
    inputs=st.lists(TENSORS, max_size=3),
    model_version=st.none() | TEXT,
    parameters=st.none() | st.dictionaries(TEXT, PARAMETER, max_size=3),
    deadline_ms=st.none() | LONGS,
)


def by_fastavro(body: bytes) -> InferenceRequest | None:
    """What fastavro reads from ``body`` (all of it), or None where it refuses it."""
    buf = io.BytesIO(body)
    try:
        rec: Any = fastavro.schemaless_reader(buf, REQUEST, REQUEST)
    except Exception:  # noqa: BLE001 - any refusal is a refusal
        return None
    if buf.tell() != len(body):
        return None
    tensors = [
        Tensor(t["name"], t["datatype"], tuple(t["shape"]), t["data"]) for t in rec["inputs"]
    ]
    return InferenceRequest(
        rec["id"], rec["model_name"], tensors, rec["model_version"], rec["parameters"],
        rec["deadline_ms"],
    )  # fmt: skip


def same(fast: InferenceRequest | None, reference: InferenceRequest | None) -> bool:
    """Equal requests; a NaN parameter (a mangled double) equals itself here."""
    return fast == reference or repr(fast) == repr(reference)


def bare(request: InferenceRequest) -> bytes:
    """The request as fastavro writes it, without the single-object header."""
    return encode_request(request)[10:]


@settings(max_examples=400, deadline=None)
@given(REQUESTS)
def test_reads_generated_requests_as_fastavro_does(request: InferenceRequest) -> None:
    """A request written by fastavro reads back by hand, equal to the request and to fastavro's."""
    body = bare(request)
    assert read_request(body) == request == by_fastavro(body)
    assert read_request(SOE_MARKER + bytes(8) + body, 10) == request


@settings(max_examples=600, deadline=None)
@given(REQUESTS, st.data())
def test_mangled_records_are_read_as_fastavro_reads_them(
    request: InferenceRequest, data: st.DataObject
) -> None:
    """A record with bytes changed, cut or added is read by hand only as fastavro reads it."""
    body = bytearray(bare(request))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(body)))
        what = data.draw(st.sampled_from(["set", "cut", "add"]))
        if what == "set" and at < len(body):
            body[at] = data.draw(st.integers(0, 255))
        elif what == "cut":
            del body[at:]
        else:
            body[at:at] = data.draw(st.binary(min_size=1, max_size=10))
    mangled = bytes(body)
    fast = read_request(mangled)
    if fast is not None:
        assert same(fast, by_fastavro(mangled))


@settings(max_examples=800, deadline=None)
@given(st.binary(max_size=80))
def test_random_bytes_are_read_as_fastavro_reads_them(body: bytes) -> None:
    """Any bytes at all are either left to fastavro or read as fastavro reads them."""
    fast = read_request(body)
    if fast is not None:
        assert same(fast, by_fastavro(body))


@settings(max_examples=500, deadline=None)
@given(REQUESTS, st.data())
def test_requests_of_a_known_layout_are_read_as_fastavro_reads_them(
    request: InferenceRequest, data: st.DataObject
) -> None:
    """A request laid out as one read before (model to data length) is read as fastavro reads it.

    Its id, data bytes, parameters, deadline and anything after its data may differ, or be
    mangled; the first read teaches the layout, the others use it.
    """
    first = request.inputs[0] if request.inputs else Tensor("x", "FP32", (1,), bytes(4))
    known = replace(request, inputs=[first])
    assert read_request(bare(known)) == known  # learnt
    again = data.draw(REQUESTS)
    data_bytes = data.draw(st.binary(min_size=len(first.data), max_size=len(first.data)))
    more = data.draw(st.lists(TENSORS, max_size=1))
    alike = replace(
        again, model_name=known.model_name, model_version=known.model_version,
        inputs=[replace(first, data=data_bytes), *more],
    )  # fmt: skip
    body = bare(alike)
    assert read_request(body) == alike == by_fastavro(body)
    cut = data.draw(st.integers(0, len(body)))
    mangled = body[:cut] + data.draw(st.binary(max_size=6))
    fast = read_request(mangled)
    if fast is not None:
        assert same(fast, by_fastavro(mangled))


def test_layouts_survive_unusual_but_valid_blocks() -> None:
    """Inputs in two blocks of one, or ended by a two-byte zero, are read as fastavro reads them."""
    one = Tensor("in", "INT8", (1, 3), b"\x07\x08\x09")
    request = InferenceRequest("id-1", "blocks", [one])
    body = bare(request)
    at = body.index(b"\x07\x08\x09") + 3
    assert body[at:] == b"\x00\x00\x00"
    assert read_request(body) == request  # learnt: "blocks" ... up to the data
    second = bare(InferenceRequest("", "x", [Tensor("more", "INT8", (1,), b"\x05")]))
    tensor = second[second.index(b"\x08more") :][:-3]  # name, type, shape, data
    two_blocks = body[:at] + b"\x02" + tensor + b"\x00\x00\x00"
    assert read_request(two_blocks) == by_fastavro(two_blocks)
    assert by_fastavro(two_blocks) == replace(
        request, inputs=[one, Tensor("more", "INT8", (1,), b"\x05")]
    )
    long_zero = body[:at] + b"\x80\x00" + b"\x00\x00"  # a zero count written in two bytes
    other = "other-layout"
    long_zero = long_zero.replace(b"\x0cblocks", b"\x18" + other.encode())
    assert read_request(long_zero) == by_fastavro(long_zero) is not None
    same_first_byte = bare(InferenceRequest("id-2", other, [replace(one, data=b"\x07\x01\x02")]))
    assert read_request(same_first_byte) == by_fastavro(same_first_byte)


def test_layouts_kept_are_bounded() -> None:
    """However many layouts traffic brings, at most _MAX_LAYOUTS are kept."""
    for i in range(avro_binary._MAX_LAYOUTS * 3):
        request = InferenceRequest(str(i), f"model-{i}", [Tensor("x", "FP32", (i,), bytes(4))])
        assert read_request(bare(request)) == request
        assert len(avro_binary._LAYOUTS) <= avro_binary._MAX_LAYOUTS
    assert len(avro_binary._LAYOUT_SIZES) <= avro_binary._MAX_LAYOUTS


def varint(value: int) -> bytes:
    """``value`` (non-negative) as an Avro zig-zag varint."""
    value <<= 1
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def test_refused_or_long_records_teach_no_layout() -> None:
    """Records refused at their tail, or with layouts over 256 bytes, are never kept."""
    avro_binary._LAYOUTS.clear()
    avro_binary._LAYOUT_SIZES.clear()
    shape = varint(300) + varint(1) * 300 + b"\x00"  # a 300-dimension shape
    for i in range(70):
        name = f"m{i}".encode()
        head = varint(1) + b"x" + varint(len(name)) + name + b"\x00\x02" + varint(1) + b"t\x14"
        refused = head + varint(0) * 2 + b"\x00\x00\x7f"  # a deadline branch of -64
        assert read_request(refused) is None
        long = head + shape + varint(0) + b"\x00\x00\x00"
        assert read_request(long) == by_fastavro(long) is not None
    assert not avro_binary._LAYOUTS
    assert not avro_binary._LAYOUT_SIZES


def test_layout_lengths_kept_are_few() -> None:
    """Layouts of many lengths: at most 8 lengths are looked up per request."""
    for i in range(40):
        request = InferenceRequest("id", "m" * (i + 1), [Tensor("x", "FP32", (1,), bytes(4))])
        assert read_request(bare(request)) == request
        assert len(avro_binary._LAYOUT_SIZES) <= avro_binary._MAX_LAYOUT_SIZES


def test_decode_request_takes_bytearray_and_memoryview() -> None:
    """The public decode_request reads a bytearray or memoryview as it reads the same bytes."""
    request = InferenceRequest("id", "m", [Tensor("x", "FP32", (1,), bytes(4))])
    value = encode_request(request)
    for kind in (
        bytearray(value),
        memoryview(value),
        bytearray(value[10:]),
        memoryview(value)[10:],
    ):
        assert decode_request(kind) == request


def test_unsure_records_are_left_to_fastavro() -> None:
    """Overlong varints, negative block counts, unknown enums and leftovers are not read by hand."""
    good = bare(InferenceRequest("id", "m", [Tensor("x", "FP32", (1,), bytes(4))]))
    assert read_request(good) is not None
    assert read_request(good + b"\x00") is None  # a byte left over
    assert read_request(b"\xff" * 11 + good) is None  # a varint past 64 bits
    negative = bare(InferenceRequest("id", "m", []))
    assert read_request(negative.replace(b"m\x00\x00", b"m\x00\x01", 1)) is None  # count -1
    enum = good.replace(b"x\x14", b"x\x1a", 1)  # FP32 (10) -> index 13: no such symbol
    assert read_request(enum) is None
    assert read_request(good.replace(b"\x04id", b"\x01id", 1)) is None  # a length of -1
    deadline = bare(InferenceRequest("id", "m", [], deadline_ms=1))
    assert deadline.endswith(b"\x02\x02")
    past_64_bits = deadline[:-1] + b"\xff" * 9 + b"\x7f"  # ten bytes, 70 bits of value
    assert read_request(past_64_bits) is None
    flag = bare(InferenceRequest("id", "m", [], parameters={"b": True}))
    assert flag.endswith(b"\x06\x01\x00\x00")  # boolean branch (3), true, map end, no deadline
    assert read_request(flag[:-3] + b"\x02\x00\x00") is None  # a boolean byte of 2
    assert decode_request(encode_request(InferenceRequest("id", "m", []))) == InferenceRequest(
        "id", "m", []
    )  # what is left to fastavro is still read


OUTPUTS = st.builds(
    Tensor,
    name=TEXT,
    datatype=st.sampled_from(DATATYPE_SYMBOLS),
    shape=st.lists(st.integers(-(2**64), 2**64), max_size=3).map(tuple),
    data=st.binary(max_size=24),
)
RESPONSES = st.builds(
    InferenceResponse,
    id=st.text(max_size=12),  # lone surrogates included: neither writer can carry them
    model_name=TEXT,
    model_version=st.none() | TEXT,
    outputs=st.lists(OUTPUTS, max_size=3),
    error=st.none() | st.builds(ErrorInfo, TEXT, TEXT),
    timing=st.none() | st.builds(Timing, LONGS, LONGS, st.integers(-(2**32), 2**32)),
    parameters=st.none() | st.dictionaries(TEXT, PARAMETER, max_size=2),
)


def fastavro_body(response: InferenceResponse) -> bytes | type[Exception]:
    """The response body fastavro writes (unions as plain dicts), or the type of what it raises."""
    error, timing = response.error, response.timing
    record = {
        "id": response.id,
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": [
            {"name": t.name, "datatype": t.datatype, "shape": t.shape, "data": t.data}
            for t in response.outputs
        ],
        "error": None if error is None else {"code": error.code, "message": error.message},
        "timing": None if timing is None else {
            "queue_us": timing.queue_us, "compute_us": timing.compute_us,
            "batch_size": timing.batch_size,
        },
        "parameters": response.parameters,
    }  # fmt: skip
    buf = io.BytesIO()
    try:
        fastavro.schemaless_writer(buf, RESPONSE, record)
    except Exception as exc:  # noqa: BLE001 - compared with what the hand-written path does
        return type(exc)
    return buf.getvalue()


@settings(max_examples=800, deadline=None)
@given(RESPONSES)
def test_writes_replies_byte_for_byte_as_fastavro(response: InferenceResponse) -> None:
    """Each reply written by hand is fastavro's bytes; what it leaves, fastavro writes."""
    reference = fastavro_body(response)
    try:
        fast = write_response(response)
    except UnicodeEncodeError:
        assert not isinstance(reference, bytes)
        return
    if fast is not None:
        assert fast == reference
    if isinstance(reference, bytes):
        assert encode_response(response)[10:] == reference == encode_response_body(response)


@settings(max_examples=400, deadline=None)
@given(RESPONSES, st.data())
def test_replies_of_a_known_head_are_written_as_fastavro_writes_them(
    response: InferenceResponse, data: st.DataObject
) -> None:
    """A one-output reply like one written before (but id, data and timing) is fastavro's bytes."""
    out = response.outputs[0] if response.outputs else Tensor("y", "FP32", (1, 2), bytes(8))
    first = replace(response, outputs=[out], error=None, parameters=None)
    if not isinstance(fastavro_body(first), bytes):
        return
    assert write_response(first) == fastavro_body(first)  # its head is kept
    again = data.draw(RESPONSES)
    alike = replace(
        first, id=again.id, timing=again.timing,
        outputs=[replace(out, data=data.draw(st.binary(min_size=len(out.data),
                                                       max_size=len(out.data))))],
    )  # fmt: skip
    reference = fastavro_body(alike)
    if isinstance(reference, bytes):
        assert write_response(alike) == reference


def test_heads_kept_are_bounded() -> None:
    """However many model versions and shapes reply, at most _MAX_HEADS heads are kept."""
    for i in range(avro_binary._MAX_HEADS * 2):
        response = InferenceResponse("r", "m", str(i), [Tensor("y", "FP32", (i,), b"")])
        assert write_response(response) == fastavro_body(response)
        assert len(avro_binary._HEADS) <= avro_binary._MAX_HEADS


def test_covers_the_usual_reply() -> None:
    """A model's reply (outputs and timing, no error or parameters) is written by hand."""
    response = InferenceResponse(
        "req-1", "mlp", "1", [Tensor("logits", "FP32", (1, 10), bytes(40))],
        timing=Timing(1234, 5678, 64),
    )  # fmt: skip
    assert write_response(response) == fastavro_body(response)
    assert write_response(InferenceResponse("r", "m", error=ErrorInfo("X", "y"))) is None
