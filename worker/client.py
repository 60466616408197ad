"""An asyncio request/reply client for the worker.

    async with InferenceClient(settings.kafka) as client:
        reply = await client.infer("digits", {"pixels": pixels}, timeout=10)
        labels = reply.output("label")

Each request gets a fresh correlation id; the client reads every partition of its reply topic
(without a consumer group, from the end as it was when the client started) and hands each
caller the reply carrying its id (:class:`~worker.correlation.ReplyMatcher`). Replies for other
clients sharing the topic are skipped.

On a fresh broker the topics appear only when the first worker starts (it creates them):
``wait_for_topics`` seconds lets a client started beside a worker wait for them instead of
failing at once (``predict`` and ``demo`` wait as long as their ``--timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import numpy.typing as npt
import structlog
from aiokafka import TopicPartition

from worker.codec import decode_response, encode_request
from worker.correlation import Arrival, ReplyMatcher
from worker.domain import InferenceRequest, InferenceResponse, Tensor
from worker.errors import ConfigError, DecodeError, ReplyTimeoutError, detached
from worker.kafka import assign_all, check_connection, make_consumer, make_producer
from worker.settings import KafkaSettings

__all__ = ["InferenceClient"]

log = structlog.get_logger(__name__)
_TOPIC_POLL_S = 0.5


class InferenceClient:
    """Publishes inference requests and awaits their replies (an async context manager)."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        reply_topic: str | None = None,
        timeout: float = 30.0,
        wait_for_topics: float = 0.0,
    ) -> None:
        self._settings = settings
        self.reply_topic = reply_topic or settings.replies_topic
        self.timeout = timeout
        self.wait_for_topics = wait_for_topics
        self._producer = make_producer(settings)
        self._consumer = make_consumer(
            settings, group_id=None, auto_offset_reset="latest", client_id=settings.client_id
        )
        self._matcher = ReplyMatcher()
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as stack:
            # Registered before start: clients that fail to start are still closed.
            stack.push_async_callback(self._consumer.stop)
            stack.push_async_callback(self._producer.stop)
            await check_connection(self._settings)  # a wrong password or CA: ConnectError now
            await self._producer.start()
            await self._consumer.start()
            await self._assign_reply_partitions()
            group = await stack.enter_async_context(asyncio.TaskGroup())
            reader = group.create_task(self._read_replies())
            stack.callback(reader.cancel)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()
        self._matcher.cancel_all()

    async def _assign_reply_partitions(self) -> None:
        await self._topics_exist()
        partitions = await self._producer.partitions_for(self.reply_topic)
        # A topic created a moment ago may not have its leaders ready yet: end_offsets waits
        # for them quietly, where the fetcher's position lookup logs an error per partition.
        await self._consumer.end_offsets([TopicPartition(self.reply_topic, p) for p in partitions])
        await assign_all(self._consumer, self.reply_topic, partitions, from_end=True)

    async def _topics_exist(self) -> None:
        """Return once the requests and reply topics exist; wait up to ``wait_for_topics``."""
        wanted = {self._settings.requests_topic, self.reply_topic}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_for_topics
        announced = False
        while missing := sorted(wanted - await self._consumer.topics()):
            if loop.time() >= deadline:
                waited = f" after waiting {self.wait_for_topics:.0f}s" if announced else ""
                raise ConfigError(
                    f"topic(s) {', '.join(map(repr, missing))} do not exist on "
                    f"{self._settings.bootstrap_servers}{waited}; start a worker (it creates "
                    "its topics) or create them"
                )
            if not announced:
                log.info(
                    "waiting for topics; a worker creates them when it starts",
                    topics=missing,
                    bootstrap_servers=self._settings.bootstrap_servers,
                    timeout_s=self.wait_for_topics,
                )
                announced = True
            await asyncio.sleep(min(_TOPIC_POLL_S, max(0.0, deadline - loop.time())))

    async def _read_replies(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=500)
            for records in batches.values():
                self._matcher.deliver((r.value, r.headers) for r in records)

    async def send(
        self,
        request: InferenceRequest,
        *,
        headers: Sequence[tuple[str, bytes]] = (),
        key: bytes | None = None,
    ) -> asyncio.Future[InferenceResponse]:
        """Publish ``request`` (acknowledged); return a future that gets its decoded reply.

        A reply that carries the request's id but is not a decodable response sets
        :class:`~worker.errors.DecodeError` on the future.
        """
        arrival = self._matcher.expect(request.id)
        fut: asyncio.Future[InferenceResponse] = asyncio.get_running_loop().create_future()
        arrival.add_done_callback(lambda a: _decode_into(a, fut))
        all_headers = [("reply_to", self.reply_topic.encode()), *headers]
        try:
            await self._producer.send_and_wait(
                self._settings.requests_topic,
                encode_request(request),
                key=key if key is not None else request.id.encode(),
                headers=all_headers,
            )
        except BaseException:
            self._matcher.forget(request.id)
            arrival.cancel()
            raise
        return fut

    async def infer(
        self,
        model_name: str,
        inputs: Mapping[str, npt.ArrayLike] | Sequence[Tensor],
        *,
        version: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
        parameters: dict[str, Any] | None = None,
    ) -> InferenceResponse:
        """Send one request and wait for its reply (which may be an error reply).

        Raises :class:`~worker.errors.ReplyTimeoutError` if no reply comes within ``timeout``
        seconds (default: the client's). Call ``raise_for_error()`` on the reply, or read
        outputs with ``reply.output(name)``, which raises on an error reply.
        """
        tensors = (
            [Tensor.from_numpy(name, value) for name, value in inputs.items()]
            if isinstance(inputs, Mapping)
            else list(inputs)
        )
        request = InferenceRequest(
            id=request_id or str(uuid.uuid4()),
            model_name=model_name,
            model_version=version,
            inputs=tensors,
            parameters=parameters,
        )
        fut = await self.send(request, headers=headers)
        wait = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(wait):
                return await fut
        except TimeoutError:
            raise ReplyTimeoutError(
                f"no reply to request {request.id} for model {model_name!r} within {wait:.1f}s "
                f"(requests topic {self._settings.requests_topic!r}, reply topic "
                f"{self.reply_topic!r}); is a worker running?"
            ) from None
        finally:
            self._matcher.forget(request.id)


def _decode_into(
    arrival: asyncio.Future[Arrival], reply: asyncio.Future[InferenceResponse]
) -> None:
    if reply.done():
        return
    if arrival.cancelled():
        reply.cancel()
        return
    try:
        reply.set_result(decode_response(arrival.result().value or b""))
    except DecodeError as exc:
        reply.set_exception(detached(exc))  # not in a cycle with the reply and its bytes
