"""Wire formats (worker.formats, v2json, v2proto): detection, decoding, replies in kind."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import fastavro
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from worker.admission import Admitted, admit
from worker.codec import decode_response, encode_request, schema_text
from worker.domain import ErrorInfo, InferenceRequest, InferenceResponse, Tensor, Timing
from worker.errors import DecodeError, ErrorCode, RequestError
from worker.formats import PLAIN, Codecs, WireFormat, framed_schema_id, wire_format
from worker.oip import pb
from worker.repository import ModelRepository

from .test_admission import DEST, LIMITS, ROW, answered, record

ROOT = Path(__file__).resolve().parent.parent
JSON = [("content-type", b"application/json")]
PROTO = [("content-type", b"application/x-protobuf")]
PIXELS = np.arange(128, dtype=np.float32).reshape(2, 64)


def json_request(body: dict[str, Any], headers: list[tuple[str, bytes]] | None = None) -> Any:
    """Decode a V2 JSON body with a model_name header (and more headers)."""
    hdrs = [*JSON, ("model_name", b"digits"), *(headers or [])]
    return PLAIN.decode(json.dumps(body).encode(), hdrs, None)


# --- which format --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "headers", "kind"),
    [
        (b"\xc3\x01...", [], WireFormat.AVRO),
        (b"\x02ab", [], WireFormat.AVRO),
        (b"\x00\x00\x00\x00\x07body", [], WireFormat.REGISTRY),
        (b"{}", [("content-type", b"application/json")], WireFormat.JSON),
        (b"{}", [("Content-Type", b"application/json; charset=utf-8")], WireFormat.JSON),
        (b"{}", [("seldon-infer-type", b"json/inferModelRequest")], WireFormat.JSON),
        (b"\x00", [("content-type", b"application/x-protobuf")], WireFormat.PROTOBUF),
        (b"", [("content-type", b"application/protobuf")], WireFormat.PROTOBUF),
        (b"", [("seldon-infer-type", b"proto/InferModelRequest")], WireFormat.PROTOBUF),
        (b"\xc3\x01", [("content-type", b"text/plain")], WireFormat.AVRO),
    ],
)
def test_the_format_comes_from_the_content_type_then_the_first_byte(
    value: bytes, headers: list[tuple[str, bytes]], kind: WireFormat
) -> None:
    """Content type (or Seldon's header) decides; else a leading 0 is registry framing."""
    assert wire_format(value, headers) is kind


def test_the_framed_schema_id_is_big_endian_after_the_magic_byte() -> None:
    """0x00, then 4 bytes big-endian; shorter values hold no id."""
    assert framed_schema_id(b"\x00\x00\x00\x01\x02rest") == 258
    assert framed_schema_id(b"\x00\x00\x01") is None
    assert framed_schema_id(b"\x01\x00\x00\x00\x01") is None


# --- KServe V2 JSON ------------------------------------------------------------------------


def test_a_v2_json_request_decodes_to_the_same_tensors_as_avro() -> None:
    """Flat or nested data, the model from the header, the id from the body."""
    flat = json_request({"id": "j1", "inputs": [
        {"name": "pixels", "datatype": "FP32", "shape": [2, 64], "data": PIXELS.ravel().tolist()}
    ]})  # fmt: skip
    nested = json_request({"id": "j1", "inputs": [
        {"name": "pixels", "datatype": "FP32", "shape": [2, 64], "data": PIXELS.tolist()}
    ]})  # fmt: skip
    want = Tensor.from_numpy("pixels", PIXELS)
    assert flat == nested == InferenceRequest("j1", "digits", [want])


def test_v2_json_strings_become_bytes_tensors() -> None:
    """BYTES data are strings (UTF-8), as MLServer and Triton send them."""
    request = json_request({"id": "t", "inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["héllo", "world"]}
    ]})  # fmt: skip
    assert request.inputs[0].to_numpy().tolist() == ["héllo".encode(), b"world"]


def test_v2_json_model_version_and_id_come_from_headers_when_the_body_has_none() -> None:
    """mlserver-model / mlserver-version work; the id falls back to the header, then the key."""
    body = json.dumps({"inputs": []}).encode()
    headers = [*JSON, ("mlserver-model", b"iris"), ("mlserver-version", b"1"),
               ("correlation_id", b"from-header")]  # fmt: skip
    request = PLAIN.decode(body, headers, b"from-key")
    assert (request.model_name, request.model_version, request.id) == ("iris", "1", "from-header")
    keyed = PLAIN.decode(body, [*JSON, ("model_name", b"iris")], b"from-key")
    assert (keyed.model_version, keyed.id) == (None, "from-key")
    with pytest.raises(DecodeError, match="set header model_name"):
        PLAIN.decode(body, JSON, b"k")


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"not json", "record is not JSON"),
        (b"[1, 2]", "must be an object"),
        (b'{"id": "x"}', 'needs "inputs"'),
        (b'{"inputs": [3]}', "inputs[0] must be an object"),
        (
            b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1]}]}',
            "needs 2 values; data has 1",
        ),
        (
            b'{"inputs": [{"name": "a", "datatype": "FP8", "shape": [1], "data": [1]}]}',
            "unknown datatype",
        ),
        (
            b'{"inputs": [{"name": "a", "datatype": "INT8", "shape": [1], "data": [300]}]}',
            "values outside -128..127",
        ),
        (
            b'{"inputs": [{"name": "a", "datatype": "INT64", "shape": [1], "data": [1.5]}]}',
            "floating-point values for an integer datatype",
        ),
        (
            b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": ["x"]}]}',
            "data is not FP32 values",
        ),
        (
            b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [-1], "data": []}]}',
            "negative dimension",
        ),
        (
            b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1.0], "data": [1]}]}',
            "shape must be a list of whole numbers",
        ),
        (
            b'{"inputs": [{"name": "a", "datatype": "BYTES", "shape": [1], "data": [1]}]}',
            "BYTES data holds int",
        ),
        (b'{"inputs": [], "parameters": {"p": [1]}}', "parameters are strings, numbers"),
        (b'{"inputs": [], "id": 7}', "id must be a string"),
        (b"[" * 100_000, "record is not JSON"),
    ],
)
def test_bad_v2_json_is_a_coded_decode_error(body: bytes, says: str) -> None:
    """Every malformed body is INVALID_ARGUMENT saying what was wrong."""
    with pytest.raises(DecodeError) as caught:
        PLAIN.decode(body, [*JSON, ("model_name", b"m")], None)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert says in caught.value.message


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=20,
)  # fmt: skip
TENSORS = st.fixed_dictionaries(
    {
        "name": st.text(max_size=4),
        "datatype": st.sampled_from(["FP32", "INT8", "UINT64", "BOOL", "BYTES", "FP16", "X"]),
        "shape": st.lists(st.integers(-2, 4), max_size=3),
        "data": JSON_VALUES,
    }
)


V2_BODIES = st.fixed_dictionaries(
    {"inputs": st.lists(TENSORS, max_size=3)},
    optional={"id": JSON_VALUES, "parameters": JSON_VALUES},
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(JSON_VALUES, V2_BODIES))
@example({"inputs": [{"name": "", "datatype": "UINT64", "shape": [], "data": [False]}]})
@example({"inputs": [{"name": "", "datatype": "UINT64", "shape": [1], "data": [2**64 - 1]}]})
@example({"inputs": [{"name": "", "datatype": "INT64", "shape": [1], "data": [2**63]}]})
def test_any_json_decodes_or_is_a_decode_error(body: Any) -> None:
    """Arbitrary JSON, or arbitrary tensors in a V2 shape: a request, or a DecodeError."""
    try:
        value = json.dumps(body).encode()
    except ValueError:
        return
    try:
        request = PLAIN.decode(value, [*JSON, ("model_name", b"m")], None)
    except DecodeError:
        return
    for tensor in request.inputs:
        tensor.to_numpy()  # what decoding accepted is a consistent tensor


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_under_either_v2_content_type_are_a_request_or_a_decode_error(
    value: bytes,
) -> None:
    """Hostile bytes never raise anything but DecodeError."""
    for headers in (JSON, PROTO):
        with contextlib.suppress(DecodeError):
            PLAIN.decode(value, [*headers, ("model_name", b"m")], None)


def test_a_v2_json_reply_carries_outputs_timing_and_errors() -> None:
    """Outputs as flat data lists; timing and the error code in parameters; error as text."""
    ok = InferenceResponse(
        "j1", "digits", "2", [Tensor.from_numpy("label", np.array([7, 1], np.int64))],
        timing=Timing(10, 20, 3), parameters={"truncated": 1},
    )  # fmt: skip
    value, headers = PLAIN.encode(b"{}", JSON, ok)
    assert headers == [("content-type", b"application/json")]
    body = json.loads(value)
    assert body["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [2],
                                "data": [7, 1]}]  # fmt: skip
    assert body["parameters"] == {"truncated": 1, "queue_us": 10, "compute_us": 20,
                                  "batch_size": 3}  # fmt: skip
    assert (body["id"], body["model_name"], body["model_version"]) == ("j1", "digits", "2")
    failed = InferenceResponse("j2", "digits", error=ErrorInfo("NOT_FOUND", "no such model"))
    body = json.loads(PLAIN.encode(b"{}", JSON, failed)[0])
    assert body["error"] == "no such model"
    assert body["parameters"]["error_code"] == "NOT_FOUND"
    assert "outputs" not in body
    _, seldon = PLAIN.encode(b"{}", [("seldon-infer-type", b"json/inferModelRequest")], ok)
    assert ("seldon-infer-type", b"json/inferModelResponse") in seldon


# --- Protobuf ------------------------------------------------------------------------------


def proto_request(**fields: Any) -> bytes:
    """A serialised ModelInferRequest."""
    return bytes(pb.ModelInferRequest(**fields).SerializeToString())


def test_a_protobuf_request_with_raw_or_typed_contents_decodes() -> None:
    """raw_input_contents and typed fp32_contents give the same tensor; fields win headers."""
    tensor = pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="FP32", shape=[2, 64])
    raw = proto_request(model_name="digits", model_version="1", id="p1", inputs=[tensor],
                        raw_input_contents=[PIXELS.tobytes()])  # fmt: skip
    typed_tensor = pb.ModelInferRequest.InferInputTensor(
        name="pixels", datatype="FP32", shape=[2, 64],
        contents=pb.InferTensorContents(fp32_contents=PIXELS.ravel().tolist()),
    )  # fmt: skip
    typed = proto_request(model_name="digits", model_version="1", id="p1", inputs=[typed_tensor])
    want = InferenceRequest("p1", "digits", [Tensor.from_numpy("pixels", PIXELS)], "1")
    headers = [*PROTO, ("model_name", b"other")]
    assert PLAIN.decode(raw, headers, None) == want
    assert PLAIN.decode(typed, headers, None) == want


def test_protobuf_parameters_strings_and_header_fallbacks() -> None:
    """Typed parameters come through; BYTES contents; model and id from headers and key."""
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[2],
        contents=pb.InferTensorContents(bytes_contents=[b"a", b"bc"]),
    )  # fmt: skip
    message = pb.ModelInferRequest(inputs=[tensor])
    message.parameters["flag"].bool_param = True
    message.parameters["n"].int64_param = 3
    request = PLAIN.decode(
        message.SerializeToString(), [*PROTO, ("mlserver-model", b"minilm")], b"key-id"
    )
    assert (request.model_name, request.id) == ("minilm", "key-id")
    assert request.parameters == {"flag": True, "n": 3}
    assert request.inputs[0].to_numpy().tolist() == [b"a", b"bc"]


@pytest.mark.parametrize(
    ("message", "says"),
    [
        (b"\xff\xff\xff", "not a Protobuf ModelInferRequest"),
        (proto_request(model_name="m", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="a", datatype="FP32", shape=[1])], raw_input_contents=[b"1234", b"5678"]),
         "raw_input_contents has 2 entries for 1 inputs"),
        (proto_request(model_name="m", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="h", datatype="FP16", shape=[1])]), "has no typed contents"),
        (proto_request(model_name="m", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="a", datatype="INT8", shape=[1],
            contents=pb.InferTensorContents(int_contents=[1000]))]), "values outside"),
    ],
)  # fmt: skip
def test_bad_protobuf_is_a_coded_decode_error(message: bytes, says: str) -> None:
    """Malformed messages, mismatched raw contents, impossible values: INVALID_ARGUMENT."""
    with pytest.raises(DecodeError) as caught:
        PLAIN.decode(message, PROTO, None)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert says in caught.value.message


def test_a_protobuf_reply_has_raw_outputs_and_parameters() -> None:
    """Outputs in raw_output_contents (Triton's way); errors as parameters; content type set."""
    label = Tensor.from_numpy("label", np.array([3], np.int64))
    value, headers = PLAIN.encode(
        b"", PROTO, InferenceResponse("p", "digits", "1", [label], timing=Timing(1, 2, 5))
    )
    assert headers == [("content-type", b"application/x-protobuf")]
    reply = pb.ModelInferResponse.FromString(value)
    assert (reply.id, reply.model_name, reply.model_version) == ("p", "digits", "1")
    assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [("label", "INT64", [1])]
    assert list(reply.raw_output_contents) == [label.data]
    assert reply.parameters["batch_size"].int64_param == 5
    failed = InferenceResponse("q", "digits", error=ErrorInfo("INTERNAL", "boom"))
    reply = pb.ModelInferResponse.FromString(PLAIN.encode(b"", PROTO, failed)[0])
    assert reply.parameters["error_code"].string_param == "INTERNAL"
    assert reply.parameters["error"].string_param == "boom"
    assert not reply.outputs


def test_the_generated_protobuf_code_is_what_the_pinned_generator_makes(tmp_path: Path) -> None:
    """worker/oip/*_pb2* equal grpcio-tools' output for the committed proto (make proto)."""
    proto = "worker/oip/open_inference_grpc.proto"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(ROOT / proto)],
        check=True,
    )  # fmt: skip
    oip = ROOT / "worker" / "oip"
    made = tmp_path / "worker" / "oip"
    for name in ("open_inference_grpc_pb2.py", "open_inference_grpc_pb2.pyi",
                 "open_inference_grpc_pb2_grpc.py"):  # fmt: skip
        assert (made / name).read_text() == (oip / name).read_text(), name


# --- Schema Registry framing (the registry itself: tests/test_formats_kafka.py) -------------


class FakeSchemas:
    """Writer schemas by id, as the registry client holds them."""

    reply_id = 41

    def __init__(self, writers: dict[int, Any]) -> None:
        self.writers = writers

    def writer(self, schema_id: int) -> Any:
        if schema_id not in self.writers:
            raise RequestError(ErrorCode.INVALID_ARGUMENT, f"schema id {schema_id} unknown")
        return self.writers[schema_id]


def request_schema(extra_fields: list[dict[str, Any]] | None = None, drop: str = "") -> Any:
    """Our request schema, with fields added or one dropped (an evolved writer)."""
    schema = json.loads(schema_text("inference_request"))
    schema["fields"] = [f for f in schema["fields"] if f["name"] != drop] + (extra_fields or [])
    return fastavro.parse_schema(schema)


def framed(schema_id: int, schema: Any, record: dict[str, Any]) -> bytes:
    """A record in the registry's wire format."""
    buf = io.BytesIO()
    buf.write(b"\x00" + schema_id.to_bytes(4, "big"))
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


RECORD = {
    "id": "r1", "model_name": "digits", "model_version": None,
    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 64], "data": PIXELS.tobytes()}],
    "parameters": None, "deadline_ms": None,
}  # fmt: skip


def test_registry_framed_records_resolve_evolved_writer_schemas() -> None:
    """A writer with an extra field, or without deadline_ms, is read into our schema."""
    extra = {"name": "client", "type": "string", "default": ""}
    codecs = Codecs(
        FakeSchemas({7: request_schema([extra]), 8: request_schema(drop="deadline_ms")})
    )
    newer = codecs.decode(framed(7, request_schema([extra]), {**RECORD, "client": "c"}), [], None)
    older_record = {k: v for k, v in RECORD.items() if k != "deadline_ms"}
    older = codecs.decode(framed(8, request_schema(drop="deadline_ms"), older_record), [], None)
    want = InferenceRequest("r1", "digits", [Tensor.from_numpy("pixels", PIXELS)])
    assert newer == older == want


def test_registry_failures_keep_their_codes() -> None:
    """An unknown id keeps the registry's code; no registry configured says how to set one."""
    codecs = Codecs(FakeSchemas({}))
    with pytest.raises(DecodeError, match="schema id 9 unknown") as caught:
        codecs.decode(framed(9, request_schema(), RECORD), [], None)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    with pytest.raises(DecodeError, match="set WORKER_SCHEMA_REGISTRY__URL"):
        PLAIN.decode(framed(9, request_schema(), RECORD), [], None)
    incompatible = fastavro.parse_schema(
        {"type": "record", "name": "InferenceRequest", "namespace": "inference.v2",
         "fields": [{"name": "id", "type": "long"}]}
    )  # fmt: skip
    bad = Codecs(FakeSchemas({3: incompatible}))
    with pytest.raises(DecodeError, match="not an Avro-encoded inference_request"):
        bad.decode(framed(3, incompatible, {"id": 5}), [], None)


def test_replies_to_framed_requests_are_framed_with_the_reply_schema_id() -> None:
    """0x00, the registered id, then the response as bare Avro of our response schema."""
    codecs = Codecs(FakeSchemas({}))
    response = InferenceResponse("r1", "digits", "1", [Tensor.from_numpy("y", PIXELS)])
    value, headers = codecs.encode(b"\x00\x00\x00\x00\x07", [], response)
    assert headers == []
    assert value[:5] == b"\x00\x00\x00\x00\x29"
    ours = fastavro.parse_schema(json.loads(schema_text("inference_response")))
    record = cast(dict[str, Any], fastavro.schemaless_reader(io.BytesIO(value[5:]), ours, None))
    assert record["id"] == "r1"
    assert record["outputs"][0]["data"] == PIXELS.tobytes()
    plain, _ = PLAIN.encode(encode_request(InferenceRequest("a", "m", [])), [], response)
    assert decode_response(plain) == response, "Avro requests still get single-object replies"


# --- through admission ---------------------------------------------------------------------


def test_an_undecodable_v2_body_is_answered_in_kind_under_its_own_id(
    repository: ModelRepository,
) -> None:
    """A JSON body with a bad tensor: dead-lettered, and a JSON error reply with the body's id."""
    body = json.dumps({"id": "j9", "inputs": [
        {"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [1, 2]}
    ]}).encode()  # fmt: skip
    request = record(body, [*JSON, ("model_name", b"digits")])
    outgoing = answered(admit(request, repository, LIMITS, DEST, PLAIN, now=0.0))
    dead, reply = outgoing
    assert dead.topic == "dlq"
    assert reply.topic == "replies"
    assert ("content-type", b"application/json") in reply.headers
    answer = json.loads(reply.value or b"")
    assert answer["id"] == "j9"
    assert answer["parameters"]["error_code"] == "INVALID_ARGUMENT"
    assert "needs 64 values; data has 2" in answer["error"]


def test_a_v2_json_request_is_admitted_like_an_avro_one(repository: ModelRepository) -> None:
    """Admission routes and validates a JSON request exactly as the same request in Avro."""
    body = json.dumps({"id": "j1", "inputs": [
        {"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": ROW.ravel().tolist()}
    ]}).encode()  # fmt: skip
    outcome = admit(record(body, [*JSON, ("model_name", b"digits")]), repository, LIMITS, DEST,
                    PLAIN, now=0.0)  # fmt: skip
    same = encode_request(InferenceRequest("j1", "digits", [Tensor.from_numpy("pixels", ROW)]))
    avro = admit(record(same), repository, LIMITS, DEST, PLAIN, now=0.0)
    assert isinstance(outcome, Admitted)
    assert isinstance(avro, Admitted)
    assert outcome.job.request == avro.job.request
    assert outcome.job.model is avro.job.model


def test_names_and_ids_from_headers_are_bounded_and_never_fail_to_decode() -> None:
    """model_version header; ids from headers or keys cut at 1,024 bytes; bad UTF-8 replaced."""
    body = json.dumps({"inputs": []}).encode()
    headers = [*JSON, ("model_name", b"digits"), ("model_version", b"2"),
               ("correlation_id", b"\xff" + b"i" * 5000)]  # fmt: skip
    request = PLAIN.decode(body, headers, None)
    assert request.model_version == "2"
    assert request.id == "\ufffd" + "i" * 1023
    keyed = PLAIN.decode(body, [*JSON, ("model_name", b"m")], b"k" * 2000)
    assert keyed.id == "k" * 1024
