"""Driving load through Kafka, closed or open loop, and collecting the replies.

Closed loop: a fixed number of requests awaiting replies; open loop: a fixed rate. Replies are
matched by :class:`~worker.correlation.ReplyMatcher`.

Replies are kept raw while the clock runs and decoded after it stops: decoding would take CPU
from the worker being measured on the same machine. Every request's send and first-reply
times are kept (:attr:`Load.timeline`), so that a run can be cut into windows afterwards
(:mod:`worker.bench.rebalance`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import statistics
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from aiokafka import AIOKafkaProducer

from worker.bench.corpus import paragraphs
from worker.bench.cpu import per_request, snapshot
from worker.bench.targets import input_of
from worker.codec import decode_response, encode_request
from worker.correlation import Arrival, ReplyMatcher
from worker.domain import InferenceRequest, Tensor
from worker.errors import DecodeError, WorkerError
from worker.kafka import assign_all, make_consumer, make_producer
from worker.settings import KafkaSettings

__all__ = [
    "BenchResult",
    "Load",
    "bench_texts",
    "drive",
    "numeric_rows",
    "open_loop",
    "request_stream",
    "text_tokens",
]


@dataclass
class BenchResult:
    """What one load run measured."""

    label: str
    mode: str
    requests: int
    seconds: float
    errors: int
    latencies_ms: list[float] = field(repr=False)
    batch_sizes: list[int] = field(repr=False)
    compute_ms: list[float] = field(repr=False)
    queue_ms: list[float] = field(repr=False, default_factory=list)
    """Per reply: decode to the start of its batch's forward pass, inside the worker."""
    responses: int = 0
    """Replies that decode as inference responses (the echo loop sends back requests)."""
    tokens: int = 0
    """Text models: tokens in the requests sent (as the model's tokenizer counts them)."""
    padding_efficiency: float | None = None
    """Text models: real / padded tokens in the worker's batches (from its metrics)."""
    cpu_us: dict[str, float] = field(default_factory=dict)
    """CPU microseconds per request while the clock ran, by party (:mod:`worker.bench.cpu`)."""

    @property
    def throughput(self) -> float:
        """Requests per second, first send to last reply."""
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """Latency percentile in milliseconds."""
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else 0.0

    def summary(self) -> dict[str, Any]:
        """The figures, JSON-ready."""
        return {
            "label": self.label,
            "mode": self.mode,
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "requests_per_s": round(self.throughput, 1),
            "p50_ms": round(self.percentile(50), 2),
            "p95_ms": round(self.percentile(95), 2),
            "p99_ms": round(self.percentile(99), 2),
            "max_ms": round(max(self.latencies_ms, default=0.0), 2),
            "mean_batch": round(statistics.fmean(self.batch_sizes), 2)
            if self.batch_sizes
            else None,
            "max_batch": max(self.batch_sizes, default=None),
            "mean_compute_ms": round(statistics.fmean(self.compute_ms), 3)
            if self.compute_ms
            else None,
            "p99_compute_ms": _p99(self.compute_ms),
            "p50_queue_ms": round(float(np.percentile(self.queue_ms, 50)), 2)
            if self.queue_ms
            else None,
            "p99_queue_ms": _p99(self.queue_ms),
            "errors": self.errors,
            "responses": self.responses,
            "tokens_per_s": round(self.tokens / self.seconds, 1) if self.tokens else None,
            "padding_efficiency": None
            if self.padding_efficiency is None
            else round(self.padding_efficiency, 3),
            "cpu_us_per_request": self.cpu_us or None,
        }


def _p99(values: list[float]) -> float | None:
    return round(float(np.percentile(values, 99)), 2) if values else None


class Load:
    """Sends requests and collects their replies with arrival times.

    ``count_copies``: count every reply record by correlation id (:attr:`copies`), duplicates
    included (the matcher hands a waiter only the first), and note when each duplicate came
    (:attr:`repeats`).
    """

    def __init__(self, kafka: KafkaSettings, *, count_copies: bool = False) -> None:
        self.kafka = kafka
        self.matcher = ReplyMatcher()
        self.latencies: list[float] = []
        self.values: list[bytes | None] = []
        """Reply values, decoded after the clock stops."""
        self.timeline: list[tuple[str, float, float]] = []
        """Per answered request: id, sent and first reply received (``perf_counter``)."""
        self.copies: Counter[str] | None = Counter() if count_copies else None
        self.repeats: list[tuple[str, float]] = []
        """Per reply beyond an id's first (``count_copies``): the id and when it was read."""
        self.replied = asyncio.Event()
        self.consumer: Any = None
        """The reply topic's reader while :meth:`clients` is open (all partitions assigned)."""

    @contextlib.asynccontextmanager
    async def clients(self) -> AsyncIterator[AIOKafkaProducer]:
        """A producer for the requests while replies are read (from the reply topic's end)."""
        producer = make_producer(self.kafka, linger_ms=5)
        consumer = make_consumer(self.kafka, group_id=None, auto_offset_reset="latest")
        self.consumer = consumer
        await producer.start()
        await consumer.start()
        try:
            topic = self.kafka.replies_topic
            partitions = await producer.partitions_for(topic)
            await assign_all(consumer, topic, partitions, from_end=True)
            async with asyncio.TaskGroup() as group:
                reader = group.create_task(self._read(consumer))
                try:
                    yield producer
                finally:
                    reader.cancel()
                    self.matcher.cancel_all()
        finally:
            await consumer.stop()
            await producer.stop()

    async def _read(self, consumer: Any) -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=100)
            for records in batches.values():
                self.matcher.deliver((r.value, r.headers) for r in records)
                if self.copies is not None:
                    self._count(records)
            if batches:
                self.replied.set()

    def _count(self, records: list[Any]) -> None:
        assert self.copies is not None
        now = time.perf_counter()
        for record in records:
            for key, value in record.headers:
                if key == "correlation_id":
                    rid = value.decode(errors="replace")
                    self.copies[rid] += 1
                    if self.copies[rid] > 1:
                        self.repeats.append((rid, now))

    def expect(self, rid: str) -> None:
        """Wait for ``rid``'s reply from now on: call it just before sending the request."""
        sent = time.perf_counter()

        def arrived(future: asyncio.Future[Arrival]) -> None:
            if not future.cancelled():
                arrival = future.result()
                self.latencies.append((arrival.received - sent) * 1000)
                self.values.append(arrival.value)
                self.timeline.append((rid, sent, arrival.received))

        self.matcher.expect(rid).add_done_callback(arrived)

    def result(
        self,
        label: str,
        mode: str,
        requests: int,
        seconds: float,
        *,
        picks: list[int] | None = None,
    ) -> BenchResult:
        """Decode the replies (errors, batch sizes, compute and queue times) into a result.

        ``picks``: only these replies (indices in arrival order, as in :attr:`timeline`).
        """
        if picks is None:
            out = BenchResult(label, mode, requests, seconds, 0, self.latencies, [], [])
            values = self.values
        else:
            latencies = [self.latencies[i] for i in picks]
            out = BenchResult(label, mode, requests, seconds, 0, latencies, [], [])
            values = [self.values[i] for i in picks]
        for value in values:
            try:
                reply = decode_response(value or b"")
            except DecodeError:
                continue  # the echo worker returns the request itself
            out.responses += 1
            if reply.error is not None:
                out.errors += 1
            if reply.timing is not None:
                out.batch_sizes.append(reply.timing.batch_size)
                out.compute_ms.append(reply.timing.compute_us / 1000)
                out.queue_ms.append(reply.timing.queue_us / 1000)
        return out


TEXT_POOL = 1500
"""Distinct corpus paragraphs a text-model run cycles through."""


def text_tokens(texts: list[str]) -> int:
    """Tokens MiniLM's tokenizer step makes of ``texts`` (the worker's own, as configured)."""
    from worker.bench.targets import PROJECT_MODELS  # noqa: PLC0415
    from worker.model_config import ModelConfig  # noqa: PLC0415
    from worker.text import TextEncoder  # noqa: PLC0415

    folder = PROJECT_MODELS / "minilm"
    step = ModelConfig.load(folder).tokenizer
    assert step is not None
    encoder = TextEncoder(folder / "1" / step.file, max_length=step.max_length, feeds=step.feeds)
    strings = np.array([t.encode() for t in texts], dtype=object)
    tokenized = encoder.encode("text", strings)
    return sum(tokenized.lengths)


def bench_texts(count: int) -> list[str]:
    """``count`` corpus paragraphs (cycling through :data:`TEXT_POOL` distinct ones)."""
    pool = paragraphs(TEXT_POOL, seed=1)
    return [pool[i % len(pool)] for i in range(count)]


def _requests(model: str, count: int, rows: int, label: str) -> list[tuple[str, bytes]]:
    """Encoded requests with unique ids (built before the clock starts)."""
    return list(itertools.islice(request_stream(model, rows, label), count))


def request_stream(model: str, rows: int, label: str) -> Iterator[tuple[str, bytes]]:
    """Encoded requests ``label-0``, ``label-1``, ... without end, encoded as they are taken.

    Numeric models cycle through :func:`numeric_rows`' 64 inputs; text models through the
    corpus (as :func:`bench_texts`).
    """
    name, _ = input_of(model)
    pool = paragraphs(TEXT_POOL, seed=1) if model == "minilm" else []
    arrays = [] if model == "minilm" else numeric_rows(model, 64, rows)

    def tensor(i: int) -> Tensor:
        if model == "minilm":
            texts = [pool[(i * rows + j) % len(pool)] for j in range(rows)]
            return Tensor.from_strings(name, texts)
        return Tensor.from_numpy(name, arrays[i % len(arrays)])

    for i in itertools.count():
        rid = f"{label}-{i}"
        yield rid, encode_request(InferenceRequest(rid, model, [tensor(i)]))


def numeric_rows(model: str, count: int, rows: int) -> list[npt.NDArray[np.float32]]:
    """The inputs of ``count`` requests of a numeric model (64 distinct, seeded), any transport."""
    rng = np.random.default_rng(1)
    _, width = input_of(model)
    pool = [rng.integers(0, 17, (rows, width)).astype(np.float32) for _ in range(64)]
    return [pool[i % len(pool)] for i in range(count)]


async def drive(
    kafka: KafkaSettings, *, label: str, mode: str, model: str, requests: int, rows: int,
    concurrency: int, rate: float, timeout: float, progress: Any = None,
) -> BenchResult:  # fmt: skip
    """Send the load and wait for every reply; raises WorkerError if replies are missing."""
    load = Load(kafka)
    payloads = _requests(model, requests, rows, f"{label}-{uuid.uuid4().hex[:6]}")
    warmup = _requests(model, 1, rows, f"warmup-{uuid.uuid4().hex[:6]}")[0]
    async with load.clients() as producer:

        async def send(rid: str, value: bytes) -> None:
            load.expect(rid)
            await producer.send(
                kafka.requests_topic, value, headers=[("correlation_id", rid.encode())]
            )

        # One request first: waits out a worker that is still starting, off the clock.
        await send(*warmup)
        await _until(lambda: not load.matcher, timeout, "the warm-up reply")
        load.latencies.clear()
        load.values.clear()
        cpu_before = snapshot()
        started = time.perf_counter()
        if mode == "open":

            async def paced(rid: str, value: bytes) -> None:
                await send(rid, value)
                if progress:
                    progress(len(load.latencies))

            await open_loop(payloads, rate, paced)
        else:
            for rid, value in payloads:
                while len(load.matcher) >= concurrency:
                    load.replied.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await load.replied.wait()
                await send(rid, value)
                if progress:
                    progress(len(load.latencies))

        def done() -> bool:
            if progress:
                progress(len(load.latencies))
            return len(load.latencies) >= requests

        await _until(done, timeout, f"{requests} replies")
        seconds = time.perf_counter() - started
        cpu_used = per_request(cpu_before, snapshot(), requests)
    result = load.result(label, mode, requests, seconds)
    result.cpu_us = cpu_used
    if model == "minilm":
        result.tokens = text_tokens(bench_texts(requests * rows))
    return result


async def open_loop(
    payloads: Iterable[tuple[str, bytes]],
    rate: float,
    send: Callable[[str, bytes], Awaitable[None]],
    *,
    stop: asyncio.Event | None = None,
) -> None:
    """Send ``payloads`` at ``rate`` per second (in ticks of 10 ms) until they or ``stop`` end.

    The schedule is fixed from the first send: a sender that fell behind catches up at once
    rather than shifting later requests, so the load does not ease when replies slow down.
    """
    interval = 0.01
    per_tick = rate * interval
    due = 0.0
    started = time.perf_counter()
    for i, (rid, value) in enumerate(payloads):
        while i >= due:
            await asyncio.sleep(max(0.0, started + (due / per_tick) * interval
                                    - time.perf_counter()))  # fmt: skip
            due += per_tick
        if stop is not None and stop.is_set():
            return
        await send(rid, value)


async def _until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise WorkerError(f"bench: timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.02)
