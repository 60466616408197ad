"""The pipeline (worker.pipeline) over a scripted transport: origins in, answers to their sinks.

The stages are the worker's own (admission, lanes, the digits model); only the transport is
scripted: ``publish`` collects what a Kafka record would publish, a call's ``respond`` collects
what its caller would get. No broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
from aiokafka import TopicPartition

from worker.answers import Answer, Settled, Stage
from worker.codec import decode_response, encode_request
from worker.direct import Direct
from worker.domain import ErrorInfo, InferenceRequest, InferenceResponse, Tensor
from worker.formats import Codecs
from worker.headers import Headers
from worker.inflight import InFlight
from worker.metrics import Metrics
from worker.origins import Call, Record
from worker.outgoing import DLQ_HEADER_PREFIX, Destinations, Outgoing
from worker.pipeline import Pipeline
from worker.repository import ModelRepository
from worker.settings import BatchingSettings, ModelSettings, RuntimeSettings, Settings

from .conftest import MODELS

PIXELS = np.load(MODELS / "digits" / "testset.npz")["pixels"].astype(np.float32)[:4]
TRACE = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Watching(Codecs):
    """The plain codecs, counting every Kafka encoding; ``forbid``: any encoding raises."""

    def __init__(self, *, forbid: bool = False) -> None:
        super().__init__()
        object.__setattr__(self, "encoded", 0)
        object.__setattr__(self, "forbid", forbid)

    def encode(
        self, value: bytes | None, headers: Headers, response: InferenceResponse
    ) -> tuple[bytes, list[tuple[str, bytes]]]:
        """Count, then refuse or encode as the plain codecs do."""
        object.__setattr__(self, "encoded", self.encoded + 1)  # type: ignore[attr-defined]
        if self.forbid:  # type: ignore[attr-defined]
            raise AssertionError("a Kafka encoding was asked for")
        return super().encode(value, headers, response)


@dataclass
class Transport:
    """What the pipeline handed to Kafka (``published``) and to acknowledgement."""

    published: list[list[Outgoing]] = field(default_factory=list)
    acknowledged: list[Settled] = field(default_factory=list)

    def ack(self, items: Sequence[Settled]) -> None:
        self.acknowledged += items


@asynccontextmanager
async def opened(
    repository: ModelRepository,
    codecs: Codecs,
    transport: Transport,
    *,
    audit_topic: str = "",
    metrics: Metrics | None = None,
) -> AsyncIterator[Pipeline]:
    """A pipeline over ``repository`` with a scripted transport, open (and drained on exit)."""
    settings = Settings(
        batching=BatchingSettings(max_batch_size=8, max_batch_delay_ms=1),
        runtime=RuntimeSettings(max_in_flight=10),
        models=ModelSettings(repository=MODELS, torch_threads=1),
    )
    destinations = Destinations("replies", "dlq", "g", audit_topic=audit_topic)
    async with asyncio.TaskGroup() as group:
        pipeline = Pipeline(
            group, settings, repository=lambda: repository, destinations=destinations,
            codecs=codecs, in_flight=InFlight(10), metrics=metrics or Metrics(),
            publish=transport.published.append, acknowledged=transport.ack,
        )  # fmt: skip
        async with pipeline:
            yield pipeline
            await pipeline.drain()


def record(row: int, offset: int = 0) -> Record:
    """A digits request record for ``PIXELS[row]``, id ``r-<row>``."""
    request = InferenceRequest(
        f"r-{row}", "digits", [Tensor.from_numpy("pixels", PIXELS[row : row + 1])]
    )
    return Record(TopicPartition("requests", 0), offset, None, encode_request(request), [], 1)


def call_request(row: int) -> InferenceRequest:
    """A digits request for ``PIXELS[row]``, id ``c-<row>``, as an endpoint decodes it."""
    return InferenceRequest(
        f"c-{row}", "digits", [Tensor.from_numpy("pixels", PIXELS[row : row + 1])]
    )


def labels(repository: ModelRepository) -> list[int]:
    """The digits model's own labels for PIXELS."""
    model = repository.route("digits", None, "").primary
    return [int(x) for x in model.predict({"pixels": PIXELS})["label"]]


async def test_a_record_and_a_call_get_their_predictions_each_from_its_own_sink(
    repository: ModelRepository,
) -> None:
    """A record's reply is published (Avro); a call's answer goes to its caller, unencoded."""
    transport = Transport()
    codecs = Watching()
    async with opened(repository, codecs, transport) as pipeline:
        pipeline.dispatch(record(0))
        direct = Direct(pipeline.dispatch, InFlight(10))
        answer = await direct.infer("grpc", call_request(1), [("traceparent", TRACE)])
    want = labels(repository)
    [[reply]] = transport.published
    assert reply.topic == "replies"
    assert int(decode_response(reply.value or b"").output("label")[0]) == want[0]
    assert int(answer.response.output("label")[0]) == want[1]
    assert answer.header(
        "traceparent",
    ).startswith(TRACE[:36].decode())  # type: ignore[union-attr]
    assert codecs.encoded == 1, "only the record's reply was encoded"  # type: ignore[attr-defined]
    transports = sorted(item.origin.transport for item in transport.acknowledged)
    assert transports == ["grpc"], "a call counts when handed over; a record when published"


async def test_a_call_never_touches_kafka_encoding(repository: ModelRepository) -> None:
    """With a codec that raises on any encoding, calls are still answered, audit record too."""
    transport = Transport()
    async with opened(repository, Watching(forbid=True), transport, audit_topic="audit") as p:
        direct = Direct(p.dispatch, InFlight(10))
        answers = await asyncio.gather(*(direct.infer("rest", call_request(i)) for i in range(4)))
    assert [a.response.error for a in answers] == [None] * 4
    audits = [m for group in transport.published for m in group]
    assert [m.topic for m in audits] == ["audit"] * 4
    assert all(isinstance(m.origin, Call) for m in audits)


async def test_a_calls_failure_is_an_internal_error_never_a_dead_letter_copy(
    repository: ModelRepository,
) -> None:
    """A call failing at a stage gets INTERNAL naming it, never published; a record, its copy."""
    transport = Transport()
    got: list[InferenceResponse] = []
    call = Call("rest", 1, call_request(0), [], 1, lambda response, _h: got.append(response))
    async with opened(repository, Watching(), transport) as pipeline:
        pipeline.deliver([Answer(call, failed=Stage.BATCH, error=RuntimeError("bug"))])
        pipeline.deliver([Answer(record(0), failed=Stage.BATCH, error=RuntimeError("bug"))])
    [response] = got
    assert response.error is not None
    assert response.error.code == "INTERNAL"
    assert "BATCH" in response.error.message
    [[copy]] = transport.published
    assert copy.topic == "dlq"
    assert dict(copy.headers)[DLQ_HEADER_PREFIX + "stage"] == b"BATCH"


async def test_an_unparseable_record_is_dead_lettered_at_fetch(
    repository: ModelRepository,
) -> None:
    """A record the client could not parse: its place is copied to the DLQ at stage FETCH."""
    transport = Transport()
    async with opened(repository, Watching(), transport) as pipeline:
        pipeline.unparseable(Record(TopicPartition("requests", 2), 9, None, None, [], 0),
                             ValueError("bad header"))  # fmt: skip
    [[copy]] = transport.published
    headers = dict(copy.headers)
    assert copy.topic == "dlq"
    assert headers[DLQ_HEADER_PREFIX + "stage"] == b"FETCH"
    assert headers[DLQ_HEADER_PREFIX + "offset"] == b"9"


async def test_records_and_calls_share_one_in_flight_bound() -> None:
    """With the bound held by records, a call is refused at once; answered records free it."""
    in_flight = InFlight(2)
    tp = TopicPartition("requests", 0)
    in_flight.records.track(tp, 0)
    in_flight.records.track(tp, 1)
    direct = Direct(lambda _call: None, in_flight)
    refused = await direct.infer("rest", call_request(0))
    assert refused.response.error is not None
    assert refused.response.error.code == "RESOURCE_EXHAUSTED"
    in_flight.records.done(tp, 0)
    place = direct.take()
    assert place is not None
    assert in_flight.count == 2
    assert in_flight.room() == 0
    place.release()
    assert in_flight.count == 1


async def test_a_calls_answer_is_always_text_its_caller_can_encode(
    repository: ModelRepository,
) -> None:
    """A model error carrying a lone surrogate reaches the caller with its code, text made safe."""
    transport = Transport()
    got: list[InferenceResponse] = []
    call = Call("grpc", 1, call_request(0), [], 1, lambda response, _h: got.append(response))
    raised = InferenceResponse(
        "c-0", "digits", "2", error=ErrorInfo("INTERNAL", "model failed: \ud800 input")
    )
    async with opened(repository, Watching(), transport) as pipeline:
        pipeline.deliver([Answer(call, raised)])
    [response] = got
    assert response.error is not None
    assert response.error.code == "INTERNAL"
    assert response.error.message.encode() == b"model failed: ? input"
    assert (response.id, response.model_version) == ("c-0", "2")
