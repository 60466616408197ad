"""The whole request path, fed anything: the worker's own stages with a scripted transport.

A :class:`~worker.pipeline.Pipeline` is built exactly as the worker builds it (admission, the
tokenizer stage, the lanes with the repository's real models) around a real schema
registry client talking to a small in-process registry. Hypothesis sends batches of records of
every format: good digits requests, arbitrary bytes under every content type, V2 JSON bodies
with hostile text, shapes and values, Protobuf messages with any shape, registry-framed records
naming arbitrary registered writer schemas, text requests of any strings. Each batch asserts:

- the stages' task group ends cleanly (no stage raised);
- every record gets exactly one outcome: one reply, or one dead-letter copy (and at most one
  reply beside it, for a record that names a correlation id);
- every good record among them gets its model's own prediction;
- no record holds the event loop for long (admission is timed per record).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web
from aiokafka import TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.codec import decode_response, encode_request, schema_text
from worker.direct import Answer, Direct
from worker.domain import InferenceRequest, Tensor
from worker.errors import DecodeError
from worker.formats import Codecs
from worker.inflight import InFlight
from worker.metrics import Metrics
from worker.oip import pb
from worker.origins import Record
from worker.outgoing import Destinations, Outgoing
from worker.pipeline import Pipeline
from worker.repository import ModelRepository
from worker.schema_registry import SchemaRegistry
from worker.settings import (
    BatchingSettings,
    ModelSettings,
    RuntimeSettings,
    SchemaRegistrySettings,
    Settings,
)
from worker.v2json import parse_json_body, request_from_body

from .conftest import MODELS
from .test_writer_schemas import schemas

LOOP_BOUND_S = 0.5
"""Far above what admitting one record costs (well under a millisecond to a few ms)."""
GOOD_ID = 7
"""The registry id of our own request schema."""

PIXELS = np.load(MODELS / "digits" / "testset.npz")["pixels"].astype(np.float32)[:64]


@contextlib.asynccontextmanager
async def registry(writers: dict[int, Any]) -> AsyncIterator[SchemaRegistry]:
    """A registry answering ``writers`` by id (404 otherwise), and the worker's client of it."""

    async def by_id(request: web.Request) -> web.Response:
        found = writers.get(int(request.match_info["id"]))
        if found is None:
            return web.json_response({"error_code": 40403}, status=404)
        return web.json_response({"schema": json.dumps(found)})

    async def register(_: web.Request) -> web.Response:
        return web.json_response({"id": 1})

    app = web.Application()
    app.add_routes([web.get("/schemas/ids/{id}", by_id),
                    web.post("/subjects/{subject}/versions", register)])  # fmt: skip
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    settings_ = SchemaRegistrySettings(url=f"http://127.0.0.1:{port}", retry_s=0.0)
    try:
        async with SchemaRegistry(settings_, reply_subject="replies-value") as client:
            yield client
    finally:
        await runner.cleanup()


async def run_batch(
    repository: ModelRepository, batch: Batch
) -> tuple[list[Outgoing], list[float], list[Answer | DecodeError]]:
    """Every record and direct request through the worker's stages.

    Returns what the records published, each record's admission time, and each direct
    request's answer (or the DecodeError REST answers 400 with).
    """
    published: list[Outgoing] = []
    took: list[float] = []
    answers: list[Answer | DecodeError] = []
    settings_ = Settings(
        batching=BatchingSettings(max_batch_size=16, max_batch_delay_ms=2),
        runtime=RuntimeSettings(
            max_request_bytes=1 << 20, max_request_elements=100_000,
            default_timeout_ms=batch.default_timeout_ms, max_in_flight=100,
        ),
        models=ModelSettings(repository=MODELS, torch_threads=1),
    )  # fmt: skip
    async with registry(batch.writers) as schemas_, asyncio.TaskGroup() as group:
        pipeline = Pipeline(
            group, settings_, repository=lambda: repository,
            destinations=Destinations("replies", "dlq", "g"), codecs=Codecs(schemas_),
            in_flight=InFlight(100), metrics=Metrics(), publish=published.extend,
            acknowledged=lambda _: None,
        )  # fmt: skip
        async with pipeline:
            direct = Direct(pipeline.dispatch, InFlight(64))
            await schemas_.prepare([(s.value, s.headers) for s in batch.records])
            for source in batch.records:
                started = time.perf_counter()
                pipeline.dispatch(source)
                took.append(time.perf_counter() - started)
            answers = await asyncio.gather(*(ask(direct, body) for body in batch.bodies))
            await pipeline.drain()
    return published, took, answers


async def ask(direct: Direct, body: bytes) -> Answer | DecodeError:
    """A REST body as the REST endpoint takes it: parsed, then served through ``direct``."""
    try:
        request = request_from_body(parse_json_body(body), [("model_name", b"digits")], None)
    except DecodeError as exc:
        return exc
    return await direct.infer("rest", request, timeout_s=30)


# ---- records ------------------------------------------------------------------------------

JSON = ("content-type", b"application/json")
PROTO = ("content-type", b"application/x-protobuf")
UNICODE = st.text(st.characters(codec="utf-8"), max_size=40)
TEXT = UNICODE | st.text(max_size=3).map(lambda t: t + "\ud800")
"""Any text, sometimes with a lone surrogate (which only JSON can carry)."""
HEADER_VALUES = st.binary(max_size=40) | st.sampled_from([b"digits", b"minilm", b"1", b"\xff"])
HEADER_NAMES = st.sampled_from(
    ["correlation_id", "reply_to", "traceparent", "model_name", "mlserver-model", "priority"]
)
SHAPES = st.lists(st.integers(-3, 2**40) | st.integers(0, 4), max_size=6)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=12,
)


def good(row: int) -> Record:
    """A digits request (id ``good-<row>``) that must get the label of ``PIXELS[row]``."""
    tensor = Tensor.from_numpy("pixels", PIXELS[row][None])
    return source(encode_request(InferenceRequest(f"good-{row}", "digits", [tensor])), [])


def source(value: bytes | None, headers: list[tuple[str, bytes]], age_ms: int = 0) -> Record:
    """A fetched record written ``age_ms`` ago."""
    written = int(time.time() * 1000) - age_ms
    return Record(TopicPartition("requests", 0), 0, None, value, headers, written)


@st.composite
def v2_json(draw: st.DrawFn) -> bytes:
    """A V2 JSON body: mostly well-formed, with hostile text, shapes and values anywhere."""
    tensor = {
        "name": draw(st.sampled_from(["pixels", "text", "x"]) | TEXT),
        "datatype": draw(st.sampled_from(["FP32", "INT64", "BOOL", "BYTES", "FP16", "x"])),
        "shape": draw(SHAPES),
        "data": draw(VALUES),
    }
    body: dict[str, Any] = {"id": draw(TEXT), "inputs": [tensor]}
    if draw(st.booleans()):
        body["parameters"] = draw(st.dictionaries(TEXT, VALUES, max_size=2))
    text = json.dumps(body, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


@st.composite
def v2_proto(draw: st.DrawFn) -> bytes:
    """An OIP Protobuf request with any shape, raw or typed contents."""
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=draw(st.sampled_from(["pixels", "x"])),
        datatype=draw(st.sampled_from(["FP32", "INT64", "BYTES", "BOOL"])),
        shape=draw(st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 64), max_size=40)),
    )
    raw = [draw(st.binary(max_size=300))] if draw(st.booleans()) else []
    message = pb.ModelInferRequest(model_name="digits", id="p", inputs=[tensor],
                                   raw_input_contents=raw)  # fmt: skip
    return bytes(message.SerializeToString())


@st.composite
def hostile(draw: st.DrawFn, registered: list[int]) -> Record:
    """One record that is anything but a plain good request."""
    headers = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=3))
    kind = draw(st.sampled_from(["bytes", "json", "proto", "framed", "text"]))
    age = draw(st.sampled_from([0, 3_600_000]))  # an hour old: past any default timeout
    if kind == "json":
        return source(draw(v2_json()), [JSON, ("model_name", b"digits"), *headers], age)
    if kind == "proto":
        return source(draw(v2_proto()), [PROTO, *headers], age)
    if kind == "framed":
        schema_id = draw(st.sampled_from([*registered, GOOD_ID, 999]))
        body = draw(st.binary(max_size=200))
        return source(b"\x00" + schema_id.to_bytes(4, "big") + body, headers, age)
    if kind == "text":
        strings = draw(st.lists(UNICODE, min_size=1, max_size=3))
        tensor = Tensor.from_strings("text", strings)
        return source(encode_request(InferenceRequest("t", "minilm", [tensor])), headers, age)
    content = draw(st.sampled_from([[], [JSON], [PROTO]]))
    return source(draw(st.binary(max_size=300)), [*content, *headers], age)


@dataclass
class Batch:
    """Writer schemas to register, records (good and hostile, shuffled), direct request bodies."""

    writers: dict[int, Any]
    records: list[Record]
    bodies: list[bytes]
    goods: dict[str, int]
    """Good ids (records and direct requests) and the PIXELS row each must be labelled as."""
    default_timeout_ms: int


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    """A batch of every kind of record, and a few REST bodies beside it."""
    writers: dict[int, Any] = {GOOD_ID: json.loads(schema_text("inference_request"))}
    extra = draw(st.lists(schemas(), max_size=3))
    writers |= {100 + i: s for i, s in enumerate(extra)}
    rows = draw(st.lists(st.integers(0, len(PIXELS) - 1), min_size=2, max_size=5, unique=True))
    bad = draw(st.lists(hostile([*writers]), min_size=1, max_size=8))
    records = draw(st.permutations([good(row) for row in rows[1:]] + bad))
    bodies = [good_body(rows[0]), *draw(st.lists(v2_json(), max_size=3))]
    return Batch(
        writers, list(records), bodies, {f"good-{row}": row for row in rows},
        draw(st.sampled_from([0, 60_000])),
    )  # fmt: skip


def good_body(row: int) -> bytes:
    """A REST body that must get the label of ``PIXELS[row]``."""
    tensor = {"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": PIXELS[row].tolist()}
    return json.dumps({"id": f"good-{row}", "inputs": [tensor]}).encode()


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(batches())
def test_any_batch_of_records_gets_one_outcome_each_and_good_ones_their_predictions(
    text_repository: ModelRepository, batch: Batch
) -> None:
    """No stage fails; one reply or one dead-letter copy per record; good requests predicted."""
    published, took, answers = asyncio.run(run_batch(text_repository, batch))
    outcomes: Counter[tuple[int, bool]] = Counter(
        (id(item.origin), item.is_dead_letter) for item in published
    )
    for record in batch.records:
        replies, copies = outcomes[(id(record), False)], outcomes[(id(record), True)]
        assert replies <= 1, "one reply at most"
        assert copies <= 1, "one dead-letter copy at most"
        assert replies + copies >= 1, "every record is answered or dead-lettered"
    labels = predicted_labels(text_repository)
    got: dict[str, int] = {}
    for item in published:
        if item.correlation_id in batch.goods and not item.is_dead_letter:
            response = decode_response(item.value or b"")
            assert response.error is None, response.error
            got[response.id] = int(response.output("label")[0])
    for answer in answers:
        if not isinstance(answer, DecodeError) and answer.response.id in batch.goods:
            assert answer.response.error is None, answer.response.error
            got[answer.response.id] = int(answer.response.output("label")[0])
        elif not isinstance(answer, DecodeError):
            assert answer.response.error is not None or answer.response.outputs
    assert got == {rid: int(labels[row]) for rid, row in batch.goods.items()}
    assert max(took) < LOOP_BOUND_S, f"admitting one record took {max(took):.2f}s"


_LABELS: dict[int, np.ndarray[Any, Any]] = {}


def predicted_labels(repository: ModelRepository) -> np.ndarray[Any, Any]:
    """The digits model's own labels for PIXELS (computed once)."""
    if id(repository) not in _LABELS:
        model = repository.route("digits", None, "").primary
        _LABELS[id(repository)] = model.predict({"pixels": PIXELS})["label"]
    return _LABELS[id(repository)]
