"""``python -m worker bench --interactive``: REST and gRPC calls beside a Kafka backlog.

What issue #27 asks of priority classes, measured the way a user meets it. Per turn, on fresh
topics, ``--backlog`` mlp requests (60,000 by default) are published before the worker starts,
so it begins with all of them waiting in Kafka; then

- ``quiet``: the worker (REST and gRPC on, as in the other leg) drains the backlog alone;
- ``calls``: the same, while REST and gRPC calls come at ``--rate`` per second each (50 by
  default, open loop); once the backlog is drained, the same calls for ``--idle-s`` seconds
  against the idle worker.

Two turns, interleaved (the machine's drift falls on both legs). Reported: the backlog's
throughput in each leg (first reply to last) and their ratio, calls refused (429 or
RESOURCE_EXHAUSTED: the target is none), the calls' p50/p99 under the backlog and idle, and the
batch time (median compute of full batches), against the target "p99 under the backlog within
3 batch times of the idle p99".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from worker.bench.endpoints import Call, open_call
from worker.bench.load import request_stream
from worker.bench.targets import (
    bench_repository,
    bench_topics,
    delete_bench_topics,
    free_port,
    spawned,
)
from worker.codec import decode_response
from worker.errors import DecodeError, WorkerError
from worker.kafka import assign_all, ensure_topics, make_consumer, make_producer
from worker.settings import KafkaSettings, Settings

__all__ = ["interactive", "interactive_arguments", "run_interactive"]

MODEL = "mlp"


class Replies:
    """Counts the reply topic's records from its start; notes the first and last arrival."""

    def __init__(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.full_batch_ms: list[float] = []
        self._batch = 0

    async def read(
        self, kafka: KafkaSettings, partitions: set[int], batch: int, stop: asyncio.Event
    ) -> None:
        """Read ``partitions`` until ``stop``; ``batch``: the full batch size timed."""
        self._batch = batch
        consumer = make_consumer(kafka, group_id=None, auto_offset_reset="earliest")
        await consumer.start()
        try:
            await assign_all(consumer, kafka.replies_topic, partitions, from_end=False)
            while not stop.is_set():
                fetched = await consumer.getmany(timeout_ms=100)
                now = time.perf_counter()
                for records in fetched.values():
                    for record in records:
                        self._note(record.value, now)
        finally:
            await consumer.stop()

    def _note(self, value: bytes | None, now: float) -> None:
        if not self.count:
            self.first = now
        self.count += 1
        self.last = now
        try:
            timing = decode_response(value or b"").timing
        except DecodeError:
            return
        if timing is not None and timing.batch_size == self._batch:
            self.full_batch_ms.append(timing.compute_us / 1000)


async def _publish(kafka: KafkaSettings, count: int, label: str) -> set[int]:
    """``count`` mlp requests on the requests topic, all acknowledged; the reply partitions."""
    producer = make_producer(kafka, linger_ms=20)
    await producer.start()
    try:
        futures = []
        stream = request_stream(MODEL, 1, label)
        for _ in range(count):
            rid, value = next(stream)
            futures.append(await producer.send(kafka.requests_topic, value, key=rid.encode()))
        await asyncio.gather(*futures)
        return set(await producer.partitions_for(kafka.replies_topic))
    finally:
        await producer.stop()


class Calls:
    """Open-loop calls over one transport; each call's latency and whether it was refused."""

    def __init__(self, call: Call) -> None:
        self._call = call
        self.latencies_ms: list[float] = []
        self.refused = 0
        self.errors = 0
        self.queue_ms: list[float] = []
        """Inside the worker: admission to the start of the call's batch."""

    async def at(self, rate: float, stop: asyncio.Event) -> None:
        """``rate`` calls per second until ``stop``; every call answered before returning."""
        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            i = 0
            while not stop.is_set():
                group.create_task(self._one(i))
                i += 1
                with contextlib.suppress(TimeoutError):
                    delay = max(0.0, started + i / rate - time.perf_counter())
                    await asyncio.wait_for(stop.wait(), delay)

    async def _one(self, i: int) -> None:
        sent = time.perf_counter()
        answer = await self._call(i)
        self.latencies_ms.append((time.perf_counter() - sent) * 1000)
        if "queue_us" in answer:
            self.queue_ms.append(int(answer["queue_us"]) / 1000)
        code = str(answer.get("error_code", ""))
        if code in ("429", "RESOURCE_EXHAUSTED"):
            self.refused += 1
        elif code:
            self.errors += 1

    def summary(self) -> dict[str, Any]:
        """The figures, JSON-ready."""
        values = self.latencies_ms or [0.0]
        return {
            "calls": len(self.latencies_ms),
            "refused": self.refused,
            "errors": self.errors,
            "p50_ms": round(float(np.percentile(values, 50)), 2),
            "p99_ms": round(float(np.percentile(values, 99)), 2),
            "p50_queue_ms": round(float(np.percentile(self.queue_ms or [0.0], 50)), 2),
            "p99_queue_ms": round(float(np.percentile(self.queue_ms or [0.0], 99)), 2),
        }


@contextlib.asynccontextmanager
async def _worker(
    settings: Settings, args: argparse.Namespace, tmp: Path, label: str
) -> AsyncIterator[tuple[KafkaSettings, set[int], int, int]]:
    """A worker with REST and gRPC on, its topics already holding the backlog."""
    repo = bench_repository(
        tmp / label, max_batch_size=args.max_batch_size, delay_ms=args.max_batch_delay_ms,
        quantize="none", compile_mode="none",
    )  # fmt: skip
    kafka = bench_topics(settings.kafka, "worker")
    try:
        await ensure_topics(kafka, [kafka.requests_topic, kafka.replies_topic])
        partitions = await _publish(kafka, args.backlog, label)
        rest, grpc = free_port(), free_port()
        env = {"WORKER_REST__ENABLED": "true", "WORKER_REST__PORT": str(rest),
               "WORKER_REST__HOST": "127.0.0.1", "WORKER_GRPC__ENABLED": "true",
               "WORKER_GRPC__PORT": str(grpc), "WORKER_GRPC__HOST": "127.0.0.1"}  # fmt: skip
        with spawned("worker", kafka, repo, tmp / f"{label}.log", env_over=env):
            yield kafka, partitions, rest, grpc
    finally:
        await delete_bench_topics(kafka)


async def _leg(
    settings: Settings, args: argparse.Namespace, tmp: Path, label: str, *, calls: bool
) -> dict[str, Any]:
    """One backlog drained, with calls beside it or without; its figures."""
    try:
        return await _measured(settings, args, tmp, label, calls=calls)
    except* WorkerError as failed:
        log = tmp / f"{label}.log"
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
        raise WorkerError(f"{failed.exceptions[0]}; the worker's log ends:\n{tail}") from None


async def _measured(
    settings: Settings, args: argparse.Namespace, tmp: Path, label: str, *, calls: bool
) -> dict[str, Any]:
    async with _worker(settings, args, tmp, label) as (kafka, partitions, rest, grpc):
        replies, stop_reading = Replies(), asyncio.Event()
        drained, idle_over = asyncio.Event(), asyncio.Event()
        out: dict[str, Any] = {"label": label}
        async with asyncio.TaskGroup() as group:
            group.create_task(replies.read(kafka, partitions, args.max_batch_size, stop_reading))
            deadline = time.monotonic() + args.timeout
            if calls:
                async with (
                    open_call("http", rest, MODEL, 1, 4096) as http,
                    open_call("grpc", grpc, MODEL, 1, 4096) as grpc_call,
                ):
                    busy = [Calls(http), Calls(grpc_call)]
                    idle = [Calls(http), Calls(grpc_call)]
                    async with asyncio.TaskGroup() as callers:
                        for caller in busy:
                            callers.create_task(caller.at(args.rate, drained))
                        await _until(lambda: replies.count >= args.backlog, deadline, label)
                        drained.set()
                    async with asyncio.TaskGroup() as callers:
                        for caller in idle:
                            callers.create_task(caller.at(args.rate, idle_over))
                        await asyncio.sleep(args.idle_s)  # the idle leg's length, not a wait
                        idle_over.set()
                for name, busy_calls, idle_calls in zip(("rest", "grpc"), busy, idle, strict=True):
                    out[f"{name}_backlog"] = busy_calls.summary()
                    out[f"{name}_idle"] = idle_calls.summary()
            else:
                await _until(lambda: replies.count >= args.backlog, deadline, label)
            stop_reading.set()
        seconds = replies.last - replies.first
        out["backlog_per_s"] = round(replies.count / seconds, 1) if seconds else None
        out["batch_ms"] = (
            round(statistics.median(replies.full_batch_ms), 3) if replies.full_batch_ms else None
        )
        return out


async def _until(condition: Any, deadline: float, what: str) -> None:
    while not condition():
        if time.monotonic() > deadline:
            raise WorkerError(f"bench --interactive: {what}: the backlog was not drained in time")
        await asyncio.sleep(0.05)


async def run_interactive(
    settings: Settings, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    """Both legs, ``--turns`` times interleaved; the report (ratios and targets)."""
    legs: list[dict[str, Any]] = []
    for turn in range(1, args.turns + 1):
        legs.append(await _leg(settings, args, tmp, f"quiet-{turn}", calls=False))
        legs.append(await _leg(settings, args, tmp, f"calls-{turn}", calls=True))
    quiet = statistics.fmean(leg["backlog_per_s"] for leg in legs if leg["label"][0] == "q")
    busy = [leg for leg in legs if leg["label"][0] == "c"]
    with_calls = statistics.fmean(leg["backlog_per_s"] for leg in busy)
    batch_ms = statistics.median(leg["batch_ms"] for leg in legs if leg["batch_ms"] is not None)
    targets: dict[str, Any] = {
        "backlog_with_calls_vs_quiet": round(with_calls / quiet, 3),
        "batch_ms": round(batch_ms, 3),
        "refused": sum(leg[f"{t}_backlog"]["refused"] for leg in busy for t in ("rest", "grpc")),
    }
    for transport in ("rest", "grpc"):
        under = max(leg[f"{transport}_backlog"]["p99_ms"] for leg in busy)
        idle = max(leg[f"{transport}_idle"]["p99_ms"] for leg in busy)
        targets[f"{transport}_p99_backlog_ms"] = under
        targets[f"{transport}_p99_idle_ms"] = idle
        targets[f"{transport}_p99_extra_in_batches"] = round((under - idle) / batch_ms, 1)
    return {"legs": legs, "targets": targets, "results": []}


def interactive_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` options of ``--interactive``."""
    parser.add_argument(
        "--interactive", action="store_true",
        help="REST and gRPC calls at --rate each (default 50/s) beside a Kafka backlog of "
        "--backlog mlp requests, against the backlog alone and the calls on an idle worker",
    )  # fmt: skip
    parser.add_argument("--backlog", type=int, default=60_000, help="--interactive: requests")
    parser.add_argument("--idle-s", type=float, default=10.0, help="--interactive: idle calls")
    parser.add_argument("--turns", type=int, default=2, help="--interactive: legs each")


async def interactive(settings: Settings, args: argparse.Namespace, console: Any) -> dict[str, Any]:
    """``--interactive``: calls beside a backlog; the legs and targets, printed and in JSON."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        report = await run_interactive(settings, args, Path(tmp))
    console.print_json(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report
