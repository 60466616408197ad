"""The benchmark's references: plain aiokafka loops the worker is compared with.

Both use the worker's safety settings (group consumer without auto-commit, acks=all
idempotent producer, commits after the acks) and send a fetch's replies pipelined, then await
their acks together:

- ``python -m worker echo`` (:func:`run_echo`) publishes every request value unchanged to the
  reply topic, keeping key and headers: no decoding, no model. The transport limit.
- ``python -m worker plain`` (:func:`run_plain`) is what a hand-written loop does: decode each
  request, run the model on it alone (batch size 1, on the event loop), encode the reply.
  The fixed cost per batch of everything else the worker does shows against it at
  ``max_batch_size = 1``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition

from worker.codec import decode_request, encode_response
from worker.domain import InferenceResponse, Tensor
from worker.forward import stack_inputs
from worker.headers import header
from worker.kafka import ensure_topics, make_consumer, make_producer
from worker.repository import ModelRepository
from worker.settings import Settings

__all__ = ["run_echo", "run_plain"]


Answer = Callable[[ConsumerRecord[bytes, bytes]], tuple[bytes | None, list[tuple[str, bytes]]]]
"""What a reference makes of one request record: the reply's value and headers."""


async def run_echo(settings: Settings, stop: asyncio.Event) -> None:
    """Echo requests to replies until ``stop`` is set."""
    await _loop(settings, stop, lambda r: (r.value, list(r.headers)))


async def run_plain(settings: Settings, stop: asyncio.Event) -> None:
    """Serve requests one at a time (batch size 1) in a plain loop until ``stop`` is set."""
    import torch  # noqa: PLC0415 - only this reference needs it

    torch.set_num_threads(settings.models.threads)
    repository = await asyncio.to_thread(ModelRepository.load, settings.models.repository)

    def answer(r: ConsumerRecord[bytes, bytes]) -> tuple[bytes | None, list[tuple[str, bytes]]]:
        request = decode_request(r.value)
        model = repository.route(request.model_name, None, request.id).primary
        outputs = model.predict(stack_inputs(model, [model.validate(request)]))
        response = InferenceResponse(
            request.id, model.name, model.version,
            [Tensor.from_numpy(name, value) for name, value in outputs.items()],
        )  # fmt: skip
        cid = header(r.headers, "correlation_id") or request.id.encode()
        return encode_response(response), [("correlation_id", cid)]

    await _loop(settings, stop, answer)


async def _loop(settings: Settings, stop: asyncio.Event, answer: Answer) -> None:
    """Consume requests, publish ``answer`` of each (pipelined), commit after the acks."""
    kafka = settings.kafka
    await ensure_topics(kafka, [kafka.requests_topic, kafka.replies_topic])
    consumer = make_consumer(kafka, group_instance_id=None)  # never a worker's static id
    producer = make_producer(kafka)
    await producer.start()
    consumer.subscribe([kafka.requests_topic])
    await consumer.start()
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=kafka.fetch_max_records)
            futures: list[asyncio.Future[Any]] = []
            positions: dict[TopicPartition, int] = {}
            for tp, records in batches.items():
                for r in records:
                    value, headers = answer(r)
                    futures.append(
                        await producer.send(kafka.replies_topic, value, key=r.key, headers=headers)
                    )
                positions[tp] = records[-1].offset + 1
            if futures:
                await asyncio.gather(*futures)
                await consumer.commit(positions)
    finally:
        await consumer.stop()
        await producer.stop()
