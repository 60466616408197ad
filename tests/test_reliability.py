"""Reliability against the real broker: bad input, deadlines, isolation, limits, DLQ, watchdog."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import numpy.typing as npt
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import worker.answering as answering_module
from worker.answers import model_response
from worker.app import Worker
from worker.client import InferenceClient
from worker.codec import decode_response, encode_request, encode_response, schema_dir
from worker.domain import InferenceRequest, InferenceResponse, Tensor
from worker.errors import ErrorCode, WatchdogError, WorkerError
from worker.kafka import ensure_topics, make_producer
from worker.model import LoadedModel
from worker.outgoing import DLQ_HEADER_PREFIX
from worker.repository import ModelRepository
from worker.settings import Settings

from .conftest import (
    MODELS,
    Reply,
    changed,
    group_lag,
    partitions_of,
    reply_reader,
    running_worker,
    wait_for,
)

pytestmark = pytest.mark.kafka

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


def with_runtime(settings: Settings, **changes: Any) -> Settings:
    """The same settings with some runtime fields changed."""
    return changed(settings, "runtime", **changes)


def request_value(request_id: str, tensor: Tensor, model: str = "digits") -> bytes:
    return encode_request(InferenceRequest(id=request_id, model_name=model, inputs=[tensor]))


def poison(model: LoadedModel, marker: float) -> Callable[[dict[str, Any]], Any]:
    """An ``upload`` (the first step of a forward pass) that raises on a pixel of ``marker``."""
    original = model.upload

    def upload(inputs: dict[str, Any]) -> Any:
        if (inputs["pixels"] == marker).any():
            raise RuntimeError("poisoned row")
        return original(inputs)

    return upload


def unknown_datatype_value(request_id: str) -> bytes:
    """Bare Avro binary whose datatype enum index is beyond the schema's symbols."""
    raw = json.loads((schema_dir() / "inference_request.avsc").read_text())
    tensor_schema = raw["fields"][3]["type"]["items"]
    tensor_schema["fields"][1]["type"]["symbols"].append("BF16")
    schema = fastavro.parse_schema(raw)
    buf = io.BytesIO()
    record = {
        "id": request_id,
        "model_name": "digits",
        "model_version": None,
        "inputs": [{"name": "pixels", "datatype": "BF16", "shape": [1, 64], "data": b"\0" * 128}],
        "parameters": None,
        "deadline_ms": None,
    }
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


async def publish(
    settings: Settings, records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]
) -> None:
    """Publish (key, value, headers) records to the requests topic, acknowledged."""
    kafka = settings.kafka
    await ensure_topics(kafka, [kafka.requests_topic, kafka.replies_topic, kafka.dead_letter_topic])
    producer = make_producer(kafka)
    await producer.start()
    try:
        futures = [
            await producer.send(kafka.requests_topic, value, key=key, headers=headers)
            for key, value, headers in records
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def by_id(replies: list[Reply]) -> dict[str, InferenceResponse]:
    decoded = [decode_response(r.value) for r in replies]
    return {r.id: r for r in decoded}


async def serve_until_settled(
    settings: Settings, repository: ModelRepository, *, replies: int, copies: int
) -> tuple[list[Reply], list[Reply], Worker]:
    """Serve until ``replies`` replies and ``copies`` dead-letter copies are read, all committed.

    Returns them and the (stopped) worker, whose metrics stay readable.
    """
    async with (
        reply_reader(settings) as answered,
        reply_reader(settings, settings.kafka.dead_letter_topic) as dlq,
        running_worker(settings, repository) as worker,
    ):
        await wait_for(
            lambda: len(answered) >= replies and len(dlq) >= copies,
            timeout=90,
            what=f"{replies} replies and {copies} dead-letter copies",
        )

        async def committed() -> bool:
            return await group_lag(settings) == 0

        await wait_for(committed, timeout=30, what="every offset committed")
    return answered, dlq, worker


async def test_bad_input_corpus_is_answered_or_dead_lettered_and_good_requests_still_served(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """Hostile records: each gets a coded reply or a DLQ copy; good ones get correct answers."""
    pixels = testset[0]
    good = {f"good-{i}": pixels[i : i + 1] for i in range(40)}
    valid = request_value("x", Tensor.from_numpy("pixels", pixels[:1]))
    nan = pixels[:1].copy()
    nan[0, 5] = np.nan
    inf = pixels[:1].copy()
    inf[0, 9] = np.inf
    other_schema = encode_response(InferenceResponse(id="not-a-request", model_name="digits"))

    def cid(name: str) -> list[tuple[str, bytes]]:
        return [("correlation_id", name.encode())]

    # name -> (key, value, headers, expected code, dead-lettered?)
    corpus: dict[str, tuple[bytes | None, bytes | None, list[tuple[str, bytes]], str | None, bool]]
    corpus = {
        "random-no-id": (b"k1", bytes(range(7, 250, 3)), [], None, True),
        "random": (b"k2", b"\x13\x99garbage\x00\xff", cid("random"), "INVALID_ARGUMENT", True),
        "empty": (b"k3", b"", cid("empty"), "INVALID_ARGUMENT", True),
        "tombstone": (b"k4", None, [], None, True),
        "truncated": (None, valid[:-7], cid("truncated"), "INVALID_ARGUMENT", True),
        "other-schema": (None, other_schema, cid("other-schema"), "INVALID_ARGUMENT", True),
        "unknown-dtype": (None, unknown_datatype_value("u"), cid("unknown-dtype"),
                          "INVALID_ARGUMENT", True),
        "overflow": (None, request_value("overflow", Tensor("pixels", "FP32", (2**62, 2**62),
                     b"\0" * 4)), [], "RESOURCE_EXHAUSTED", False),
        "huge-shape": (None, request_value("huge-shape", Tensor("pixels", "FP32", (100_000, 64),
                       b"\0" * 256)), [], "RESOURCE_EXHAUSTED", False),
        "short-data": (None, request_value("short-data", Tensor("pixels", "FP32", (3, 64),
                       b"\0" * 256)), [], "INVALID_ARGUMENT", False),
        "negative-dim": (None, request_value("negative-dim", Tensor("pixels", "FP32", (-1, 64),
                         b"")), [], "INVALID_ARGUMENT", False),
        "nan": (None, request_value("nan", Tensor.from_numpy("pixels", nan)), [],
                "INVALID_ARGUMENT", False),
        "inf": (None, request_value("inf", Tensor.from_numpy("pixels", inf)), [],
                "INVALID_ARGUMENT", False),
        "wrong-model": (None, request_value("wrong-model", Tensor.from_numpy("pixels", pixels[:1]),
                        model="resnet"), [], "NOT_FOUND", False),
        "poison-dims": (None, request_value("poison-dims", Tensor("pixels", "FP32",
                        (2**63 - 1,) * 230, b"\0" * 4)), [], "INVALID_ARGUMENT", False),
        "empty-id": (None, b"\0" * 5, cid("empty-id"), "INVALID_ARGUMENT", False),
        "long-name": (None, request_value("long-name", Tensor.from_numpy("pixels", pixels[:1]),
                      model="m" * 200_000), [], "NOT_FOUND", False),
    }  # fmt: skip
    records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
    bad = list(corpus.items())
    for i, (request_id, rows) in enumerate(good.items()):
        records.append((None, request_value(request_id, Tensor.from_numpy("pixels", rows)), []))
        if i < len(bad):
            key, value, headers, _, _ = bad[i][1]
            records.append((key, value, headers))
    await publish(settings, records)
    kafka = settings.kafka
    answered = {name for name, spec in corpus.items() if spec[3] is not None}
    dead = {name for name, spec in corpus.items() if spec[4]}
    async with (
        reply_reader(settings) as replies,
        reply_reader(settings, kafka.dead_letter_topic) as dlq,
        running_worker(settings, repository) as worker,
    ):
        await wait_for(
            lambda: len(replies) >= len(good) + len(answered) and len(dlq) >= len(dead),
            timeout=90,
            what="replies and dead-letter records for the whole corpus",
        )

        async def committed() -> bool:
            return await group_lag(settings) == 0

        await wait_for(committed, timeout=30, what="offsets committed over the whole corpus")
        assert worker.in_flight == 0
    assert len(replies) == len(good) + len(answered)
    assert len(dlq) == len(dead)
    got = by_id(replies)
    expected = repository.route("digits", None, "").primary.predict(
        {"pixels": np.concatenate(list(good.values()))}
    )
    for i, request_id in enumerate(good):
        assert got[request_id].output("label")[0] == expected["label"][i]
    for name in answered:
        reply = got[name]
        assert reply.error is not None, name
        assert reply.error.code == corpus[name][3], (name, reply.error)
        assert reply.error.message
    positions = {
        (r.headers[DLQ_HEADER_PREFIX + "partition"], r.headers[DLQ_HEADER_PREFIX + "offset"])
        for r in dlq
    }
    assert len(positions) == len(dead), "one dead-letter record per bad record"
    for record in dlq:
        assert record.headers[DLQ_HEADER_PREFIX + "topic"] == kafka.requests_topic.encode()
        assert record.headers[DLQ_HEADER_PREFIX + "stage"] == b"DECODE"
        assert record.headers[DLQ_HEADER_PREFIX + "exception.class.name"].endswith(b"DecodeError")
        assert record.headers[DLQ_HEADER_PREFIX + "exception.message"]
        assert int(record.headers[DLQ_HEADER_PREFIX + "timestamp"]) > 0
    originals = {(key, value) for key, value, _, _, is_dead in corpus.values() if is_dead}
    assert {(r.key, r.value or None) for r in dlq} == {
        (k, v if v else None) for k, v in originals
    }, "dead-letter records keep the original key and value"


async def test_deadlines_are_enforced_without_running_the_model(
    settings: Settings, testset: TestSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past deadline_ms, or an old record with default_timeout_ms: DEADLINE_EXCEEDED, no compute."""
    repository = ModelRepository.load(MODELS)
    model = repository.route("digits", None, "").primary
    computed_rows: list[int] = []
    original = model.upload

    def counting(inputs: dict[str, Any]) -> Any:
        computed_rows.append(len(inputs["pixels"]))
        return original(inputs)

    monkeypatch.setattr(model, "upload", counting)
    settings = with_runtime(settings, default_timeout_ms=30_000)
    now_ms = int(time.time() * 1000)
    tensor = Tensor.from_numpy("pixels", testset[0][:1])

    def value(request_id: str, deadline: int | None) -> bytes:
        request = InferenceRequest(request_id, "digits", [tensor], deadline_ms=deadline)
        return encode_request(request)

    kafka = settings.kafka
    # The worker first, then the requests: a slow start must not expire the fresh ones.
    async with reply_reader(settings) as replies, running_worker(settings, repository):
        producer = make_producer(kafka)
        await producer.start()
        try:
            for request_id, deadline, timestamp in (
                ("expired", now_ms - 1_000, None),
                ("in-time", now_ms + 600_000, None),
                ("old-record", None, now_ms - 60_000),
                ("fresh-record", None, None),
            ):
                await producer.send_and_wait(
                    kafka.requests_topic, value(request_id, deadline), timestamp_ms=timestamp
                )
        finally:
            await producer.stop()
        await wait_for(lambda: len(replies) >= 4, timeout=60, what="four replies")
    got = by_id(replies)
    for name in ("expired", "old-record"):
        error = got[name].error
        assert error is not None
        assert error.code == ErrorCode.DEADLINE_EXCEEDED
    assert got["in-time"].error is None
    assert got["fresh-record"].error is None
    assert sum(computed_rows) == 2, "only the two live requests reach the model"


async def test_one_bad_request_does_not_fail_its_batch(
    settings: Settings, testset: TestSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that makes the model raise gets INTERNAL; the rest of its batch is answered."""
    repository = ModelRepository.load(MODELS)
    model = repository.route("digits", None, "").primary
    marker = 13.5  # digits pixels are integers 0..16: this value appears only where we put it
    monkeypatch.setattr(model, "upload", poison(model, marker))
    pixels = testset[0][:60].copy()
    poisoned = {7, 30, 51}
    for i in poisoned:
        pixels[i, 10] = marker
    expected = (
        ModelRepository.load(MODELS).route("digits", None, "").primary.predict({"pixels": pixels})
    )
    async with running_worker(settings, repository), InferenceClient(settings.kafka) as client:
        replies = await asyncio.gather(
            *(client.infer("digits", {"pixels": pixels[i : i + 1]}, timeout=60) for i in range(60))
        )
    for i, reply in enumerate(replies):
        if i in poisoned:
            assert reply.error is not None
            assert reply.error.code == ErrorCode.INTERNAL
            assert "poisoned row" in reply.error.message
        else:
            assert reply.error is None, reply.error
            assert reply.output("label")[0] == expected["label"][i]
    sizes = [r.timing.batch_size for r in replies if r.timing is not None]
    assert max(sizes) > 1, "the poisoned requests must have shared batches with good ones"


async def test_in_flight_is_bounded_and_fetching_pauses(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """With a backlog far above max_in_flight, in-flight never exceeds it and fetching pauses."""
    settings = with_runtime(settings, max_in_flight=25)
    tensor = Tensor.from_numpy("pixels", testset[0][:1])
    await publish(settings, [(None, request_value(f"bp-{i}", tensor), []) for i in range(1500)])
    async with reply_reader(settings) as replies, running_worker(settings, repository) as worker:
        seen: list[int] = []

        def all_replied() -> bool:
            seen.append(worker.in_flight)
            return len(replies) >= 1500

        await wait_for(all_replied, timeout=120, what="1500 replies")
        assert max(seen) <= 25
        assert max(seen) > 1
        assert worker.metrics.value("inference_fetch_pauses_total") > 0
    assert len(by_id(replies)) == 1500


async def serve_one_unpublishable(
    publisher: Settings, worker: Settings, repository: ModelRepository, testset: TestSet, *,
    reply_to: str, others: int = 20,
) -> Reply:  # fmt: skip
    """Serve one request whose reply cannot be published among ``others``; return its DLQ copy.

    ``publisher`` settings publish and read; the worker runs with ``worker`` settings. The
    others must all be answered and the group's offsets committed.
    """
    kafka = publisher.kafka
    worker = changed(worker, "kafka", reply_topics=[reply_to])  # allowed, but unpublishable
    tensor = Tensor.from_numpy("pixels", testset[0][:1])
    records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = [
        (b"lost-key", request_value("lost", tensor), [("reply_to", reply_to.encode())])
    ]
    records += [(None, request_value(f"ok-{i}", tensor), []) for i in range(others)]
    await publish(publisher, records)
    async with (
        reply_reader(publisher) as replies,
        reply_reader(publisher, kafka.dead_letter_topic) as dlq,
        running_worker(worker, repository),
    ):
        await wait_for(
            lambda: len(replies) >= others and len(dlq) >= 1, timeout=60,
            what="replies and DLQ copy",
        )  # fmt: skip

        async def committed() -> bool:
            return await group_lag(publisher) == 0  # the same group, read as the publisher

        await wait_for(committed, timeout=30, what="offsets committed")
    assert {decode_response(r.value).id for r in replies} == {f"ok-{i}" for i in range(others)}
    (copy,) = dlq
    assert copy.key == b"lost-key"
    assert copy.headers[DLQ_HEADER_PREFIX + "stage"] == b"REPLY_PUBLISH"
    assert copy.headers["reply_to"] == reply_to.encode(), "original headers are kept"
    return copy


async def test_reply_to_a_missing_topic_is_dead_lettered_without_stalling_others(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """A reply that cannot be published dead-letters its request; other replies flow on."""
    missing = f"{settings.kafka.replies_topic}.does-not-exist"
    copy = await serve_one_unpublishable(settings, settings, repository, testset, reply_to=missing)
    assert missing.encode() in copy.headers[DLQ_HEADER_PREFIX + "exception.message"]


async def test_watchdog_ends_a_worker_whose_model_hangs(
    settings: Settings, testset: TestSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model call that never returns trips the watchdog: run() raises WatchdogError."""
    repository = ModelRepository.load(MODELS)
    model = repository.route("digits", None, "").primary
    release = threading.Event()

    def hang(inputs: dict[str, Any]) -> Any:
        release.wait(60)
        raise RuntimeError("released")

    monkeypatch.setattr(model, "upload", hang)
    settings = with_runtime(settings, watchdog_timeout_s=2.0)
    await publish(
        settings, [(None, request_value("h", Tensor.from_numpy("pixels", testset[0][:1])), [])]
    )
    worker = Worker(settings, repository)
    started = time.monotonic()
    try:
        with pytest.raises(ExceptionGroup) as info:
            await asyncio.wait_for(worker.run(), 60)
    finally:
        release.set()
    assert info.group_contains(WatchdogError)
    assert time.monotonic() - started < 45


async def small_dead_letter_topic(settings: Settings, *, max_bytes: int) -> None:
    """Create the test's dead-letter topic with ``max.message.bytes`` set to ``max_bytes``."""
    kafka = settings.kafka
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        limit = {"max.message.bytes": str(max_bytes)}
        await admin.create_topics([NewTopic(kafka.dead_letter_topic, 3, 1, topic_configs=limit)])
    finally:
        await admin.close()


async def test_a_dead_letter_copy_too_large_for_its_topic_goes_without_the_value(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """DLQ topic with max.message.bytes 2048: a 6 KB bad record is dead-lettered reduced."""
    await small_dead_letter_topic(settings, max_bytes=2048)
    tensor = Tensor.from_numpy("pixels", testset[0][:1])
    garbage = b"\x13" + bytes(range(256)) * 24
    records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = [
        (b"big-key", garbage, [("correlation_id", b"too-big"), ("note", b"n" * 500)])
    ]
    records += [(None, request_value(f"ok-{i}", tensor), []) for i in range(10)]
    await publish(settings, records)
    replies, dlq, worker = await serve_until_settled(settings, repository, replies=11, copies=1)
    assert worker.metrics.value("inference_dead_lettered_total", stage="DECODE") == 1
    (copy,) = dlq
    assert copy.key == b"big-key"
    assert not copy.value
    assert "note" not in copy.headers
    assert copy.headers[DLQ_HEADER_PREFIX + "value.size"] == str(len(garbage)).encode()
    assert b"too large" in copy.headers[DLQ_HEADER_PREFIX + "value.dropped"]
    assert copy.headers[DLQ_HEADER_PREFIX + "stage"] == b"DECODE"
    got = by_id(replies)
    assert got["too-big"].error is not None
    assert got["too-big"].error.code == "INVALID_ARGUMENT"
    assert all(got[f"ok-{i}"].error is None for i in range(10))


async def test_a_bug_while_answering_a_batch_dead_letters_it_and_the_worker_goes_on(
    settings: Settings,
    repository: ModelRepository,
    testset: TestSet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Last-resort guard: a bug answering a batch dead-letters it (stage BATCH); work goes on."""
    real = model_response

    def buggy(request: InferenceRequest, *args: Any, **kwargs: Any) -> InferenceResponse:
        if request.id == "bug":
            raise ZeroDivisionError("a bug in reply building")
        return real(request, *args, **kwargs)

    monkeypatch.setattr(answering_module, "model_response", buggy)
    tensor = Tensor.from_numpy("pixels", testset[0][:1])
    kafka = settings.kafka
    async with (
        reply_reader(settings) as replies,
        reply_reader(settings, kafka.dead_letter_topic) as dlq,
        running_worker(settings, repository),
    ):
        await publish(settings, [(b"bug-key", request_value("bug", tensor), [])])
        await wait_for(lambda: len(dlq) >= 1, timeout=60, what="the dead-letter copy")
        await publish(settings, [(None, request_value(f"after-{i}", tensor), []) for i in range(5)])
        await wait_for(lambda: len(replies) >= 5, timeout=60, what="later requests answered")

        async def committed() -> bool:
            return await group_lag(settings) == 0

        await wait_for(committed, timeout=30, what="offsets committed past the bug")
    (copy,) = dlq
    assert copy.key == b"bug-key"
    assert copy.headers[DLQ_HEADER_PREFIX + "stage"] == b"BATCH"
    assert copy.headers[DLQ_HEADER_PREFIX + "exception.class.name"] == b"builtins.ZeroDivisionError"
    assert set(by_id(replies)) == {f"after-{i}" for i in range(5)}


BAD_HEADER_PRODUCER = """
import asyncio
import sys

from aiokafka import AIOKafkaProducer


class RawKey(str):
    def encode(self, *args, **kwargs):  # the pure-Python record builder writes these bytes
        return b"\\xff\\xfe-not-utf8"


async def main(bootstrap, topic):
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        sent = await producer.send_and_wait(
            topic, b"unreadable", key=b"bad-key", headers=[(RawKey("h"), b"v")]
        )
        print(sent.partition, sent.offset)
    finally:
        await producer.stop()


asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def publish_unparseable(settings: Settings, tmp_path: Path) -> tuple[int, int]:
    """Publish one record aiokafka cannot parse (key ``bad-key``); its partition and offset."""
    kafka = settings.kafka
    script = tmp_path / "bad_header.py"
    script.write_text(BAD_HEADER_PRODUCER)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(script), kafka.bootstrap_servers, kafka.requests_topic],
        env={**os.environ, "AIOKAFKA_NO_EXTENSIONS": "1"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    partition, offset = (int(v) for v in done.stdout.split())
    return partition, offset


async def test_a_record_the_client_cannot_parse_is_stepped_past_and_dead_lettered(
    settings: Settings, repository: ModelRepository, testset: TestSet, tmp_path: Path
) -> None:
    """A non-UTF-8 header key (the broker takes it, aiokafka cannot parse it) is stepped past."""
    tensor = Tensor.from_numpy("pixels", testset[0][:1])
    await publish(
        settings, [(b"bad-key", request_value(f"before-{i}", tensor), []) for i in range(5)]
    )
    partition, offset = await publish_unparseable(settings, tmp_path)
    await publish(
        settings, [(b"bad-key", request_value(f"after-{i}", tensor), []) for i in range(5)]
    )
    replies, dlq, worker = await serve_until_settled(settings, repository, replies=10, copies=1)
    assert worker.metrics.value("inference_dead_lettered_total", stage="FETCH") == 1
    (copy,) = dlq
    assert copy.headers[DLQ_HEADER_PREFIX + "stage"] == b"FETCH"
    assert copy.headers[DLQ_HEADER_PREFIX + "partition"] == str(partition).encode()
    assert copy.headers[DLQ_HEADER_PREFIX + "offset"] == str(offset).encode()
    assert b"UnicodeDecodeError" in copy.headers[DLQ_HEADER_PREFIX + "exception.class.name"]
    expected = {f"before-{i}" for i in range(5)} | {f"after-{i}" for i in range(5)}
    assert set(by_id(replies)) == expected


async def test_an_unparseable_record_costs_no_record_of_another_partition(
    settings: Settings, repository: ModelRepository, testset: TestSet, tmp_path: Path
) -> None:
    """Good records on every partition around the bad one, all in the worker's first fetch.

    The fetch that fails on the bad partition has drained the others already: they are put
    back where they stood, so every good record is answered and nothing is committed past one.
    """
    kafka = settings.kafka
    tensor = Tensor.from_numpy("pixels", testset[0][:1])

    def goods(stage: str) -> list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]:
        return [(f"k-{i}".encode(), request_value(f"{stage}-{i}", tensor), []) for i in range(30)]

    await publish(settings, goods("before"))
    await publish_unparseable(settings, tmp_path)
    await publish(settings, goods("after"))
    partitions = await partitions_of(settings, kafka.requests_topic)
    assert len(partitions) > 1
    replies, dlq, _ = await serve_until_settled(settings, repository, replies=60, copies=1)
    assert set(by_id(replies)) == {f"{s}-{i}" for s in ("before", "after") for i in range(30)}
    assert len(replies) == 60
    assert [c.headers[DLQ_HEADER_PREFIX + "stage"] for c in dlq] == [b"FETCH"]


async def test_a_dead_letter_copy_that_cannot_be_published_stops_the_worker_uncommitted(
    settings: Settings, repository: ModelRepository
) -> None:
    """Even the reduced copy does not fit the DLQ topic: the worker stops, the record stays."""
    await small_dead_letter_topic(settings, max_bytes=64)
    await publish(settings, [(b"k", b"\x13garbage" * 100, [])])
    worker = Worker(settings, repository)
    with pytest.raises(BaseExceptionGroup) as info:
        await asyncio.wait_for(worker.run(), timeout=90)
    assert info.group_contains(WorkerError, match="stopping without committing it")
    assert await group_lag(settings) == 1, "the record is served again by the next worker"
