"""Text that is not Unicode (a lone surrogate) costs only its own request, on every path.

JSON can spell a lone surrogate (U+D800 escaped, unpaired); Python's ``json`` hands it over as
a ``str`` that cannot be written as UTF-8. Such a body is refused where it is parsed, and a
reply whose text cannot be encoded becomes an INTERNAL error reply instead of an exception, so
neither the worker nor the neighbours of the request in its batch are affected.
"""

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
from hypothesis import strategies as st

from worker.answers import Answer
from worker.codec import decode_response
from worker.domain import InferenceResponse, Tensor
from worker.errors import DecodeError
from worker.formats import PLAIN
from worker.kafka import ensure_topics, make_producer
from worker.oip import pb
from worker.origins import Record
from worker.outgoing import DLQ_HEADER_PREFIX, Destinations, messages
from worker.repository import ModelRepository
from worker.settings import Settings
from worker.v2json import is_unicode, parse_json_body

from .conftest import changed, group_lag, reply_reader, running_worker, wait_for
from .test_admission import DEST, LIMITS, answered, record
from .test_endpoints import rest, serving, v2_body, with_endpoints
from .test_formats_kafka import JSON_HEADERS, json_value

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]

LONE = st.characters(categories=["Cs"])  # U+D800..U+DFFF: never valid text on its own
ANY_TEXT = st.text(st.characters(categories=["L", "N", "P", "Zs", "So", "Cs"]), max_size=12)
PLACES = ("id", "model_name", "input name", "BYTES item", "parameter key", "parameter value")


def body_with(place: str, text: str) -> dict[str, Any]:
    """A V2 JSON request body with ``text`` at ``place``."""
    body: dict[str, Any] = {
        "id": "r-1",
        "model_name": "digits",
        "inputs": [{"name": "words", "datatype": "BYTES", "shape": [1], "data": ["ok"]}],
        "parameters": {"k": "v"},
    }
    if place in ("id", "model_name"):
        body[place] = text
    elif place == "input name":
        body["inputs"][0]["name"] = text
    elif place == "BYTES item":
        body["inputs"][0]["data"] = [text]
    elif place == "parameter key":
        body["parameters"] = {text: 1}
    else:
        body["parameters"] = {"k": text}
    return body


@given(st.sampled_from(PLACES), st.text(max_size=5), LONE, st.text(max_size=5))
def test_a_lone_surrogate_anywhere_in_a_v2_json_body_is_a_decode_error(
    place: str, before: str, lone: str, after: str
) -> None:
    """Escaped or as raw bytes, a lone surrogate in any string of a body is refused at parsing."""
    body = body_with(place, before + lone + after)
    escaped = json.dumps(body).encode()  # ensure_ascii: the \udXXX escape
    raw = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    for value in (escaped, raw):
        with pytest.raises(DecodeError) as caught:
            parse_json_body(value)
        assert caught.value.message.encode(), "the message itself is valid text"


@given(st.sampled_from(PLACES), st.text(max_size=12))
def test_paired_surrogates_and_any_unicode_text_are_accepted(place: str, text: str) -> None:
    """Characters outside the BMP (escaped as surrogate pairs) and all valid text parse."""
    body = body_with(place, text + "\U0001f600")
    assert parse_json_body(json.dumps(body).encode()) == body


def test_admission_dead_letters_such_a_record_and_answers_its_correlation_id(
    repository: ModelRepository,
) -> None:
    """The record is copied to the dead-letter topic; the header id gets an error reply."""
    value = json.dumps(body_with("id", "\ud800")).encode()
    headers = [*JSON_HEADERS, ("correlation_id", b"c-7")]
    from worker.admission import admit  # noqa: PLC0415 - keeps the hypothesis tests light

    copy, error = answered(admit(record(value, headers), repository, LIMITS, DEST, PLAIN, now=0.0))
    assert copy.is_dead_letter
    assert dict(copy.headers)[DLQ_HEADER_PREFIX + "stage"] == b"DECODE"
    assert json.loads(error.value or b"")["id"] == "c-7"
    assert dict(error.headers)["correlation_id"] == b"c-7"


FORMATS = {
    "avro": [],
    "json": [("content-type", b"application/json")],
    "protobuf": [("content-type", b"application/x-protobuf")],
}


def decoded(kind: str, value: bytes) -> tuple[str, str | None]:
    """(id, error code or None) of a reply in ``kind``, read with that format's own decoder."""
    if kind == "json":
        body = json.loads(value)
        return body["id"], body.get("parameters", {}).get("error_code")
    if kind == "protobuf":
        message = pb.ModelInferResponse.FromString(value)
        code = (
            message.parameters["error_code"].string_param if "error" in message.parameters else None
        )
        return message.id, code
    response = decode_response(value)
    return response.id, response.error.code if response.error else None


@given(st.sampled_from(sorted(FORMATS)), ANY_TEXT, ANY_TEXT, ANY_TEXT, ANY_TEXT)
def test_a_reply_is_encoded_whatever_text_its_response_carries(
    kind: str, rid: str, model: str, version: str, output: str
) -> None:
    """messages() never raises: a reply is faithful, or INTERNAL with its text made safe."""
    response = InferenceResponse(
        rid, model, model_version=version or None,
        outputs=[Tensor.from_numpy(output, np.arange(3, dtype=np.int64))],
    )  # fmt: skip
    source = Record(TopicPartition("requests", 0), 1, None, b"v", FORMATS[kind], 0)
    [message] = messages(Destinations("replies", "dlq", "g"), PLAIN, Answer(source, response))
    assert message.value is not None
    got_id, code = decoded(kind, message.value)
    assert dict(message.headers)["correlation_id"] == got_id.encode()
    texts = (rid, model, version, output)
    if all(is_unicode(t) for t in texts):
        assert (got_id, code) == (rid, None)
    elif code is None:  # JSON escapes a lone surrogate: faithful, still ASCII bytes
        assert kind == "json"
        assert got_id == rid
    else:
        assert code == "INTERNAL"
        assert is_unicode(got_id)
        assert got_id == rid.encode(errors="replace").decode()[: len(got_id)]


async def publish_json(
    settings: Settings, values: list[tuple[bytes, int | None]], headers: list[tuple[str, bytes]]
) -> None:
    """Publish V2 JSON records (value, timestamp in Unix ms or None for now), acknowledged."""
    kafka = settings.kafka
    await ensure_topics(kafka, settings.topics())
    producer = make_producer(kafka)
    await producer.start()
    try:
        sent = [
            await producer.send(kafka.requests_topic, value, headers=headers, timestamp_ms=ts)
            for value, ts in values
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def test_an_expired_kafka_record_with_a_lone_surrogate_id_costs_only_itself(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """The poison record is dead-lettered and committed; neighbours and later records answered.

    It is already past WORKER_RUNTIME__DEFAULT_TIMEOUT_MS when fetched, the path that crashed
    the worker (and, uncommitted, every next owner) before.
    """
    settings = changed(settings, "runtime", default_timeout_ms=60_000)
    pixels = testset[0][:11]
    poison = json.dumps(
        {"id": "\ud800", "inputs": json.loads(json_value("x", pixels[0]))["inputs"]}
    )
    old = int(time.time() * 1000) - 3_600_000
    good = [(json_value(f"g-{i}", pixels[i]), None) for i in range(10)]
    dlq = settings.kafka.dead_letter_topic
    async with (
        running_worker(settings, repository) as worker,
        reply_reader(settings) as replies,
        reply_reader(settings, dlq) as dead,
    ):
        records = [*good[:5], (poison.encode(), old), *good[5:]]
        await publish_json(settings, records, JSON_HEADERS)
        await wait_for(lambda: len(replies) >= 10 and len(dead) >= 1, timeout=60,
                       what="10 replies and a dead-letter copy")  # fmt: skip
        await publish_json(settings, [(json_value("after", pixels[10]), None)], JSON_HEADERS)
        await wait_for(lambda: len(replies) >= 11, timeout=60, what="the later reply")
        await wait_for(lambda: lag_is_zero(settings), timeout=30, what="every offset committed")
        assert worker.assigned, "the worker is still serving"
    ids = sorted(json.loads(r.value)["id"] for r in replies)
    assert ids == sorted([*(f"g-{i}" for i in range(10)), "after"])
    assert all("error" not in json.loads(r.value) for r in replies)
    assert [d.headers[DLQ_HEADER_PREFIX + "stage"] for d in dead] == [b"DECODE"]


async def lag_is_zero(settings: Settings) -> bool:
    """True once the worker group has committed every record of the requests topic."""
    return await group_lag(settings) == 0


async def test_a_lone_surrogate_over_rest_is_a_400_and_its_20_neighbours_are_served(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """One poison body among 20 concurrent good ones: 400 for it, 200 and a label for each other."""
    settings = with_endpoints(settings)
    pixels = testset[0][:20]
    poison = json.dumps({"id": "\ud800", **v2_body(pixels[:1])}).encode()
    async with serving(settings, repository) as worker:
        port = worker.rest_port
        assert port is not None
        path = "/v2/models/digits/infer"
        calls = [
            rest(port, path, {"id": f"g-{i}", **v2_body(pixels[i : i + 1])}) for i in range(20)
        ]
        results = await asyncio.gather(rest(port, path, poison), *calls)
        after = await rest(port, path, v2_body(pixels[:1]))
    status, body = results[0]
    assert status == 400
    assert "lone surrogate" in body["error"]
    assert [s for s, _ in results[1:]] == [200] * 20
    assert sorted(b["id"] for _, b in results[1:]) == sorted(f"g-{i}" for i in range(20))
    assert after[0] == 200, "the worker still answers"
