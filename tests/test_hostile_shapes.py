"""Shapes are checked before anything is computed from them, in every V2 decoder.

A shape of hundreds of dimensions, or of numbers with thousands of digits, once made the JSON
and Protobuf decoders multiply them out (seconds of event loop, growing quadratically) and then
raise ``ValueError`` instead of a coded error.
"""

from __future__ import annotations

import json
import time
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from worker.domain import DATATYPES, InferenceRequest, Tensor
from worker.errors import DecodeError, ErrorCode, RequestError
from worker.formats import PLAIN
from worker.oip import pb
from worker.repository import ModelRepository
from worker.settings import Settings
from worker.v2 import MAX_DIMENSION

from .conftest import reply_reader, wait_for
from .test_endpoints import infer_message, rest, serving, stub, v2_body, with_endpoints
from .test_formats_kafka import json_value
from .test_pipeline_property import PIXELS
from .test_reliability import publish

JSON = [("content-type", b"application/json"), ("model_name", b"digits")]
PROTO = [("content-type", b"application/x-protobuf")]
FORMATS_JSON = [*JSON, ("mlserver-version", b"1")]

LOOSE_BOUND_S = 1.0
"""Far above what a checked shape costs (well under a millisecond); the worst cases took 2.9 s
(JSON) and 8.1 s (Protobuf) before, growing quadratically with the record."""


def json_body(shape: list[int], data: Any = (), datatype: str = "FP32") -> bytes:
    """A V2 JSON request with one input of ``shape``."""
    tensor = {"name": "x", "datatype": datatype, "shape": shape, "data": list(data)}
    return json.dumps({"id": "s", "inputs": [tensor]}).encode()


def proto_body(shape: list[int], *, raw: bool) -> bytes:
    """A Protobuf request with one FP32 input of ``shape`` (raw or typed contents)."""
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=shape)
    fields: dict[str, Any] = {"model_name": "digits", "id": "s", "inputs": [tensor]}
    if raw:
        fields["raw_input_contents"] = [b""]
    return bytes(pb.ModelInferRequest(**fields).SerializeToString())


WORST = {
    "json: 32 dimensions of 2**31-1": (json_body([2**31 - 1] * 32, [1.0]), JSON),
    "json: 200 dimensions of 4,299 digits": (json_body([int("9" * 4299)] * 200), JSON),
    "json: 20 dimensions of 4,299 digits": (json_body([int("9" * 4299)] * 20), JSON),
    "json: [0, 10**30]": (json_body([0, 10**30]), JSON),
    "json: 65 dimensions": (json_body([1] * 65, [1.0]), JSON),
    "protobuf typed: 40,000 dimensions of 2**62": (proto_body([2**62] * 40_000, raw=False), PROTO),
    "protobuf raw: 40,000 dimensions of 2**62": (proto_body([2**62] * 40_000, raw=True), PROTO),
    "protobuf raw: [0, 2**62]": (proto_body([0, 2**62], raw=True), PROTO),
}


@pytest.mark.parametrize("case", sorted(WORST))
def test_the_worst_shapes_are_a_quick_coded_decode_error(case: str) -> None:
    """Each is INVALID_ARGUMENT naming the shape problem, in far less than a second."""
    value, headers = WORST[case]
    started = time.perf_counter()
    with pytest.raises(DecodeError) as caught:
        PLAIN.decode(value, headers, None)
    elapsed = time.perf_counter() - started
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert "dimension" in caught.value.message or "more than 10^18" in caught.value.message
    assert len(caught.value.message) < 300, "no huge number printed"
    assert elapsed < LOOSE_BOUND_S, f"{case}: {elapsed:.2f}s"


def decoded(value: bytes, headers: list[tuple[str, bytes]]) -> InferenceRequest | DecodeError:
    """The request, or the DecodeError it raised (any other exception escapes: a failure)."""
    try:
        return PLAIN.decode(value, headers, None)
    except DecodeError as exc:
        return exc


def checked_tensor(request: InferenceRequest | DecodeError, shape: list[int]) -> Tensor | None:
    """The one input of a decoded request, checked to have ``shape`` (None: refused)."""
    if isinstance(request, DecodeError):
        assert request.code is ErrorCode.INVALID_ARGUMENT
        return None
    [tensor] = request.inputs
    assert list(tensor.shape) == shape
    assert len(shape) <= 32
    assert all(0 <= d <= MAX_DIMENSION for d in shape)
    return tensor


DIMS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.integers(0, 8),
    st.sampled_from([MAX_DIMENSION, MAX_DIMENSION + 1]),
)


@given(st.lists(DIMS, max_size=80), st.lists(st.floats(allow_nan=False), max_size=20))
@example(shape=[], data=[3.4028235677973366e38])  # beyond FP32: once cast silently to inf
@example(shape=[1], data=[1e39])
@example(shape=[0, MAX_DIMENSION, MAX_DIMENSION, MAX_DIMENSION], data=[])  # no data, 2**93 places
def test_any_json_shape_is_a_request_of_that_shape_or_a_decode_error(
    shape: list[int], data: list[float]
) -> None:
    """Never another exception; a decoded tensor has the declared shape and all the data."""
    tensor = checked_tensor(decoded(json_body(shape, data), JSON), shape)
    if tensor is not None:
        assert tensor.to_numpy().size == len(data)


@given(st.lists(DIMS, max_size=40), st.sampled_from(["BYTES", "FP32", "BOOL"]))
@example(shape=[0, MAX_DIMENSION, MAX_DIMENSION, MAX_DIMENSION], datatype="BYTES")
@example(shape=[2**63 - 1] * 40, datatype="FP32")  # a message that once printed all of it
def test_an_empty_tensor_of_any_shape_is_an_array_or_a_coded_error(
    shape: list[int], datatype: str
) -> None:
    """A decoded tensor with no data becomes an array of its shape, or INVALID_ARGUMENT."""
    outcome: Any
    try:
        outcome = Tensor("x", datatype, tuple(shape), b"").to_numpy()
    except RequestError as exc:
        outcome = exc
    if isinstance(outcome, RequestError):
        assert outcome.code is ErrorCode.INVALID_ARGUMENT
        assert len(outcome.message) < 400
    else:
        assert outcome.shape == tuple(shape)
        assert outcome.size == 0


@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=80), st.booleans())
@example(shape=[0, MAX_DIMENSION, MAX_DIMENSION, MAX_DIMENSION], raw=False)
@example(shape=[0, MAX_DIMENSION, MAX_DIMENSION, MAX_DIMENSION], raw=True)
def test_any_protobuf_shape_is_a_request_or_a_decode_error(shape: list[int], raw: bool) -> None:
    """Raw or typed contents: a request whose shape was checked, or INVALID_ARGUMENT."""
    checked_tensor(decoded(proto_body(shape, raw=raw), PROTO), shape)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_python_s_json_extensions_are_not_json(literal: str) -> None:
    """NaN and Infinity literals (which Python's json accepts) are refused as not JSON."""
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [%s]}]}' % (
        literal.encode()
    )
    with pytest.raises(DecodeError, match="is not a JSON value"):
        PLAIN.decode(body, JSON, None)


@pytest.mark.parametrize(
    ("datatype", "data", "says"),
    [
        ("FP32", ["1e5"], "strings, not numbers"),
        ("FP32", ["nan"], "strings, not numbers"),
        ("BOOL", [5], "true/false"),
        ("FP32", [True], "true/false"),
        ("INT64", [10**30], "outside the range of int64"),
        ("FP64", [10**400], "too large"),
        ("FP16", [70_000], "outside the range of float16"),
        ("FP32", [None], "not numbers"),
        ("INT8", [1.5], "floating-point values"),
    ],
)
def test_values_are_numbers_of_their_datatype_or_refused(
    datatype: str, data: list[Any], says: str
) -> None:
    """No string parsed as a number, no number as a boolean, nothing cast out of its range."""
    body = json_body([len(data)], data, datatype)
    with pytest.raises(DecodeError) as caught:
        PLAIN.decode(body, JSON, None)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert says in caught.value.message


@pytest.mark.parametrize(
    ("datatype", "data"),
    [("BOOL", [True, False]), ("FP32", [1, 2.5]), ("UINT64", [2**64 - 1]), ("FP32", [10**30])],
)
def test_numbers_of_the_datatype_decode_exactly(datatype: str, data: list[Any]) -> None:
    """Booleans for BOOL, integers for floats and integers, big integers as floats: as given."""
    [tensor] = PLAIN.decode(json_body([len(data)], data, datatype), JSON, None).inputs
    assert tensor.datatype == datatype
    assert tensor.to_numpy().tolist() == np.array(data, dtype=DATATYPES[datatype]).tolist()


async def test_the_worst_shapes_over_kafka_rest_and_grpc_cost_only_themselves(
    settings: Settings, repository: ModelRepository
) -> None:
    """Real broker and endpoints: each hostile shape is refused, the good requests are served."""
    settings = with_endpoints(settings)
    pixels = PIXELS[:4]
    huge = [int("9" * 4299)] * 200
    kafka_records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = [
        (None, json_body(huge), [*JSON, ("correlation_id", b"bad-json")]),
        (None, proto_body([2**62] * 40_000, raw=True), [*PROTO, ("correlation_id", b"bad-pb")]),
        *((None, json_value(f"good-{i}", pixels[i]), FORMATS_JSON) for i in range(2)),
    ]
    async with (
        serving(settings, repository) as worker,
        reply_reader(settings) as replies,
    ):
        await publish(settings, kafka_records)
        port, grpc_port = worker.rest_port, worker.grpc_port
        assert port is not None
        assert grpc_port is not None
        path = "/v2/models/digits/infer"
        bad_rest = await rest(port, path, json.loads(json_body(huge)))
        good_rest = await rest(port, path, v2_body(pixels[2:3]))
        async with stub(grpc_port) as service:
            hostile = pb.ModelInferRequest.InferInputTensor(
                name="pixels", datatype="FP32", shape=[2**62] * 40_000
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await service.ModelInfer(pb.ModelInferRequest(
                    model_name="digits", inputs=[hostile], raw_input_contents=[b""]))  # fmt: skip
            good_grpc = await service.ModelInfer(infer_message(pixels[3:4], "good-grpc"))
        await wait_for(lambda: len(replies) >= 4, timeout=60, what="four Kafka replies")
    by_id = {r.headers["correlation_id"].decode(): r for r in replies}
    assert sorted(by_id) == ["bad-json", "bad-pb", "good-0", "good-1"]
    assert "dimensions" in json.loads(by_id["bad-json"].value)["error"]
    bad_pb = pb.ModelInferResponse.FromString(by_id["bad-pb"].value)
    assert "dimensions" in bad_pb.parameters["error"].string_param
    assert "error" not in json.loads(by_id["good-0"].value)
    assert bad_rest[0] == 400
    assert "dimensions" in bad_rest[1]["error"]
    assert good_rest[0] == 200
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert good_grpc.id == "good-grpc"
