"""``python -m worker bench``: load a worker through Kafka and report throughput and latency.

Two ways to drive it:

- ``--mode closed`` sends ``--requests`` requests, at most ``--concurrency`` awaiting their
  reply at once (default: all), and measures how long the whole set takes;
- ``--mode open`` sends at a fixed ``--rate`` and measures latency percentiles.

By default the tool starts what it measures itself, on fresh topics of the broker named by
``WORKER_KAFKA__BOOTSTRAP_SERVERS``: ``--target worker`` (the real worker), ``echo`` (a plain
aiokafka loop that copies requests to replies: the transport limit), or ``none`` (a worker
you run yourself on the configured topics). ``--suite`` runs the reference comparisons in one
go (echo, the worker at ``max_batch_size=1`` and at its default, a compute-heavy model against
its own plain-torch throughput, in float and with int8 dynamic quantisation, open loop at half
the measured capacity through the worker and through echo) and prints the ratios.

Models come from a temporary repository: ``digits`` (copied, with ``--max-batch-size``) and
``heavy``, an MLP 256-4096-4096-10 defined here with seeded random weights (no download).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.codec import InferenceRequest, Tensor, decode_response, encode_request
from worker.errors import DecodeError, WorkerError
from worker.kafka import assign_all, ensure_topics, header, make_consumer, make_producer
from worker.settings import KafkaSettings, Settings, env_vars

__all__ = ["BenchResult", "add_arguments", "heavy_model_repository", "run"]

HEAVY_WIDTH = 4096
HEAVY_INPUTS = 256


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
        }


def _p99(values: list[float]) -> float | None:
    return round(float(np.percentile(values, 99)), 2) if values else None


def heavy_model_repository(
    root: Path, *, max_batch_size: int, delay_ms: float, quantize: str = "none"
) -> Path:
    """Write a model repository with ``digits`` (copied) and the compute-heavy ``heavy``.

    ``quantize="int8"`` sets both models' ``quantize`` key (int8 dynamic quantisation).
    """
    import torch  # noqa: PLC0415 - torch is only needed when the tool builds models

    from worker.models import export_model  # noqa: PLC0415

    repo = root / "models"
    shutil.copytree(Path(__file__).resolve().parent.parent / "models" / "digits", repo / "digits",
                    ignore=shutil.ignore_patterns("*.py", "*.json", "*.npz"))  # fmt: skip
    batching = f"\n[batching]\nmax_batch_size = {max_batch_size}\nmax_batch_delay_ms = {delay_ms}\n"
    top = f'quantize = "{quantize}"\n\n'
    config = repo / "digits" / "config.toml"
    text = config.read_text()
    config.write_text(top + text[: text.index("[batching]")] + batching)
    torch.manual_seed(7)
    model = torch.nn.Sequential(
        torch.nn.Linear(HEAVY_INPUTS, HEAVY_WIDTH), torch.nn.ReLU(),
        torch.nn.Linear(HEAVY_WIDTH, HEAVY_WIDTH), torch.nn.ReLU(),
        torch.nn.Linear(HEAVY_WIDTH, 10),
    ).eval()  # fmt: skip
    export_model(model, HEAVY_INPUTS, repo / "heavy" / "1" / "model.pt2")
    (repo / "heavy" / "config.toml").write_text(
        top + f'[[inputs]]\nname = "x"\ndatatype = "FP32"\nshape = [-1, {HEAVY_INPUTS}]\n\n'
        '[[outputs]]\nname = "logits"\ndatatype = "FP32"\nshape = [-1, 10]\n' + batching
    )
    return repo


def plain_torch_throughput(
    repo: Path, model: str, batch: int, threads: int, seconds: float = 3.0
) -> float:
    """Rows per second of the model's own forward pass at ``batch`` rows (the compute limit).

    Runs with ``threads`` intra-op threads: the same number the worker gives torch.
    """
    import torch  # noqa: PLC0415

    from worker.repository import ModelRepository  # noqa: PLC0415

    torch.set_num_threads(threads)
    loaded = ModelRepository.load(repo).resolve(model, None)
    spec = loaded.config.inputs[0]
    inputs = {spec.name: np.random.default_rng(0).random((batch, spec.shape[1]), np.float32)}
    loaded.predict(inputs)
    rows, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        loaded.predict(inputs)
        rows += batch
    return rows / (time.perf_counter() - started)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def spawned(target: str, kafka: KafkaSettings, repo: Path, log: Path) -> Iterator[None]:
    """Run ``python -m worker serve`` (or ``echo``) on the bench's topics while open.

    The child inherits this process's ``WORKER_*`` settings (tune it that way), except the
    Kafka topics and group, the model repository and logging, which the bench sets.
    """
    env = dict(os.environ)
    env |= env_vars(kafka, "kafka")
    env |= {
        "WORKER_MODELS__REPOSITORY": str(repo),
        "WORKER_LOG__LEVEL": "WARNING",
        "WORKER_LOG__FORMAT": "json",
        "WORKER_AUDIT__LOG": "false",
        "WORKER_HTTP__PORT": str(_free_port()),
    }
    command = "serve" if target == "worker" else "echo"
    with log.open("ab") as out:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module, fixed argv
            [sys.executable, "-m", "worker", command], env=env, stderr=out, stdout=out
        )
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


class _Load:
    """Sends requests and matches replies by their ``correlation_id`` header."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka
        self.sent: dict[str, float] = {}
        self.latencies: list[float] = []
        self.batch_sizes: list[int] = []
        self.compute_ms: list[float] = []
        self.queue_ms: list[float] = []
        self.values: list[bytes] = []
        """Reply values, decoded after the clock stops (decoding would take the worker's CPU)."""
        self.errors = 0
        self.replied = asyncio.Event()

    @contextlib.asynccontextmanager
    async def clients(self) -> AsyncIterator[Any]:
        producer = make_producer(self.kafka, linger_ms=5)
        consumer = make_consumer(self.kafka, group_id=None, auto_offset_reset="latest")
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
        finally:
            await consumer.stop()
            await producer.stop()

    async def _read(self, consumer: Any) -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=100)
            now = time.perf_counter()
            for records in batches.values():
                for record in records:
                    cid = header(record.headers, "correlation_id")
                    started = self.sent.pop(cid.decode(), None) if cid else None
                    if started is None:
                        continue
                    self.latencies.append((now - started) * 1000)
                    self.values.append(record.value)
            if batches:
                self.replied.set()

    def inspect_replies(self) -> None:
        """Count errors, batch sizes and compute times of the replies received."""
        for value in self.values:
            self._inspect(value)
        self.values.clear()

    def _inspect(self, value: bytes) -> None:
        try:
            reply = decode_response(value)
        except DecodeError:
            return  # the echo worker returns the request itself
        if reply.error is not None:
            self.errors += 1
        if reply.timing is not None:
            self.batch_sizes.append(reply.timing.batch_size)
            self.compute_ms.append(reply.timing.compute_us / 1000)
            self.queue_ms.append(reply.timing.queue_us / 1000)


def _requests(model: str, count: int, rows: int, label: str) -> list[tuple[str, bytes]]:
    """Encoded requests with unique ids (built before the clock starts)."""
    rng = np.random.default_rng(1)
    width = 64 if model == "digits" else HEAVY_INPUTS
    name = "pixels" if model == "digits" else "x"
    pool = [rng.integers(0, 17, (rows, width)).astype(np.float32) for _ in range(64)]
    out = []
    for i in range(count):
        rid = f"{label}-{i}"
        tensor = Tensor.from_numpy(name, pool[i % len(pool)])
        out.append((rid, encode_request(InferenceRequest(rid, model, [tensor]))))
    return out


async def drive(
    kafka: KafkaSettings, *, label: str, mode: str, model: str, requests: int, rows: int,
    concurrency: int, rate: float, timeout: float, progress: Any = None,
) -> BenchResult:  # fmt: skip
    """Send the load and wait for every reply; raises WorkerError if replies are missing."""
    load = _Load(kafka)
    payloads = _requests(model, requests, rows, f"{label}-{uuid.uuid4().hex[:6]}")
    warmup = _requests(model, 1, rows, f"warmup-{uuid.uuid4().hex[:6]}")[0]
    async with load.clients() as producer:

        async def send(rid: str, value: bytes) -> None:
            load.sent[rid] = time.perf_counter()
            await producer.send(
                kafka.requests_topic, value, headers=[("correlation_id", rid.encode())]
            )

        # One request first: waits out a worker that is still starting, off the clock.
        await send(*warmup)
        await _until(lambda: not load.sent, timeout, "the warm-up reply")
        load.latencies.clear()
        load.values.clear()
        started = time.perf_counter()
        if mode == "open":
            interval = 0.01
            per_tick = rate * interval
            due = 0.0
            for i, (rid, value) in enumerate(payloads):
                while i >= due:
                    await asyncio.sleep(max(0.0, started + (due / per_tick) * interval
                                            - time.perf_counter()))  # fmt: skip
                    due += per_tick
                await send(rid, value)
                if progress:
                    progress(len(load.latencies))
        else:
            for rid, value in payloads:
                while len(load.sent) >= concurrency:
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
    load.inspect_replies()
    return BenchResult(label, mode, requests, seconds, load.errors, load.latencies,
                       load.batch_sizes, load.compute_ms, load.queue_ms)  # fmt: skip


async def _until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise WorkerError(f"bench: timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.02)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` command's options."""
    parser.add_argument("--mode", choices=["closed", "open"], default="closed")
    parser.add_argument("--requests", "-n", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=1000.0, help="open loop: requests/s")
    parser.add_argument("--concurrency", type=int, default=0,
                        help="closed loop: most requests awaiting a reply (0: all)")  # fmt: skip
    parser.add_argument("--model", choices=["digits", "heavy"], default="digits")
    parser.add_argument("--rows", type=int, default=1, help="rows per request (payload size)")
    parser.add_argument("--target", choices=["worker", "echo", "none"], default="worker")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-batch-delay-ms", type=float, default=5.0)
    parser.add_argument("--quantize", choices=["none", "int8"], default="none",
                        help="models' quantize key (int8: dynamic)")  # fmt: skip
    parser.add_argument("--sweep", default="", help="comma-separated max_batch_size values")
    parser.add_argument("--suite", action="store_true", help="run every reference comparison")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")


async def run(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Run what the options ask for; print the table; return the JSON document."""
    from rich.console import Console  # noqa: PLC0415 - the bench extra

    console = Console(stderr=True)
    results: list[BenchResult] = []
    report: dict[str, Any] = {"results": [], "ratios": {}, "limits": {}}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:

        async def one(label: str, target: str, **over: Any) -> BenchResult:
            opts = {**vars(args), **over}
            repo = heavy_model_repository(
                Path(tmp) / label, max_batch_size=opts["max_batch_size"],
                delay_ms=opts["max_batch_delay_ms"], quantize=opts["quantize"],
            )  # fmt: skip
            kafka = _bench_topics(settings.kafka, target)
            await ensure_topics(kafka, [kafka.requests_topic, kafka.replies_topic])
            context = (
                spawned(target, kafka, repo, Path(tmp) / f"{label}.log")
                if target != "none"
                else contextlib.nullcontext()
            )
            with context, _progress(console, label, opts["requests"]) as progress:
                result = await drive(
                    kafka, label=label, mode=opts["mode"], model=opts["model"],
                    requests=opts["requests"], rows=opts["rows"],
                    concurrency=opts["concurrency"] or opts["requests"], rate=opts["rate"],
                    timeout=opts["timeout"], progress=progress,
                )  # fmt: skip
            results.append(result)
            return result

        if args.suite:
            await _suite(args, one, report, Path(tmp), settings.models.threads)
        elif args.sweep:
            for size in [int(s) for s in args.sweep.split(",")]:
                await one(f"batch-{size}", args.target, max_batch_size=size)
        else:
            await one(args.target, args.target)
    report["results"] = [r.summary() for r in results]
    _print_table(console, report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        _plot(results, args.plot, sweep=bool(args.sweep))
    return report


async def _suite(
    args: argparse.Namespace, one: Any, report: dict[str, Any], tmp: Path, torch_threads: int
) -> None:
    n = args.requests
    echo = await one("echo", "echo", model="digits", mode="closed")
    batch1 = await one("digits-batch-1", "worker", model="digits", mode="closed", max_batch_size=1)
    digits = await one("digits", "worker", model="digits", mode="closed")
    heavy = await one("heavy", "worker", model="heavy", mode="closed", requests=max(200, n // 10))
    heavy_int8 = await one("heavy-int8", "worker", model="heavy", mode="closed",
                           requests=max(200, n // 10), quantize="int8")  # fmt: skip
    heavy_batch = round(statistics.fmean(heavy.batch_sizes)) if heavy.batch_sizes else 1
    threads = torch_threads  # as the worker chooses
    plain, plain_int8 = (
        plain_torch_throughput(
            heavy_model_repository(tmp / f"plain-{mode}", max_batch_size=args.max_batch_size,
                                   delay_ms=args.max_batch_delay_ms, quantize=mode),
            "heavy", heavy_batch, threads,
        )
        for mode in ("none", "int8")
    )  # fmt: skip
    half = digits.throughput / 2
    open_loop = await one("digits-open-half", "worker", model="digits", mode="open", rate=half,
                          requests=max(500, int(half * 10)))  # fmt: skip
    # The same rate through the echo loop: the latency of the transport alone on this machine.
    echo_open = await one("echo-open-half", "echo", model="digits", mode="open", rate=half,
                          requests=max(500, int(half * 10)))  # fmt: skip
    compute = statistics.fmean(open_loop.compute_ms) if open_loop.compute_ms else 0.0
    bound = args.max_batch_delay_ms + 2 * compute + 10
    worker_part = args.max_batch_delay_ms + 2 * compute
    report["limits"] = {
        "heavy_plain_torch_rows_per_s": round(plain, 1),
        "heavy_int8_plain_torch_rows_per_s": round(plain_int8, 1),
        "heavy_batch_size": heavy_batch,
        "torch_threads": threads,
        "open_loop_rate": round(half, 1),
        "open_loop_p99_bound_ms": round(bound, 2),
        "open_loop_echo_p99_ms": round(echo_open.percentile(99), 2),
    }
    report["ratios"] = {
        "digits_vs_echo": round(digits.throughput / echo.throughput, 3),
        "batching_speedup": round(digits.throughput / batch1.throughput, 2),
        "heavy_vs_plain_torch": round(heavy.throughput / plain, 3),
        "heavy_int8_vs_plain_torch_int8": round(heavy_int8.throughput / plain_int8, 3),
        "heavy_int8_speedup": round(heavy_int8.throughput / heavy.throughput, 2),
        "open_loop_p99_over_bound": round(open_loop.percentile(99) / bound, 3),
        # What the worker adds to the transport's p99, against the bound's worker share.
        "open_loop_p99_beyond_echo_over_delay_and_compute": round(
            (open_loop.percentile(99) - echo_open.percentile(99)) / worker_part, 3
        ),
    }


def _bench_topics(kafka: KafkaSettings, target: str) -> KafkaSettings:
    if target == "none":
        return kafka
    uid = uuid.uuid4().hex[:8]
    return KafkaSettings(**{
        **kafka.model_dump(),
        "requests_topic": f"bench.{uid}.requests",
        "replies_topic": f"bench.{uid}.replies",
        "dead_letter_topic": f"bench.{uid}.dlq",
        "group_id": f"bench-{uid}",
    })  # fmt: skip


@contextlib.contextmanager
def _progress(console: Any, label: str, total: int) -> Iterator[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn  # noqa: PLC0415

    with Progress(
        f"[bold]{label}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task(label, total=total)
        yield lambda done: progress.update(task, completed=done)


def _print_table(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table  # noqa: PLC0415

    table = Table(title="python -m worker bench")
    columns = ["label", "mode", "requests", "requests_per_s", "p50_ms", "p95_ms", "p99_ms",
               "max_ms", "mean_batch", "max_batch", "errors"]  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("label", "mode") else "right")
    for row in report["results"]:
        table.add_row(*("" if row[c] is None else str(row[c]) for c in columns))
    Console = type(console)  # noqa: N806 - print the table on stdout, progress stays on stderr
    out = Console(width=max(120, Console().width))
    out.print(table)
    for section in ("limits", "ratios"):
        for key, value in report[section].items():
            out.print(f"{section[:-1]} {key}: {value}")


def _plot(results: list[BenchResult], path: Path, *, sweep: bool) -> None:
    import matplotlib as mpl  # noqa: PLC0415

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    panels = 2 if sweep else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for result in results:
        if result.latencies_ms:
            ax.hist(result.latencies_ms, bins=50, histtype="step", label=result.label)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("requests")
    ax.set_title("Latency distribution")
    ax.legend()
    if sweep:
        ax = axes[0][1]
        sizes = [int(r.label.split("-")[-1]) for r in results]
        ax.plot(sizes, [r.throughput for r in results], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("max_batch_size")
        ax.set_ylabel("requests/s")
        ax.set_title("Throughput vs max_batch_size")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
