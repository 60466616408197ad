"""Priority classes and the calls' reserve on the real broker, over Kafka, REST and gRPC.

The model is held (every batch waits on a gate) while requests queue; each batch's first input
value is noted, so the order batches ran in is read back once the gate opens. One request per
batch and per run (``max_batch_size`` 1, ``max_batches_per_run`` 1): that order is the
batcher's order.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from worker.app import Worker
from worker.codec import decode_response, encode_request
from worker.domain import InferenceRequest, Tensor
from worker.kafka import ensure_topics, make_producer
from worker.model import LoadedModel
from worker.repository import ModelRepository
from worker.settings import Settings

from .conftest import Reply, changed, reply_reader, running_worker, wait_for
from .test_endpoints import infer_message, rest, serving, stub, with_endpoints

pytestmark = pytest.mark.kafka

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]
Sent = tuple[str, float, bytes | None]
"""A request published: its id, its pixels' value, its ``priority`` header (None: none)."""
INFER = "/v2/models/digits/infer"


class Held:
    """Every batch waits for ``gate``; ``order`` notes each batch's first pixel, in run order."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.order: list[float] = []
        self._lock = threading.Lock()

    def upload(self, real: Any) -> Any:
        """A replacement for ``LoadedModel.upload`` that notes, then waits."""

        def upload(model: LoadedModel, inputs: Any) -> Any:
            with self._lock:
                self.order.append(float(inputs["pixels"][0, 0]))
            self.gate.wait(60)
            return real(model, inputs)

        return upload


@contextlib.contextmanager
def held_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[Held]:
    """The model held until the gate opens (opened on exit, whatever happened)."""
    held = Held()
    monkeypatch.setattr(LoadedModel, "upload", held.upload(LoadedModel.upload))
    try:
        yield held
    finally:
        held.gate.set()


def marked(value: float) -> npt.NDArray[np.float32]:
    """One digits row whose every pixel is ``value`` (test images hold whole numbers only)."""
    return np.full((1, 64), value, np.float32)


def one_at_a_time(settings: Settings, **batching: Any) -> Settings:
    """Runs of one batch: the order batches run in is the batcher's order."""
    return changed(settings, "batching", max_batches_per_run=1, **batching)


@pytest.fixture
def single(repo_dir: Path) -> ModelRepository:
    """The models, digits in batches of one request."""
    config = repo_dir / "digits" / "config.toml"
    config.write_text(config.read_text().replace("max_batch_size = 64", "max_batch_size = 1"))
    return ModelRepository.load(repo_dir)


async def publish(settings: Settings, requests: Sequence[Sent]) -> None:
    """Publish digits requests (id, pixel value, ``priority`` header or None), in order."""
    kafka = settings.kafka
    await ensure_topics(kafka, [kafka.requests_topic, kafka.replies_topic])
    producer = make_producer(kafka, linger_ms=0)
    await producer.start()
    try:
        for rid, value, priority in requests:
            tensor = Tensor.from_numpy("pixels", marked(value))
            headers = [("priority", priority)] if priority is not None else []
            request = encode_request(InferenceRequest(rid, "digits", [tensor]))
            await producer.send_and_wait(  # one partition: fetched in the order sent
                kafka.requests_topic, request, headers=headers, partition=0
            )
    finally:
        await producer.stop()


async def test_a_kafka_backlog_leaves_calls_room_and_calls_run_before_it(
    settings: Settings, single: ModelRepository, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Records fill all they may; a REST and a gRPC call are queued (not refused) and run next."""
    settings = changed(
        one_at_a_time(with_endpoints(settings)), "runtime", max_in_flight=40,
        reserved_for_calls=0.5,
    )  # fmt: skip
    backlog: list[Sent] = [(f"k-{i}", float(i % 16), None) for i in range(60)]
    with held_model(monkeypatch) as held:
        async with serving(settings, single) as worker, reply_reader(settings) as replies:
            assert worker.rest_port is not None
            assert worker.grpc_port is not None
            await publish(settings, backlog)
            await wait_for(lambda: worker.in_flight == 20 and len(held.order) == 1,
                           timeout=30, what="records holding all but the reserve")  # fmt: skip
            body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                                "data": [20.5] * 64}]}  # fmt: skip
            call = asyncio.create_task(rest(worker.rest_port, INFER, body))
            async with stub(worker.grpc_port) as service:
                grpc_call = asyncio.ensure_future(
                    service.ModelInfer(infer_message(marked(21.5), "g"), timeout=60)
                )
                await wait_for(lambda: worker.direct_in_flight == 2, timeout=30,
                               what="both calls queued")  # fmt: skip
                still_records = worker.in_flight
                held.gate.set()
                status, answer = await call
                grpc_answer = await grpc_call
            await wait_for(lambda: len(replies) >= len(backlog), timeout=60, what="the backlog")
    assert still_records == 20, "records never took the calls' reserve"
    assert status == 200, answer
    assert grpc_answer.model_name == "digits"
    assert sorted(held.order[1:3]) == [20.5, 21.5], f"calls ran after {held.order[:4]}"
    ids = {decode_response(r.value).id for r in replies}
    assert ids == {rid for rid, _, _ in backlog}, "the backlog is answered, nothing lost"


async def test_kafka_records_choose_their_class_by_header_and_a_bad_value_is_refused(
    settings: Settings, single: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held model: high, then normal, then low run, whatever order they came in; 'urgent' is 400."""
    settings = one_at_a_time(settings, priority_aging_ms=600_000)
    first: list[Sent] = [("blocker", 15.0, None)]
    queued: list[Sent] = [(f"low-{i}", 1.0 + i, b"low") for i in range(3)]
    queued += [(f"normal-{i}", 4.0 + i, None) for i in range(3)]
    queued += [(f"high-{i}", 7.0 + i, b"1") for i in range(3)]
    bad: list[Sent] = [("bad", 12.0, b"urgent")]
    with held_model(monkeypatch) as held:
        async with running_with_replies(settings, single) as (_, replies):
            await publish(settings, first)
            await wait_for(lambda: len(held.order) == 1, timeout=30, what="the held batch")
            await publish(settings, queued + bad)
            # The refusal came last on the one partition: everything before it is queued.
            await wait_for(lambda: len(replies) == 1, timeout=30, what="the refusal")
            refusal = decode_response(replies[0].value)
            held.gate.set()
            await wait_for(lambda: len(replies) == 2 + len(queued), timeout=60, what="answers")
    assert refusal.id == "bad"
    assert refusal.error is not None
    assert refusal.error.code == "INVALID_ARGUMENT"
    assert "high, normal, low" in refusal.error.message
    assert held.order == [15.0, 7.0, 8.0, 9.0, 4.0, 5.0, 6.0, 1.0, 2.0, 3.0]


async def test_with_no_aging_the_classes_run_in_arrival_order(
    settings: Settings, single: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """priority_aging_ms 0: a low record that came first runs before a high one (aging)."""
    settings = one_at_a_time(settings, priority_aging_ms=0)
    queued: list[Sent] = [("low", 1.0, b"low"), ("high", 2.0, b"high"), ("normal", 3.0, b"normal")]
    with held_model(monkeypatch) as held:
        async with running_with_replies(settings, single) as (worker, replies):
            await publish(settings, [("blocker", 15.0, None)])
            await wait_for(lambda: len(held.order) == 1, timeout=30, what="the held batch")
            await publish(settings, queued)
            await wait_for(lambda: worker.in_flight == 4, timeout=30, what="every record queued")
            held.gate.set()
            await wait_for(lambda: len(replies) == 4, timeout=60, what="answers")
    assert held.order == [15.0, 1.0, 2.0, 3.0]


async def test_rest_and_grpc_choose_a_class_by_parameter_and_bad_values_are_refused(
    settings: Settings, repository: ModelRepository
) -> None:
    """V2 ``priority`` parameter: 'low' and 3 are served; 'urgent' is 400 / INVALID_ARGUMENT."""
    async with serving(with_endpoints(settings), repository) as worker:
        assert worker.rest_port is not None
        assert worker.grpc_port is not None
        base = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                            "data": [1.0] * 64}]}  # fmt: skip
        low = await rest(worker.rest_port, INFER, {**base, "parameters": {"priority": "low"}})
        bad = await rest(worker.rest_port, INFER, {**base, "parameters": {"priority": "urgent"}})
        nested = await rest(worker.rest_port, INFER, {**base, "parameters": {"priority": 9}})
        async with stub(worker.grpc_port) as service:
            message = infer_message(marked(1.0), "g")
            message.parameters["priority"].uint64_param = 3
            served = await service.ModelInfer(message)
            message.parameters["priority"].string_param = "urgent"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await service.ModelInfer(message)
    assert low[0] == 200, low
    assert bad[0] == 400
    assert "high, normal, low" in bad[1]["error"]
    assert nested[0] == 400
    assert served.model_name == "digits"
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@contextlib.asynccontextmanager
async def running_with_replies(
    settings: Settings, repository: ModelRepository
) -> AsyncIterator[tuple[Worker, list[Reply]]]:
    """A worker and a reader of its reply topic."""
    async with running_worker(settings, repository) as worker, reply_reader(settings) as replies:
        yield worker, replies


async def test_a_call_cuts_a_run_under_way_short_and_runs_next(
    settings: Settings, single: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs of 8 batches: a call arriving while one is held runs right after its first batch."""
    settings = with_endpoints(settings)
    backlog: list[Sent] = [(f"k-{i}", float(i % 16), None) for i in range(30)]
    await publish(settings, backlog)  # waiting before the worker starts: its first run is full
    with held_model(monkeypatch) as held:
        async with serving(settings, single) as worker, reply_reader(settings) as replies:
            assert worker.rest_port is not None
            await wait_for(lambda: worker.in_flight == 30 and len(held.order) == 1,
                           timeout=30, what="a run of batches held")  # fmt: skip
            body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                                "data": [20.5] * 64}]}  # fmt: skip
            call = asyncio.create_task(rest(worker.rest_port, INFER, body))
            await wait_for(lambda: worker.direct_in_flight == 1, timeout=30, what="the call")
            held.gate.set()
            status, _ = await call
            await wait_for(lambda: len(replies) >= len(backlog), timeout=60, what="the backlog")
    assert status == 200
    assert held.order[1] == 20.5, f"the call ran after {held.order[:10]}"
    assert sorted(held.order) == sorted([v for _, v, _ in backlog] + [20.5]), "each ran once"
