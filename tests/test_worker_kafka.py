"""The worker against the real Kafka broker: replies, batching, routing, errors, topics."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import numpy.typing as npt
import pytest
from aiokafka.partitioner import murmur2

from worker.app import Worker
from worker.client import InferenceClient
from worker.codec import decode_response, encode_request
from worker.domain import InferenceRequest, Tensor
from worker.errors import ConfigError, ErrorCode
from worker.kafka import ensure_topics, make_producer
from worker.repository import ModelRepository
from worker.settings import Settings

from .conftest import changed, group_lag, reply_reader, running_worker, topic_size, wait_for

pytestmark = pytest.mark.kafka

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


async def test_thousand_concurrent_requests_each_get_their_own_correct_reply(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """1,000 concurrent requests: each reply has its id and the model's own prediction."""
    pixels, _ = testset
    rng = np.random.default_rng(42)
    rows = rng.integers(0, len(pixels), 1000)
    inputs = pixels[rows]
    expected = repository.route("digits", None, "").primary.predict({"pixels": inputs})
    async with running_worker(settings, repository), InferenceClient(settings.kafka) as client:
        ids = [f"req-{i}-{uuid.uuid4().hex[:6]}" for i in range(1000)]
        replies = await asyncio.gather(
            *(
                client.infer("digits", {"pixels": inputs[i : i + 1]}, request_id=ids[i], timeout=90)
                for i in range(1000)
            )
        )
    assert [r.id for r in replies] == ids
    labels = np.array([r.output("label")[0] for r in replies])
    probabilities = np.concatenate([r.output("probabilities") for r in replies])
    np.testing.assert_array_equal(labels, expected["label"])
    np.testing.assert_allclose(probabilities, expected["probabilities"], rtol=1e-5, atol=1e-7)
    sizes = [r.timing.batch_size for r in replies if r.timing is not None]
    assert len(sizes) == 1000
    limit = repository.route("digits", None, "").primary.config.max_batch_size
    assert limit is not None
    assert max(sizes) <= limit
    assert np.mean(sizes) > 1, "concurrent load should be batched"
    assert {r.model_version for r in replies} == {
        repository.route("digits", None, "").primary.version
    }


async def test_a_reply_topic_outside_the_policy_is_refused_and_nothing_is_written_there(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """reply_to naming our own topics: refused on the default topic, nothing written there."""
    kafka = settings.kafka
    await ensure_topics(kafka, [kafka.requests_topic, kafka.replies_topic, kafka.dead_letter_topic])
    tensor = Tensor.from_numpy("pixels", testset[0][:1])
    targets = {"steer-requests": kafka.requests_topic, "steer-dlq": kafka.dead_letter_topic}
    async with running_worker(settings, repository) as worker, reply_reader(settings) as replies:
        producer = make_producer(kafka)
        await producer.start()
        try:
            for rid, topic in targets.items():
                await producer.send_and_wait(
                    kafka.requests_topic,
                    encode_request(InferenceRequest(rid, "digits", [tensor])),
                    headers=[("reply_to", topic.encode())],
                )
        finally:
            await producer.stop()
        await wait_for(lambda: len(replies) >= 2, timeout=60, what="two refusals")
        await wait_for(
            lambda: worker.metrics.value("inference_reply_topic_refused_total") == 2,
            timeout=30,
            what="the refusals counted",
        )
    assert await topic_size(settings, kafka.requests_topic) == 2, "only the two requests"
    assert await topic_size(settings, kafka.dead_letter_topic) == 0
    for reply in replies:
        response = decode_response(reply.value)
        assert response.id in targets
        assert response.error is not None
        assert response.error.code == "INVALID_ARGUMENT"
        assert "is not allowed" in response.error.message


async def test_reply_goes_to_reply_to_topic_with_key_and_headers(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """reply_to is honoured; the reply keeps key and correlation id, continues the trace."""
    other = f"{settings.kafka.replies_topic}.custom"
    settings = changed(settings, "kafka", reply_topics=[f"{settings.kafka.replies_topic}.*"])
    request = InferenceRequest(
        id="corr-42",
        model_name="digits",
        inputs=[Tensor.from_numpy("pixels", testset[0][:2])],
    )
    traceparent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with (
        running_worker(settings, repository),
        reply_reader(settings, other) as custom,
        reply_reader(settings) as default,
    ):
        producer = make_producer(settings.kafka)
        await producer.start()
        try:
            await producer.send_and_wait(
                settings.kafka.requests_topic,
                encode_request(request),
                key=b"user-7",
                headers=[
                    ("reply_to", other.encode()),
                    ("traceparent", traceparent),
                    ("kafka_correlationId", b"\x01\x02"),
                ],
            )
        finally:
            await producer.stop()
        await wait_for(lambda: len(custom) == 1, timeout=60, what="a reply on the reply_to topic")
    reply = custom[0]
    assert reply.key == b"user-7"
    # Java's partitioner: murmur2 of the key, positive, modulo the partition count.
    assert reply.partition == (murmur2(b"user-7") & 0x7FFFFFFF) % settings.kafka.topic_partitions
    assert reply.headers["correlation_id"] == b"corr-42"
    version, trace_id, span_id, flags = reply.headers["traceparent"].decode().split("-")
    assert (version, trace_id, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "01")
    assert span_id != "b7ad6b7169203331", "the reply carries the worker's span, a child"
    assert len(span_id) == 16
    assert reply.headers["kafka_correlationId"] == b"\x01\x02"
    decoded = decode_response(reply.value)
    assert decoded.id == "corr-42"
    assert decoded.output("label").shape == (2,)
    assert default == []
    replies_topic = settings.kafka.replies_topic
    assert await topic_size(settings, replies_topic) == 0, "nothing on the default reply topic"


async def test_bad_requests_get_coded_error_replies(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """Unknown model, unknown version, wrong dtype and wrong shape are answered with codes."""
    pixels = testset[0][:1]
    async with running_worker(settings, repository), InferenceClient(settings.kafka) as client:
        unknown = await client.infer("no-such-model", {"pixels": pixels}, timeout=60)
        version = await client.infer("digits", {"pixels": pixels}, version="9", timeout=60)
        dtype = await client.infer("digits", {"pixels": pixels.astype(np.float64)}, timeout=60)
        shape = await client.infer("digits", {"pixels": pixels[:, :10]}, timeout=60)
        good = await client.infer("digits", {"pixels": pixels}, timeout=60)
    assert unknown.error is not None
    assert unknown.error.code == ErrorCode.NOT_FOUND
    assert "no-such-model" in unknown.error.message
    assert version.error is not None
    assert version.error.code == ErrorCode.NOT_FOUND
    assert dtype.error is not None
    assert dtype.error.code == ErrorCode.INVALID_ARGUMENT
    assert "FP64" in dtype.error.message
    assert "FP32" in dtype.error.message
    assert shape.error is not None
    assert shape.error.code == ErrorCode.INVALID_ARGUMENT
    assert "[-1, 64]" in shape.error.message
    assert good.error is None, "the worker keeps serving after bad requests"


async def test_undecodable_record_with_correlation_header_gets_error_reply(
    settings: Settings, repository: ModelRepository
) -> None:
    """Garbage bytes carrying a correlation_id header are answered INVALID_ARGUMENT."""
    async with running_worker(settings, repository), reply_reader(settings) as replies:
        producer = make_producer(settings.kafka)
        await producer.start()
        try:
            await producer.send_and_wait(
                settings.kafka.requests_topic,
                b"\x07not avro at all",
                headers=[("correlation_id", b"junk-1")],
            )
        finally:
            await producer.stop()
        await wait_for(lambda: len(replies) == 1, timeout=60, what="the error reply")
    reply = decode_response(replies[0].value)
    assert reply.id == "junk-1"
    assert reply.error is not None
    assert reply.error.code == ErrorCode.INVALID_ARGUMENT


async def test_requests_published_before_any_worker_are_answered_and_committed(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """A new group starts at the earliest record; afterwards offsets are committed to the end."""
    await ensure_topics(settings.kafka, [settings.kafka.requests_topic])
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        for i in range(30):
            request = InferenceRequest(
                id=f"early-{i}",
                model_name="digits",
                inputs=[Tensor.from_numpy("pixels", testset[0][i : i + 1])],
            )
            await producer.send(settings.kafka.requests_topic, encode_request(request))
        await producer.flush()
    finally:
        await producer.stop()
    async with reply_reader(settings) as replies, running_worker(settings, repository):
        await wait_for(lambda: len(replies) >= 30, timeout=60, what="30 replies")
        ids = sorted(decode_response(r.value).id for r in replies)
        assert ids == sorted(f"early-{i}" for i in range(30))

        async def all_committed() -> bool:
            return await group_lag(settings) == 0

        await wait_for(all_committed, timeout=30, what="offsets committed to the end")


async def test_missing_topic_is_a_clear_error_when_topics_are_managed_elsewhere(
    settings: Settings, repository: ModelRepository
) -> None:
    """With manage_topics=false, a missing topic fails start-up naming it and the fix."""
    worker = Worker(changed(settings, "kafka", manage_topics=False), repository)
    with pytest.raises(ConfigError) as info:
        await asyncio.wait_for(worker.run(), 60)
    assert settings.kafka.requests_topic in str(info.value)
    assert "WORKER_KAFKA__MANAGE_TOPICS" in str(info.value)


async def test_worker_creates_its_topics_with_the_configured_partitions(
    settings: Settings, repository: ModelRepository
) -> None:
    """At start the worker creates missing request and reply topics with topic_partitions."""
    async with running_worker(settings, repository) as worker:
        assert {tp.topic for tp in worker.assigned} == {settings.kafka.requests_topic}
        assert len(worker.assigned) == settings.kafka.topic_partitions
        producer = make_producer(settings.kafka)
        await producer.start()
        try:
            replies = await producer.partitions_for(settings.kafka.replies_topic)
        finally:
            await producer.stop()
        assert len(replies) == settings.kafka.topic_partitions
