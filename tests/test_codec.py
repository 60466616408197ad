"""Unit tests of the Avro codec and tensor conversions (no Kafka)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import fastavro
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.codec import (
    SOE_MARKER,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    schema_dir,
)
from worker.domain import (
    DATATYPES,
    MAX_STRINGS,
    ErrorInfo,
    InferenceRequest,
    InferenceResponse,
    Tensor,
    Timing,
)
from worker.errors import DecodeError, ErrorCode, ReplyError, RequestError

_CRC64_EMPTY = 0xC15D213AA4D7A795


def crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO exactly as the Avro specification writes it (independent of fastavro)."""
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_CRC64_EMPTY & -(fp & 1))
        table.append(fp)
    fp = _CRC64_EMPTY
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def sample_request() -> InferenceRequest:
    return InferenceRequest(
        id="req-1",
        model_name="digits",
        model_version="1",
        inputs=[Tensor.from_numpy("pixels", np.arange(128, dtype=np.float32).reshape(2, 64))],
        parameters={"priority": 3, "tag": "x", "flag": True, "w": 0.5},
    )


def test_request_round_trip() -> None:
    """A request survives encode/decode unchanged, parameters included."""
    request = sample_request()
    assert decode_request(encode_request(request)) == request


def test_response_round_trip_with_error_and_timing() -> None:
    """A response with outputs, error and timing survives encode/decode unchanged."""
    response = InferenceResponse(
        id="r",
        model_name="digits",
        model_version="2",
        outputs=[Tensor.from_numpy("label", np.array([3, 4], dtype=np.int64))],
        error=ErrorInfo("INTERNAL", "boom"),
        timing=Timing(queue_us=10, compute_us=20, batch_size=2),
        parameters={"truncated": 2, "note": "x"},
    )
    assert decode_response(encode_response(response)) == response


def test_tensors_are_found_by_name_among_several() -> None:
    """request.input and response.output pick the tensor of that name, not the first."""
    a, b = np.zeros(2, np.float32), np.arange(3, dtype=np.int64)
    request = InferenceRequest("r", "m", [Tensor.from_numpy("a", a), Tensor.from_numpy("b", b)])
    found = request.input("b")
    assert found is not None
    assert found.name == "b"
    assert request.input("c") is None
    response = InferenceResponse("r", "m", outputs=request.inputs)
    np.testing.assert_array_equal(response.output("b"), b)
    np.testing.assert_array_equal(response.output("a"), a)
    with pytest.raises(KeyError, match="no output 'c'"):
        response.output("c")


def spec_header(path: Path) -> bytes:
    """The single-object header of messages written with the schema at ``path``."""
    schema = fastavro.parse_schema(json.loads(path.read_text()))
    canonical = fastavro.schema.to_parsing_canonical_form(schema).encode()
    return SOE_MARKER + crc64_avro(canonical).to_bytes(8, "little")


def test_single_object_header_matches_the_avro_spec() -> None:
    """Every message starts with C3 01 and the little-endian CRC-64-AVRO of the current schema.

    With or without a BYTES tensor: a reader holding only the current schema files reads all.
    """
    request_header = spec_header(schema_dir() / "inference_request.avsc")
    response_header = spec_header(schema_dir() / "inference_response.avsc")
    strings = InferenceRequest("s", "m", [Tensor.from_strings("text", ["hi"])])
    assert encode_request(strings)[:10] == request_header
    assert encode_request(sample_request())[:10] == request_header
    words = InferenceResponse("r", "m", outputs=[Tensor.from_strings("tag", ["B-PER"])])
    assert encode_response(words)[:10] == response_header
    numbers = InferenceResponse("r", "m", outputs=[Tensor.from_numpy("x", np.zeros(1))])
    assert encode_response(numbers)[:10] == response_header


def test_readers_of_the_previous_schemas_resolve_current_messages() -> None:
    """A reader still on the previous schema reads a message with no BYTES by resolution.

    It names the current schema as the writer (what schemas/history/README.md tells it to
    register) and its own as the reader.
    """
    history = schema_dir() / "history"
    current_reply = fastavro.parse_schema(
        json.loads((schema_dir() / "inference_response.avsc").read_text())
    )
    old_reply = fastavro.parse_schema(
        json.loads((history / "inference_response.v1.avsc").read_text())
    )
    value = encode_response(
        InferenceResponse("r", "m", outputs=[Tensor.from_numpy("x", np.ones(2, np.float32))])
    )
    record = fastavro.schemaless_reader(io.BytesIO(value[10:]), current_reply, old_reply)
    assert isinstance(record, dict)
    assert record["outputs"][0]["datatype"] == "FP32"
    current_request = fastavro.parse_schema(
        json.loads((schema_dir() / "inference_request.avsc").read_text())
    )
    old_request = fastavro.parse_schema(
        json.loads((history / "inference_request.v2.avsc").read_text())
    )
    record = fastavro.schemaless_reader(
        io.BytesIO(encode_request(sample_request())[10:]), current_request, old_request
    )
    assert isinstance(record, dict)
    assert record["inputs"][0]["datatype"] == "FP32"


def test_strings_round_trip_through_the_wire_format() -> None:
    """BYTES tensors: 4-byte little-endian lengths then bytes; str arrays become UTF-8."""
    tensor = Tensor.from_numpy("text", np.array([["a", "héllo"], ["", "x" * 300]]))
    assert tensor.datatype == "BYTES"
    assert tensor.shape == (2, 2)
    assert tensor.data[:5] == b"\x01\x00\x00\x00a"
    assert tensor.data[5:9] == len("héllo".encode()).to_bytes(4, "little")
    array = tensor.to_numpy()
    assert array.shape == (2, 2)
    assert array.tolist() == [[b"a", "héllo".encode()], [b"", b"x" * 300]]
    request = InferenceRequest("s", "m", [tensor])
    assert decode_request(encode_request(request)) == request


def test_datatype_names_and_layouts_are_the_open_inference_protocols() -> None:
    """Each OIP datatype name maps to its little-endian numpy layout (the spec's table)."""
    spec = {
        "BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
        "INT8": "|i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
        "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
    }  # fmt: skip
    assert {name: dtype.str for name, dtype in DATATYPES.items()} == spec


def test_zero_sized_tensors_are_accepted() -> None:
    """A dimension of 0 is a valid empty tensor, numeric or strings (only negatives are not)."""
    assert Tensor("x", "FP32", (0, 64), b"").to_numpy().shape == (0, 64)
    assert Tensor("t", "BYTES", (2, 0), b"").to_numpy().shape == (2, 0)


def test_the_largest_string_tensor_allowed_decodes() -> None:
    """Exactly MAX_STRINGS elements decode; one more is refused."""
    assert Tensor.from_strings("t", [b""] * MAX_STRINGS).to_numpy().size == MAX_STRINGS
    with pytest.raises(RequestError, match="more than 65536 elements"):
        Tensor.from_strings("t", [b""] * (MAX_STRINGS + 1)).to_numpy()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=30))
def test_any_list_of_byte_strings_round_trips(items: list[bytes]) -> None:
    """from_strings then to_numpy gives back exactly the items, in order."""
    assert Tensor.from_strings("t", items).to_numpy().tolist() == items


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64), st.lists(st.integers(-2, 2**40), max_size=4))
def test_malformed_strings_are_invalid_argument_never_a_crash(
    data: bytes, shape: list[int]
) -> None:
    """Any bytes under any shape: a BYTES tensor decodes or raises INVALID_ARGUMENT."""
    try:
        array = Tensor("t", "BYTES", tuple(shape), data).to_numpy()
    except RequestError as exc:
        code = exc.code
        assert code == ErrorCode.INVALID_ARGUMENT
    else:
        assert array.size == int(np.prod(shape))
        assert sum(4 + len(item) for item in array.ravel()) == len(data)


@pytest.mark.parametrize(
    ("data", "shape", "fragment"),
    [
        (b"\x05\x00\x00\x00abc", (1,), "declares 5 bytes; 3 are left"),
        (b"\x01\x00\x00\x00a\x00\x00\x00", (2,), "ends inside the length of element 1"),
        (b"\x01\x00\x00\x00ab", (1,), "1 bytes after its 1 elements"),
        (b"\x00\x00\x00\x00\x00\x00", (2,), "needs at least 8 bytes"),
        (b"", (70_000,), "more than 65536 elements"),
        (b"", (-1,), "negative dimension"),
    ],
)
def test_bad_string_tensors_say_what_is_wrong(
    data: bytes, shape: tuple[int, ...], fragment: str
) -> None:
    """Each malformed BYTES tensor's error names the problem."""
    with pytest.raises(RequestError, match=re.escape(fragment)):
        Tensor("t", "BYTES", shape, data).to_numpy()


def test_reply_body_decodes_with_a_plain_avro_reader() -> None:
    """After the 10-byte header, a reply is plain Avro binary of inference_response.avsc."""
    value = encode_response(InferenceResponse(id="a", model_name="m"))
    schema = json.loads((schema_dir() / "inference_response.avsc").read_text())
    record = fastavro.schemaless_reader(io.BytesIO(value[10:]), fastavro.parse_schema(schema), None)
    assert isinstance(record, dict)
    assert record["id"] == "a"
    assert record["error"] is None


def test_bare_avro_binary_request_is_accepted() -> None:
    """A request written as bare Avro binary (no header) decodes the same."""
    request = sample_request()
    assert decode_request(encode_request(request)[10:]) == request


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (b"", "empty"),
        (None, "empty"),
        (b"\x00\x01\x02garbage", "not an Avro-encoded"),
        (SOE_MARKER + b"\x00" * 8 + b"\x02a", "fingerprint"),
    ],
)
def test_undecodable_values_raise_decode_error(value: bytes | None, fragment: str) -> None:
    """Empty, random and foreign-schema values raise DecodeError with a useful message."""
    with pytest.raises(DecodeError, match=fragment) as info:
        decode_request(value)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT


def test_truncated_and_padded_values_are_rejected() -> None:
    """A truncated request, or one with trailing bytes, is not silently accepted."""
    value = encode_request(sample_request())
    with pytest.raises(DecodeError):
        decode_request(value[:-5])
    with pytest.raises(DecodeError, match="bytes left"):
        decode_request(value + b"\x00\x00")


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_every_datatype_round_trips_through_numpy(datatype: str) -> None:
    """Tensor.from_numpy/to_numpy keep dtype, shape and values for every OIP datatype."""
    array = (np.arange(6) % 2).astype(DATATYPES[datatype]).reshape(2, 3)
    tensor = Tensor.from_numpy("x", array)
    assert tensor.datatype == datatype
    assert tensor.shape == (2, 3)
    np.testing.assert_array_equal(tensor.to_numpy(), array)


def test_to_numpy_is_zero_copy() -> None:
    """Decoding tensor bytes to numpy does not copy the payload."""
    tensor = Tensor.from_numpy("x", np.ones((4, 4), dtype=np.float32))
    array = tensor.to_numpy()
    assert not array.flags.owndata
    assert not array.flags.writeable


@pytest.mark.parametrize(
    ("tensor", "fragment"),
    [
        (Tensor("x", "FP32", (2, 2), b"\x00" * 15), "needs 16 bytes, data has 15"),
        (Tensor("x", "FP32", (-1, 4), b""), "negative"),
        (Tensor("x", "BF16", (1,), b"\x00\x00"), "unknown datatype"),
        (Tensor("x", "FP32", (2**40, 2**40), b"\x00" * 4), "needs"),
    ],
)
def test_bad_tensors_raise_invalid_argument(tensor: Tensor, fragment: str) -> None:
    """Byte length, negative or huge shapes and unknown datatypes raise INVALID_ARGUMENT."""
    with pytest.raises(RequestError, match=fragment) as info:
        tensor.to_numpy()
    assert info.value.code is ErrorCode.INVALID_ARGUMENT


def test_output_accessor_raises_on_error_reply() -> None:
    """InferenceResponse.output raises ReplyError carrying the code of an error reply."""
    reply = InferenceResponse(id="i", model_name="m", error=ErrorInfo("NOT_FOUND", "no model"))
    with pytest.raises(ReplyError) as info:
        reply.output("label")
    assert info.value.code == "NOT_FOUND"


def test_v1_writers_are_still_read_with_deadline_defaulted() -> None:
    """A request written with the v1 schema (no deadline_ms) decodes, single-object or bare."""
    path = schema_dir() / "history" / "inference_request.v1.avsc"
    v1 = fastavro.parse_schema(json.loads(path.read_text()))
    canonical = fastavro.schema.to_parsing_canonical_form(v1).encode()
    record = {
        "id": "old",
        "model_name": "digits",
        "model_version": None,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": b"\x00" * 4}],
        "parameters": None,
    }
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, v1, record)
    header = SOE_MARKER + crc64_avro(canonical).to_bytes(8, "little")
    for value in (header + buf.getvalue(), buf.getvalue()):
        request = decode_request(value)
        assert request.id == "old"
        assert request.deadline_ms is None
        assert request.inputs[0].shape == (1,)


def test_deadline_round_trips() -> None:
    """deadline_ms (added in v2) survives encode/decode."""
    request = InferenceRequest(id="d", model_name="m", inputs=[], deadline_ms=1_800_000_000_000)
    assert decode_request(encode_request(request)).deadline_ms == 1_800_000_000_000
