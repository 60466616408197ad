"""Wire formats on the real broker and a real schema registry (Conduit's, dev/local_registry.py).

Producers are the clients users run: confluent-kafka's ``AvroSerializer`` (Schema Registry
framing) and ``AvroDeserializer`` for the replies; V2 JSON and Protobuf records as MLServer and
Seldon producers write them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from worker.codec import decode_response, encode_request, schema_text
from worker.domain import InferenceRequest, Tensor
from worker.oip import pb
from worker.repository import ModelRepository
from worker.settings import Settings

from .conftest import ROOT, Reply, changed, reply_reader, running_worker, wait_for
from .test_reliability import publish

sys.path.insert(0, str(ROOT / "dev"))
import local_registry

pytestmark = pytest.mark.kafka

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


def request_dict(request_id: str, pixels: npt.NDArray[np.float32], **extra: Any) -> dict[str, Any]:
    """A digits request as the Avro record a serializer is given."""
    return {
        "id": request_id, "model_name": "digits", "model_version": "1",
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                    "data": pixels.astype(np.float32).tobytes()}],
        "parameters": None, "deadline_ms": None, **extra,
    }  # fmt: skip


def serialize(registry: str, topic: str, schema: str, records: list[dict[str, Any]]) -> list[bytes]:
    """Records through confluent-kafka's AvroSerializer (it registers ``schema``)."""
    serializer = AvroSerializer(SchemaRegistryClient({"url": registry}), schema)
    context = SerializationContext(topic, MessageField.VALUE)
    return [serializer(r, context) for r in records]


def produce(bootstrap: str, topic: str, values: list[bytes], headers: list[Any]) -> None:
    """Publish with confluent-kafka's own producer (blocking; flushes)."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for value, hdrs in zip(values, headers, strict=True):
        producer.produce(topic, value=value, headers=hdrs)
    assert producer.flush(30) == 0


def deserialize(registry: str, topic: str, replies: list[Reply]) -> dict[str, dict[str, Any]]:
    """Replies through confluent-kafka's AvroDeserializer, by id."""
    deserializer = AvroDeserializer(SchemaRegistryClient({"url": registry}))
    context = SerializationContext(topic, MessageField.VALUE)
    out = {}
    for reply in replies:
        record = deserializer(reply.value, context)
        out[record["id"]] = record
    return out


def digits_labels(repository: ModelRepository, pixels: npt.NDArray[np.float32]) -> list[int]:
    """Digits v1's labels for these rows, computed directly."""
    model = repository.route("digits", "1", "").primary
    return [int(x) for x in model.predict({"pixels": pixels})["label"]]


def label_of(record: dict[str, Any]) -> int:
    """The label in a deserialized reply record."""
    [label] = [o for o in record["outputs"] if o["name"] == "label"]
    return int(np.frombuffer(label["data"], np.int64)[0])


async def test_a_schema_registry_producer_gets_replies_its_deserializer_reads(
    settings: Settings, registry_url: str, repository: ModelRepository, testset: TestSet
) -> None:
    """AvroSerializer requests (the original and an evolved schema) -> AvroDeserializer replies."""
    settings = changed(settings, "schema_registry", url=registry_url)
    kafka = settings.kafka
    pixels = testset[0][:20]
    ours = schema_text("inference_request")
    evolved = json.loads(ours)
    evolved["fields"].append({"name": "client", "type": "string", "default": ""})
    topic = kafka.requests_topic
    values = serialize(registry_url, topic, ours, [request_dict(f"sr-{i}", pixels[i])
                                                   for i in range(10)])  # fmt: skip
    newer = [request_dict(f"sr-{i}", pixels[i], client="app") for i in range(10, 20)]
    values += serialize(registry_url, topic, json.dumps(evolved), newer)
    assert values[0][:1] == values[10][:1] == b"\x00"
    assert values[0][1:5] != values[10][1:5], "the evolved schema has an id of its own"
    async with running_worker(settings, repository), reply_reader(settings) as replies:
        await asyncio.to_thread(produce, kafka.bootstrap_servers, kafka.requests_topic, values,
                                [[] for _ in values])  # fmt: skip
        await wait_for(lambda: len(replies) >= 20, timeout=60, what="20 replies")
    records = deserialize(registry_url, kafka.replies_topic, replies)
    assert sorted(records) == sorted(f"sr-{i}" for i in range(20))
    want = digits_labels(repository, pixels)
    assert [label_of(records[f"sr-{i}"]) for i in range(20)] == want
    assert all(r["error"] is None for r in records.values())


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def private_registry() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A registry of this test's own (it will be stopped): its URL and process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(local_registry.build()), "-addr", f"127.0.0.1:{port}"])
    try:
        for _ in range(300):
            if local_registry.healthy(url, timeout=0.5):
                break
            assert proc.poll() is None, "the registry exited"
            import time  # noqa: PLC0415

            time.sleep(0.05)  # polling the registry's health, not synchronisation of our code
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(10)


async def test_unknown_ids_and_a_stopped_registry_give_coded_errors_and_no_crash(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """404 id: INVALID_ARGUMENT; registry down: cached ids serve, a new id is UNAVAILABLE."""
    pixels = testset[0][:4]
    kafka = settings.kafka
    with private_registry() as (url, proc):
        settings = changed(settings, "schema_registry", url=url, retry_s=0.5)
        [good] = serialize(url, kafka.requests_topic, schema_text("inference_request"),
                           [request_dict("first", pixels[0])])  # fmt: skip
        schema_id = int.from_bytes(good[1:5], "big")
        body = good[5:]

        def framed(sid: int) -> bytes:
            return b"\x00" + sid.to_bytes(4, "big") + body

        async with (
            running_worker(settings, repository) as worker,
            reply_reader(settings) as replies,
            reply_reader(settings, kafka.dead_letter_topic) as dead,
        ):
            await publish(settings, [(None, good, [])])
            await wait_for(lambda: len(replies) == 1, timeout=60, what="the first reply")
            await publish(settings, [(None, framed(schema_id + 1000), [("correlation_id", b"u")])])
            await wait_for(lambda: len(replies) == 2, timeout=60, what="the unknown id's reply")
            proc.terminate()
            proc.wait(10)
            await publish(settings, [
                (None, framed(schema_id), [("correlation_id", b"cached")]),
                (None, framed(schema_id + 2000), [("correlation_id", b"n")]),
            ])  # fmt: skip
            await wait_for(lambda: len(replies) == 4, timeout=60, what="replies while it is down")
            await wait_for(lambda: len(dead) == 2, timeout=60, what="two dead-letter copies")
            await publish(settings, [(None, framed(schema_id), [("correlation_id", b"after")])])
            await wait_for(lambda: len(replies) == 5, timeout=60, what="a reply after the outage")
            lookups = {
                result: worker.metrics.value("inference_schema_lookups_total", result=result)
                for result in ("ok", "missing", "unavailable")
            }
    assert lookups == {"ok": 1, "missing": 1, "unavailable": 1}, "each new id looked up once"
    by_header = {r.headers["correlation_id"]: r for r in replies}
    registry_replies = deserialize_framed(by_header)
    assert registry_replies[b"first"]["error"] is None
    unknown = registry_replies[b"u"]["error"]
    assert unknown["code"] == "INVALID_ARGUMENT"
    assert "is not in the schema registry (404)" in unknown["message"]
    assert registry_replies[b"cached"]["error"] is None, "a cached id works while it is down"
    assert registry_replies[b"after"]["error"] is None, "and the worker goes on"
    down = registry_replies[b"n"]["error"]
    assert down["code"] == "UNAVAILABLE"
    assert "cannot be reached" in down["message"]
    assert {r.headers["correlation_id"] for r in dead} == {b"u", b"n"}


def deserialize_framed(replies: dict[bytes, Reply]) -> dict[bytes, dict[str, Any]]:
    """Registry-framed replies read with our response schema (the registry may be gone)."""
    import io  # noqa: PLC0415

    import fastavro  # noqa: PLC0415

    ours = fastavro.parse_schema(json.loads(schema_text("inference_response")))
    out = {}
    for key, reply in replies.items():
        assert reply.value[:1] == b"\x00", "framed like the request"
        out[key] = cast(dict[str, Any], fastavro.schemaless_reader(io.BytesIO(reply.value[5:]),
                                                                  ours, None))  # fmt: skip
    return out


def json_value(request_id: str, pixels: npt.NDArray[np.float32]) -> bytes:
    """A V2 JSON request body."""
    return json.dumps({"id": request_id, "inputs": [
        {"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": pixels.tolist()}
    ]}).encode()  # fmt: skip


def proto_value(request_id: str, pixels: npt.NDArray[np.float32]) -> bytes:
    """A serialised ModelInferRequest (raw contents)."""
    tensor = pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="FP32", shape=[1, 64])
    return bytes(pb.ModelInferRequest(
        model_name="digits", model_version="1", id=request_id, inputs=[tensor],
        raw_input_contents=[pixels.astype(np.float32).tobytes()],
    ).SerializeToString())  # fmt: skip


JSON_HEADERS = [("content-type", b"application/json"), ("mlserver-model", b"digits"),
                ("mlserver-version", b"1")]  # fmt: skip
PROTO_HEADERS = [("content-type", b"application/x-protobuf")]


def answer(reply: Reply) -> tuple[str, int | None, str | None, int]:
    """(id, label, error code, batch size) of a reply in any format."""
    kind = reply.headers.get("content-type")
    if kind == b"application/json":
        body = json.loads(reply.value)
        label = body["outputs"][1]["data"][0] if "outputs" in body else None
        params = body["parameters"]
        return body["id"], label, params.get("error_code"), params["batch_size"]
    if kind == b"application/x-protobuf":
        message = pb.ModelInferResponse.FromString(reply.value)
        labels = np.frombuffer(message.raw_output_contents[1], np.int64)
        return message.id, int(labels[0]), None, message.parameters["batch_size"].int64_param
    if reply.value[:1] == b"\x00":
        [record] = deserialize_framed({b"": reply}).values()
        return record["id"], label_of(record), None, record["timing"]["batch_size"]
    response = decode_response(reply.value)
    timing = response.timing
    assert timing is not None
    return response.id, int(response.output("label")[0]), None, timing.batch_size


async def test_v2_json_protobuf_and_registry_requests_batch_together_and_get_replies_in_kind(
    settings: Settings,
    registry_url: str,
    repository: ModelRepository,
    repo_dir: Path,
    testset: TestSet,
) -> None:
    """12 requests in four formats, one burst: one batch of 12; each reply in its own format."""
    settings = changed(settings, "schema_registry", url=registry_url)
    settings = changed(settings, "batching", start_when_idle=False)
    config = repo_dir / "digits" / "config.toml"  # wait for the whole burst to arrive
    config.write_text(config.read_text().replace("max_batch_delay_ms = 5.0",
                                                 "max_batch_delay_ms = 1500.0"))  # fmt: skip
    kafka = settings.kafka
    pixels = testset[0][:12]
    framed = serialize(registry_url, kafka.requests_topic, schema_text("inference_request"),
                       [request_dict(f"r-{i}", pixels[i]) for i in (3, 7, 11)])  # fmt: skip
    records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
    for i in range(12):
        kind = i % 4
        if kind == 0:
            tensor = Tensor.from_numpy("pixels", pixels[i : i + 1])
            avro = InferenceRequest(f"r-{i}", "digits", [tensor], "1")
            records.append((None, encode_request(avro), []))
        elif kind == 1:
            records.append((None, json_value(f"r-{i}", pixels[i]), JSON_HEADERS))
        elif kind == 2:
            records.append((None, proto_value(f"r-{i}", pixels[i]), PROTO_HEADERS))
        else:
            records.append((None, framed.pop(0), []))
    patient = ModelRepository.load(repo_dir)
    async with running_worker(settings, patient), reply_reader(settings) as replies:
        await publish(settings, records)
        await wait_for(lambda: len(replies) >= 12, timeout=60, what="12 replies")
    answers = {a[0]: a for a in map(answer, replies)}
    want = digits_labels(repository, pixels)
    assert sorted(answers) == sorted(f"r-{i}" for i in range(12))
    for i in range(12):
        _, label, error, batch = answers[f"r-{i}"]
        assert error is None
        assert label == want[i]
        assert batch == 12, "all four formats in one batch"
    kinds = [r.headers.get("content-type") for r in replies]
    assert kinds.count(b"application/json") == kinds.count(b"application/x-protobuf") == 3


async def test_a_given_reply_schema_id_is_checked_and_used(
    settings: Settings, registry_url: str, repository: ModelRepository, testset: TestSet
) -> None:
    """REPLY_SCHEMA_ID: the worker registers nothing, frames replies with it; a wrong id fails."""
    import aiohttp  # noqa: PLC0415

    from worker.errors import ConfigError  # noqa: PLC0415
    from worker.schema_registry import SchemaRegistry  # noqa: PLC0415

    subject = f"{settings.kafka.replies_topic}-given-value"
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{registry_url}/subjects/{subject}/versions",
                     json={"schema": schema_text("inference_response")}) as response,
    ):  # fmt: skip
        given = (await response.json(content_type=None))["id"]
    request_schema = schema_text("inference_request")
    [framed] = serialize(registry_url, settings.kafka.requests_topic, request_schema,
                         [request_dict("given", testset[0][0])])  # fmt: skip
    wrong = int.from_bytes(framed[1:5], "big")  # a request schema's id, not a response one
    async with SchemaRegistry(
        changed(settings, "schema_registry", url=registry_url, reply_schema_id=given)
        .schema_registry, reply_subject="unused-value",
    ) as registry:  # fmt: skip
        assert registry.reply_id == given
    with pytest.raises(ConfigError, match=f"REPLY_SCHEMA_ID={wrong} is not this worker's"):
        async with SchemaRegistry(
            changed(settings, "schema_registry", url=registry_url, reply_schema_id=wrong)
            .schema_registry, reply_subject="unused-value",
        ):  # fmt: skip
            pass
    settings = changed(settings, "schema_registry", url=registry_url, reply_schema_id=given)
    async with running_worker(settings, repository), reply_reader(settings) as replies:
        await publish(settings, [(None, framed, [])])
        await wait_for(lambda: len(replies) == 1, timeout=60, what="the reply")
    assert int.from_bytes(replies[0].value[1:5], "big") == given


async def test_a_registry_that_cannot_be_reached_at_start_fails_the_start(
    settings: Settings, repository: ModelRepository
) -> None:
    """Registering the reply schema is the first thing: no registry, a clear ConfigError."""
    from worker.app import Worker  # noqa: PLC0415
    from worker.errors import ConfigError  # noqa: PLC0415

    settings = changed(settings, "schema_registry", url=f"http://127.0.0.1:{free_port()}",
                       timeout_s=2.0)  # fmt: skip
    with pytest.raises(ConfigError, match=r"schema registry http://127\.0\.0\.1:\d+ cannot be"):
        async with asyncio.timeout(30):
            await Worker(settings, repository).run()
