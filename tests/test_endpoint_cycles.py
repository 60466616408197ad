"""A refused REST body or gRPC message leaves no garbage cycle for the collector.

The worker raises the young generation's collection threshold while it serves
(:mod:`worker.heap`), so garbage in cycles lives longer: a refusal that keeps its decode error's
traceback keeps the frames that read the caller's bytes. These tests hold the endpoints' decode
steps (:func:`worker.rest_requests.decode_body`, :func:`worker.grpc_api.decode_message`) to
leaving nothing behind, for any bytes.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from google.protobuf.message import DecodeError as ProtobufDecodeError
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from worker.domain import InferenceRequest
from worker.grpc_api import DECODE_ON_LOOP_VALUES, decode_message
from worker.oip import pb
from worker.rest_requests import DECODE_ON_LOOP_BYTES, RefusedError, decode_body

from .cycles import chained_tracebacks, cycles_counted

ROUNDS = 20
DATATYPES = ["FP32", "INT64", "BYTES", "BOOL", "FP16", "fp32", "", "NOPE"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
shapes = st.lists(st.integers(min_value=-3, max_value=1 << 40), max_size=4)


@st.composite
def rest_bodies(draw: st.DrawFn) -> tuple[bytes, int]:
    """A V2 JSON body, often broken: raw bytes, or a JSON object with odd fields, and a tail."""
    if draw(st.booleans()):
        head = draw(st.binary(max_size=300))
    else:
        tensor: dict[str, Any] = {
            "name": draw(st.one_of(st.text(max_size=8), scalars)),
            "datatype": draw(st.one_of(st.sampled_from(DATATYPES), scalars)),
            "shape": draw(st.one_of(shapes, scalars)),
            "data": draw(st.one_of(st.lists(scalars, max_size=6), scalars)),
        }
        if draw(st.booleans()):
            tensor["parameters"] = {"binary_data_size": draw(st.integers(-5, 64))}
        body = {
            "id": draw(st.one_of(st.text(max_size=8), scalars)),
            "inputs": draw(st.one_of(st.just([tensor]), scalars)),
            "outputs": draw(
                st.one_of(st.just([{"name": "y", "parameters": {"binary_data": True}}]), scalars)
            ),
        }
        head = json.dumps(body).encode()
    tail = draw(st.binary(max_size=64))
    return head + tail, len(head)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=rest_bodies())
def test_a_refused_rest_body_leaves_no_garbage_cycle(body: tuple[bytes, int]) -> None:
    """Any JSON body, refused 400 and dropped: nothing of it waits for the collector."""
    value, length = body
    statuses: list[int] = []
    kept = 0
    with cycles_counted() as left:
        for _ in range(ROUNDS):
            try:
                decode_body(value, length, [("model_name", b"digits")])
            except RefusedError as exc:
                statuses.append(exc.status)
                kept += chained_tracebacks(exc)
    assert set(statuses) <= {400}, "a body that cannot be decoded is a bad request"
    assert kept == 0, "a refusal chained to a decode error that still holds its frames"
    assert left[0] < ROUNDS, (
        f"{left[0]} objects in cycles after {ROUNDS} bodies ({len(statuses)} refused)"
    )


@st.composite
def infer_messages(draw: st.DrawFn) -> Any:
    """A ModelInferRequest, often broken: parsed from any bytes, or built with odd fields."""
    if draw(st.booleans()):
        message = pb.ModelInferRequest()
        try:
            message.ParseFromString(draw(st.binary(max_size=300)))
        except (ProtobufDecodeError, RecursionError, ValueError):
            assume(False)
        return message
    message = pb.ModelInferRequest(
        model_name=draw(st.text(max_size=8)), id=draw(st.text(max_size=8))
    )
    for _ in range(draw(st.integers(0, 2))):
        tensor = message.inputs.add(
            name=draw(st.text(max_size=8)),
            datatype=draw(st.sampled_from(DATATYPES)),
            shape=draw(shapes),
        )
        if draw(st.booleans()):
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=6)))
        else:
            message.raw_input_contents.append(draw(st.binary(max_size=32)))
    return message


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=infer_messages())
def test_a_refused_grpc_message_leaves_no_garbage_cycle(message: Any) -> None:
    """Any ModelInfer message, refused (a message for INVALID_ARGUMENT) or not: no cycle left."""
    refused = 0
    with cycles_counted() as left:
        for _ in range(ROUNDS):
            decoded = decode_message(message, [("traceparent", b"00-zz")])
            if isinstance(decoded, str):
                assert decoded, "a refusal says why"
                refused += 1
            else:
                assert isinstance(decoded, InferenceRequest)
            del decoded
    assert left[0] < ROUNDS, (
        f"{left[0]} objects in cycles after {ROUNDS} messages ({refused} refused)"
    )


def test_large_refusals_decoded_in_a_codec_thread_leave_no_garbage_cycle() -> None:
    """Over the on-loop bounds, decoded in a thread as the endpoints do: refused, nothing left."""
    count = DECODE_ON_LOOP_BYTES // 2
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [count], "data": [None] * count}]}
    ).encode()
    values = DECODE_ON_LOOP_VALUES + 1
    message = pb.ModelInferRequest(model_name="digits")
    tensor = message.inputs.add(name="x", datatype="FP32", shape=[values + 1])
    tensor.contents.fp32_contents.extend([0.5] * values)
    assert len(body) > DECODE_ON_LOOP_BYTES
    with ThreadPoolExecutor(1) as codec, cycles_counted() as left:
        for _ in range(ROUNDS):
            refusal = codec.submit(decode_body, body, len(body), []).exception()
            assert isinstance(refusal, RefusedError)
            assert refusal.status == 400
            assert chained_tracebacks(refusal) == 0
            del refusal
            refused = codec.submit(decode_message, message, []).result()
            assert isinstance(refused, str)
            assert "shape" in refused or "element" in refused, refused
    assert left[0] < ROUNDS, f"{left[0]} objects in cycles after {ROUNDS} large refusals"
