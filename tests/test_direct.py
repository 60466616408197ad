"""Direct requests (worker.direct) and the REST binary extension (worker.v2json): no broker."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

import worker.direct
from worker.direct import Direct
from worker.domain import InferenceRequest, InferenceResponse, Tensor, Timing
from worker.errors import DecodeError
from worker.inflight import InFlight
from worker.origins import Call
from worker.v2json import (
    decode_json_request,
    encode_rest_response,
    encode_rest_response_in_slices,
)

ROW = np.arange(64, dtype=np.float32)[None]
REQUEST = InferenceRequest("", "digits", [Tensor.from_numpy("pixels", ROW)])


class Answering:
    """A dispatch that answers each call at once, and remembers them."""

    def __init__(self, answer: bool = True) -> None:
        self.calls: list[Call] = []
        self.answer = answer
        self.arrived = asyncio.Event()

    def __call__(self, call: Call) -> None:
        self.calls.append(call)
        self.arrived.set()
        if self.answer:
            call.respond(InferenceResponse(call.request.id, "digits", "1"), [("t", b"1")])


def bounded(limit: int, records: int = 0) -> InFlight:
    """An in-flight bound of ``limit`` with ``records`` Kafka records already in flight."""
    in_flight = InFlight(limit)
    for offset in range(records):
        in_flight.records.track(TopicPartition("requests", 0), offset)
    return in_flight


async def test_a_direct_request_is_a_call_answered_through_its_caller() -> None:
    """The request travels as a call of its transport; an id and a deadline are set."""
    dispatch = Answering()
    direct = Direct(dispatch, bounded(10))
    before = int(time.time() * 1000)
    answer = await direct.infer("grpc", REQUEST, [("traceparent", b"x")], timeout_s=2.0)
    response = answer.response
    assert answer.header("t") == "1", "the reply's headers come with it"
    [call] = dispatch.calls
    assert call.transport == "grpc"
    assert call.request.id, "an id was made up"
    assert response.id == call.request.id
    assert call.headers == [("traceparent", b"x")]
    deadline = call.request.deadline_ms
    assert deadline is not None
    assert before + 2000 <= deadline <= int(time.time() * 1000) + 2000
    assert direct.pending == 0


async def test_over_the_bound_or_while_stopping_nothing_is_dispatched() -> None:
    """Records and direct requests share the bound; refusals come at once, with codes."""
    dispatch = Answering()
    full = Direct(dispatch, bounded(10, records=10))
    refused = (await full.infer("rest", REQUEST)).response
    assert refused.error is not None
    assert refused.error.code == "RESOURCE_EXHAUSTED"
    assert full.room() == 0
    stopping = Direct(dispatch, bounded(10))
    stopping.closing = True
    closed = (await stopping.infer("rest", REQUEST)).response
    assert closed.error is not None
    assert closed.error.code == "UNAVAILABLE"
    assert dispatch.calls == []


async def test_a_request_nobody_answers_times_out_with_a_deadline_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No answer within the wait: DEADLINE_EXCEEDED; the place is held until the answer comes."""
    dispatch = Answering(answer=False)
    direct = Direct(dispatch, bounded(10))
    monkeypatch.setattr(worker.direct, "GRACE_S", 0.0)
    response = (await direct.infer("rest", REQUEST, timeout_s=0.05)).response
    assert response.error is not None
    assert response.error.code == "DEADLINE_EXCEEDED"
    assert direct.pending == 1, "its job is still queued: it still counts"
    [call] = dispatch.calls
    call.respond(InferenceResponse("late", "digits", "1"), [])
    assert direct.pending == 0


async def test_a_place_is_given_back_once_by_whoever_ends_the_request() -> None:
    """Not dispatched: release() gives it back; dispatched: only the answer does, once."""
    dispatch = Answering(answer=False)
    direct = Direct(dispatch, bounded(2))
    unread = direct.take()
    assert unread is not None
    with unread:  # e.g. a body over the bound: refused before dispatch
        assert direct.pending == 1
    assert direct.pending == 0
    first, second = direct.take(), direct.take()
    assert first is not None
    assert second is not None
    assert direct.take() is None, "the bound is full before any body is read"
    with second:
        pass
    with first:
        waiting = asyncio.create_task(direct.infer("rest", REQUEST, timeout_s=30, place=first))
        await dispatch.arrived.wait()
    assert direct.pending == 1, "dispatched: leaving the with block keeps it"
    [call] = dispatch.calls
    call.respond(InferenceResponse("x", "digits", "1"), [])
    call.respond(InferenceResponse("x", "digits", "1"), [])
    assert direct.pending == 0, "given back once, not twice"
    assert (await waiting).response.id == "x"
    direct.closing = True
    stopping = direct.take()
    answer = await direct.infer("rest", REQUEST, place=stopping)
    assert answer.response.error is not None
    assert answer.response.error.code == "UNAVAILABLE"
    assert direct.pending == 0


def test_the_binary_extension_carries_raw_tensor_bytes_after_the_json() -> None:
    """Inputs with binary_data_size take their bytes, in order, after the JSON header."""
    text = Tensor.from_strings("text", [b"ab", b"c"])
    header = json.dumps({"inputs": [
        {"name": "pixels", "datatype": "FP32", "shape": [1, 64],
         "parameters": {"binary_data_size": ROW.nbytes}},
        {"name": "text", "datatype": "BYTES", "shape": [2],
         "parameters": {"binary_data_size": len(text.data)}},
    ]}).encode()  # fmt: skip
    headers = [("model_name", b"digits")]
    request = decode_json_request(header, headers, None, binary=ROW.tobytes() + text.data)
    assert request.inputs == [Tensor.from_numpy("pixels", ROW), text]
    with pytest.raises(DecodeError, match="bytes of binary data are not claimed"):
        decode_json_request(header, headers, None, binary=ROW.tobytes() + text.data + b"x")
    with pytest.raises(DecodeError, match="declares 256 bytes of binary data; 10 are left"):
        decode_json_request(header, headers, None, binary=b"0123456789")
    with pytest.raises(DecodeError, match="binary_data_size must be a whole number"):
        decode_json_request(
            json.dumps({"inputs": [{"name": "p", "datatype": "FP32", "shape": [1],
                                    "parameters": {"binary_data_size": -4}}]}).encode(),
            headers, None,
        )  # fmt: skip


def test_rest_responses_put_asked_outputs_in_binary_after_the_json() -> None:
    """Binary outputs: JSON names their sizes, raw bytes follow; others stay JSON data."""
    label = Tensor.from_numpy("label", np.array([7], np.int64))
    probs = Tensor.from_numpy("probabilities", np.full((1, 2), 0.5, np.float32))
    response = InferenceResponse("r", "digits", "1", [probs, label], timing=Timing(1, 2, 3))
    body, length = encode_rest_response(response, binary={"label"})
    assert length is not None
    header = json.loads(body[:length])
    assert header["outputs"][0]["data"] == [0.5, 0.5]
    assert header["outputs"][1]["parameters"] == {"binary_data_size": 8}
    assert body[length:] == label.data
    only, none = encode_rest_response(response, wanted=["label"])
    assert none is None
    assert [o["name"] for o in json.loads(only)["outputs"]] == ["label"]


def test_an_endpoint_open_to_the_network_without_tls_or_a_token_is_warned_about() -> None:
    """0.0.0.0 without TLS and client auth logs a warning; loopback or secured does not."""
    from pydantic import SecretStr  # noqa: PLC0415
    from structlog.testing import capture_logs  # noqa: PLC0415

    from worker.rest import warn_if_open  # noqa: PLC0415
    from worker.settings import RestSettings  # noqa: PLC0415

    with capture_logs() as logs:
        warn_if_open("REST", RestSettings(enabled=True))
        warn_if_open("REST", RestSettings(enabled=True, host="127.0.0.1"))
        warn_if_open("REST", RestSettings(enabled=True, token=SecretStr("t")))
    assert [(entry["log_level"], entry["endpoint"], entry["address"]) for entry in logs] == [
        ("warning", "REST", "0.0.0.0:8000"), ("warning", "REST", "0.0.0.0:8000"),
    ], "a token without TLS is still open"  # fmt: skip


def test_requested_outputs_tolerate_odd_parameters_and_refuse_nameless_outputs() -> None:
    """Parameters that are not objects are ignored; an output without a name is an error."""
    from worker.rest import _outputs  # noqa: PLC0415

    odd = b'{"outputs": [{"name": "a", "parameters": [1]}, {"name": "b"}], "parameters": 5}'
    assert _outputs(json.loads(odd)) == (["a", "b"], set())
    every = b'{"parameters": {"binary_data_output": true}}'
    assert _outputs(json.loads(every)) == ([], {"*"})
    some = b'{"outputs": [{"name": "a", "parameters": {"binary_data": true}}, {"name": "b"}]}'
    assert _outputs(json.loads(some)) == (["a", "b"], {"a"})
    with pytest.raises(DecodeError, match="each of outputs needs a name"):
        _outputs({"outputs": [{"parameters": {}}]})


tensors = st.sampled_from(["FP32", "INT64", "BOOL", "BYTES", "FP16"]).flatmap(
    lambda datatype: st.integers(0, 40).map(lambda n: _tensor(datatype, n))
)


def _tensor(datatype: str, n: int) -> Tensor:
    rng = np.random.default_rng(n)
    if datatype == "BYTES":
        return Tensor.from_strings("s", [bytes(rng.integers(0, 256, n % 5)) for _ in range(n)])
    kinds = {"FP32": np.float32, "INT64": np.int64, "BOOL": np.bool_, "FP16": np.float16}
    values: npt.NDArray[Any] = (rng.standard_normal(n) * 1e3).astype(kinds[datatype])
    return Tensor.from_numpy(datatype.lower(), values.reshape(n, 1) if n % 2 else values)


@hypothesis_settings(max_examples=200, deadline=None)
@given(
    outputs=st.lists(tensors, max_size=4),
    wanted=st.lists(st.sampled_from(["fp32", "int64", "bool", "s", "fp16", "x"]), max_size=3),
    binary=st.sets(st.sampled_from(["fp32", "int64", "bool", "s", "fp16"])),
    per_slice=st.integers(1, 7),
)
def test_a_reply_written_in_slices_is_the_codec_s_reply_byte_for_byte(
    outputs: list[Tensor], wanted: list[str], binary: set[str], per_slice: int
) -> None:
    """Any outputs, any asked and binary ones, any slice size: the same bytes and header length."""
    response = InferenceResponse(
        "r", "digits", "1", outputs, timing=Timing(1, 2, 3), parameters={"p": 1.5, "q": "é"}
    )
    sliced = encode_rest_response_in_slices(response, wanted=wanted, binary=binary,
                                     values_per_slice=per_slice)  # fmt: skip
    assert sliced == encode_rest_response(response, wanted=wanted, binary=binary)
