"""``python -m worker bench``: load a worker through Kafka and report throughput and latency.

Two ways to drive it (:mod:`worker.bench.load`):

- ``--mode closed`` sends ``--requests`` requests, at most ``--concurrency`` awaiting their
  reply at once (default: all), and measures how long the whole set takes;
- ``--mode open`` sends at a fixed ``--rate`` and measures latency percentiles.

By default the tool starts what it measures itself, on fresh topics of the broker named by
``WORKER_KAFKA__BOOTSTRAP_SERVERS`` (:mod:`worker.bench.targets`): ``--target worker`` (the
real worker), ``echo`` (the transport limit), ``plain`` (a hand-written loop at batch size 1:
:mod:`worker.bench.references`), or ``none`` (a worker you run yourself on the configured
topics). ``--suite`` runs every reference comparison in one go and prints the ratios;
``--suite --model minilm`` runs the text-model comparisons instead (length-aware batching
against arrival order, the worker against plain sentence-transformers). ``--rebalance`` runs
the scale events (a worker joins, leaves, restarts as a static member, is killed) under an
open-loop rate and reports latency window by window (:mod:`worker.bench.rebalance`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from worker.bench.delivery import delivery_comparison
from worker.bench.endpoints import drive_endpoint
from worker.bench.interactive import interactive, interactive_arguments
from worker.bench.load import BenchResult, bench_texts, drive
from worker.bench.rebalance import DEFAULT_RATE, run_rebalance
from worker.bench.report import (
    padding_efficiency,
    plot,
    print_rebalance,
    print_table,
    progress_bar,
)
from worker.bench.sweeps import count_sweep
from worker.bench.targets import (
    bench_repository,
    bench_topics,
    free_port,
    plain_torch_throughput,
    sentence_transformers_throughput,
    spawned,
)
from worker.kafka import ensure_topics
from worker.settings import Settings

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` command's options."""
    parser.add_argument("--mode", choices=["closed", "open"], default="closed")
    parser.add_argument("--requests", "-n", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=None,
                        help="open loop: requests/s (default 1000; --rebalance: 300)")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=0,
                        help="closed loop: most requests awaiting a reply (0: all)")  # fmt: skip
    parser.add_argument(
        "--model", choices=["digits", "mlp", "heavy", "minilm"], default="digits",
        help="minilm: the text model (make minilm exports it); requests are corpus sentences",
    )  # fmt: skip
    parser.add_argument("--rows", type=int, default=1, help="rows per request (payload size)")
    parser.add_argument("--target", choices=["worker", "echo", "plain", "none", "grpc", "http"],
                        default="worker",
                        help="grpc, http: a worker's gRPC or REST endpoint, not Kafka")  # fmt: skip
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-batch-delay-ms", type=float, default=5.0)
    parser.add_argument("--quantize", choices=["none", "int8"], default="none",
                        help="models' quantize key (int8: dynamic)")  # fmt: skip
    parser.add_argument("--compile", choices=["none", "aot"], default="none",
                        help="models' compile key (aot: AOTInductor; not with int8)")  # fmt: skip
    parser.add_argument("--sweep", default="", help="comma-separated max_batch_size values")
    parser.add_argument("--device", default="auto", help="the worker's models: auto, cpu, cuda[:N]")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--instances", type=int, default=1, help="instances per model version")
    parser.add_argument("--instances-sweep", default="",
                        help="comma-separated instance counts, one run each")  # fmt: skip
    parser.add_argument("--processes", type=int, default=1,
                        help="worker processes (serve --processes)")  # fmt: skip
    parser.add_argument("--processes-sweep", default="",
                        help="comma-separated process counts, one run each")  # fmt: skip
    parser.add_argument("--suite", action="store_true", help="run every reference comparison")
    parser.add_argument(
        "--delivery", action="store_true",
        help="at-least-once against exactly-once: closed loop (mlp, twice each, interleaved) "
        "and open loop at --rate (default 500/s)",
    )  # fmt: skip
    interactive_arguments(parser)
    parser.add_argument(
        "--rebalance",
        action="store_true",
        help="scale events under open-loop load: join, leave, static restart, kill",
    )
    parser.add_argument("--partitions", type=int, default=6, help="--rebalance: requests topic")
    parser.add_argument(
        "--window",
        type=float,
        default=10.0,
        help="--rebalance: seconds from one event to the next (at least)",
    )
    parser.add_argument(
        "--static", action="store_true",
        help="--rebalance: every worker a static member (else only the restarted one)",
    )  # fmt: skip
    parser.add_argument("--static-session-timeout-ms", type=int, default=60_000,
                        help="--rebalance: static members' session timeout")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--worker-src", type=Path, default=None,
                        help="run the worker from this source tree (another commit)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")


async def run(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Run what the options ask for; print the table; return the JSON document."""
    from rich.console import Console  # noqa: PLC0415 - the bench extra

    console = Console(stderr=True)
    if args.rate is None:
        args.rate = _default_rate(args)
    if args.rebalance or args.interactive:
        return await (_rebalance if args.rebalance else interactive)(settings, args, console)
    results: list[BenchResult] = []
    report: dict[str, Any] = {"results": [], "ratios": {}, "limits": {}}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:

        async def one(
            label: str, target: str, env: dict[str, str] | None = None, **over: Any
        ) -> BenchResult:
            opts = {**vars(args), **over}
            env = {**execution_env(opts), **(env or {})}
            repo = bench_repository(
                Path(tmp) / label, max_batch_size=opts["max_batch_size"],
                delay_ms=opts["max_batch_delay_ms"], quantize=opts["quantize"],
                compile_mode=opts["compile"] if opts["quantize"] == "none" else "none",
            )  # fmt: skip
            kafka = bench_topics(settings.kafka, target)
            await ensure_topics(kafka, [kafka.requests_topic, kafka.replies_topic])
            endpoint = target in ("grpc", "http")
            if endpoint:
                endpoint_port = free_port()
                env |= {
                    f"WORKER_{'REST' if target == 'http' else 'GRPC'}__ENABLED": "true",
                    f"WORKER_{'REST' if target == 'http' else 'GRPC'}__PORT": str(endpoint_port),
                    f"WORKER_{'REST' if target == 'http' else 'GRPC'}__HOST": "127.0.0.1",
                }
            context = (
                spawned(
                    "worker" if endpoint else target,
                    kafka,
                    repo,
                    Path(tmp) / f"{label}.log",
                    worker_src=args.worker_src,
                    env_over=env,
                    processes=opts["processes"],
                )
                if target != "none"
                else contextlib.nullcontext()
            )
            with context as port, progress_bar(console, label, opts["requests"]) as progress:
                if endpoint:
                    result = await drive_endpoint(
                        target, endpoint_port, label=label, mode=opts["mode"],
                        model=opts["model"], requests=opts["requests"], rows=opts["rows"],
                        concurrency=opts["concurrency"] or opts["requests"], rate=opts["rate"],
                        progress=progress,
                    )  # fmt: skip
                    results.append(result)
                    return result
                result = await drive(
                    kafka, label=label, mode=opts["mode"], model=opts["model"],
                    requests=opts["requests"], rows=opts["rows"],
                    concurrency=opts["concurrency"] or opts["requests"], rate=opts["rate"],
                    timeout=opts["timeout"], progress=progress,
                )  # fmt: skip
                if opts["model"] == "minilm" and target == "worker" and port:
                    result.padding_efficiency = await padding_efficiency(port)
            results.append(result)
            return result

        if args.suite and args.model == "minilm":
            await _text_suite(args, one, report, settings.models.threads)
        elif args.suite and args.target in ("grpc", "http"):
            await _transport_suite(args, one, report)
        elif args.suite:
            await _suite(args, one, report, Path(tmp), settings.models.threads)
        elif args.sweep:
            for size in [int(s) for s in args.sweep.split(",")]:
                await one(f"batch-{size}", args.target, max_batch_size=size)
        elif args.instances_sweep or args.processes_sweep:
            key = "instances" if args.instances_sweep else "processes"
            counts = [int(n) for n in (args.instances_sweep or args.processes_sweep).split(",")]
            await count_sweep(one, report, model=args.model, target=args.target, key=key,
                              counts=counts)  # fmt: skip
        else:  # one target, or at-least-once against exactly-once
            target = args.target
            await (delivery_comparison(one, report) if args.delivery else one(target, target))
    report["results"] = [r.summary() for r in results]
    print_table(console, report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(results, args.plot, sweep=bool(args.sweep))
    return report


def _default_rate(args: argparse.Namespace) -> float:
    """``--rate`` when not given: each kind of run has its own."""
    if args.rebalance:
        return DEFAULT_RATE
    return 50.0 if args.interactive else 500.0 if args.delivery else 1000.0


async def _rebalance(settings: Settings, args: argparse.Namespace, console: Any) -> dict[str, Any]:
    """``--rebalance``: the scale events, their tables and the JSON."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as tmp,
        console.status(f"scale events at {args.rate:g} requests/s") as status,
    ):
        report = await run_rebalance(settings, args, Path(tmp), say=status.update)
    print_rebalance(console, report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


async def _suite(
    args: argparse.Namespace, one: Any, report: dict[str, Any], tmp: Path, torch_threads: int
) -> None:
    """Every reference comparison, on one machine in one run; ratios are what to compare."""
    n = args.requests
    closed = {"mode": "closed", "model": "mlp"}
    echo = await one("echo", "echo", **closed)
    plain = await one("mlp-plain-loop", "plain", **closed)
    batch1 = await one("mlp-batch-1", "worker", **closed, max_batch_size=1)
    mlp = await one("mlp", "worker", **closed)
    digits = await one("digits", "worker", mode="closed", model="digits")
    # About a second of load each: shorter runs are at the mercy of one stall.
    heavy = await one("heavy", "worker", mode="closed", model="heavy", requests=max(200, n // 5))
    heavy_int8 = await one("heavy-int8", "worker", mode="closed", model="heavy",
                           requests=max(200, n // 2), quantize="int8")  # fmt: skip
    heavy_1 = await one("heavy-batch-1", "worker", mode="closed", model="heavy",
                        requests=max(200, n // 10), max_batch_size=1)  # fmt: skip
    heavy_2 = await one("heavy-2-instances", "worker", mode="closed", model="heavy",
                        requests=max(200, n // 5), instances=2)  # fmt: skip
    heavy_batch = round(statistics.fmean(heavy.batch_sizes)) if heavy.batch_sizes else 1
    plain_torch, plain_torch_int8 = (
        plain_torch_throughput(
            bench_repository(tmp / f"plain-{mode}", max_batch_size=args.max_batch_size,
                             delay_ms=args.max_batch_delay_ms, quantize=mode),
            "heavy", heavy_batch, torch_threads,
            device=args.device if mode == "none" else "cpu", precision=args.precision,
        )
        for mode in ("none", "int8")
    )  # fmt: skip
    # Low load (10% of capacity): the worker's latency against the transport's own.
    low = mlp.throughput / 10
    low_n = max(300, int(low * 5))
    mlp_low = await one("mlp-open-10pct", "worker", mode="open", model="mlp", rate=low,
                        requests=low_n)  # fmt: skip
    echo_low = await one("echo-open-10pct", "echo", mode="open", model="mlp", rate=low,
                         requests=low_n)  # fmt: skip
    held = await _highest_rate(one, capacity=mlp.throughput, p99_ms=P99_TARGET_MS)
    compute = statistics.fmean(mlp_low.compute_ms) if mlp_low.compute_ms else 0.0
    report["limits"] = {
        "heavy_plain_torch_rows_per_s": round(plain_torch, 1),
        "heavy_int8_plain_torch_rows_per_s": round(plain_torch_int8, 1),
        "heavy_batch_size": heavy_batch,
        "torch_threads": torch_threads,
        "device": args.device,
        "precision": args.precision,
        "low_load_rate": round(low, 1),
        "low_load_p50_bound_ms": round(echo_low.percentile(50) + compute + 2, 2),
        "highest_rate_p99_under_100ms": round(held, 1),
    }
    report["ratios"] = {
        "mlp_vs_echo": round(mlp.throughput / echo.throughput, 3),
        "mlp_batch1_vs_plain_loop": round(batch1.throughput / plain.throughput, 3),
        "batching_speedup": round(mlp.throughput / batch1.throughput, 2),
        "highest_open_rate_over_capacity": round(held / mlp.throughput, 3),
        "low_load_p50_over_bound": round(
            mlp_low.percentile(50) / (echo_low.percentile(50) + compute + 2), 3
        ),
        "digits_cnn_vs_echo": round(digits.throughput / echo.throughput, 3),
        "heavy_vs_plain_torch": round(heavy.throughput / plain_torch, 3),
        "heavy_int8_vs_plain_torch_int8": round(heavy_int8.throughput / plain_torch_int8, 3),
        "heavy_int8_speedup": round(heavy_int8.throughput / heavy.throughput, 2),
        "heavy_batching_speedup": round(heavy.throughput / heavy_1.throughput, 2),
        "heavy_2_instances_vs_1": round(heavy_2.throughput / heavy.throughput, 3),
    }


def execution_env(opts: dict[str, Any]) -> dict[str, str]:
    """The worker's device, precision and instances (``--device`` ...) as its settings."""
    return {
        "WORKER_MODELS__DEVICE": str(opts["device"]),
        "WORKER_MODELS__PRECISION": str(opts["precision"]),
        "WORKER_MODELS__INSTANCES": str(opts["instances"]),
    }


async def _transport_suite(args: argparse.Namespace, one: Any, report: dict[str, Any]) -> None:
    """Kafka, gRPC and REST on one model in one sitting: throughput, batching gain, latency."""
    n = args.requests
    closed = {"mode": "closed", "model": args.model, "requests": n}
    kafka = await one("kafka", "worker", **closed)
    grpc = await one("grpc", "grpc", **closed)
    http = await one("http", "http", **closed)
    single = {**closed, "requests": max(200, n // 5), "max_batch_size": 1}
    kafka_1 = await one("kafka-batch-1", "worker", **single)
    grpc_1 = await one("grpc-batch-1", "grpc", **single)
    low = {"mode": "open", "model": args.model, "rate": 50.0, "requests": 250}
    grpc_low = await one("grpc-open-50rps", "grpc", **low)
    kafka_low = await one("kafka-open-50rps", "worker", **low)
    compute = statistics.fmean(grpc_low.compute_ms) if grpc_low.compute_ms else 0.0
    report["limits"] = {"grpc_low_load_mean_compute_ms": round(compute, 3)}
    report["ratios"] = {
        "grpc_vs_kafka": round(grpc.throughput / kafka.throughput, 3),
        "http_vs_kafka": round(http.throughput / kafka.throughput, 3),
        "batching_gain_kafka": round(kafka.throughput / kafka_1.throughput, 2),
        "batching_gain_grpc": round(grpc.throughput / grpc_1.throughput, 2),
        "grpc_low_load_p50_over_compute": round(grpc_low.percentile(50) / compute, 1)
        if compute
        else None,
        "grpc_low_load_p50_vs_kafka": round(grpc_low.percentile(50) / kafka_low.percentile(50), 3),
    }


FIFO = {"WORKER_BATCHING__SORT_WINDOW": "1", "WORKER_BATCHING__MIN_PADDING_EFFICIENCY": "0"}
"""Batching in arrival order, cut by size and token budget only (as TEI does)."""


async def _text_suite(
    args: argparse.Namespace, one: Any, report: dict[str, Any], torch_threads: int
) -> None:
    """MiniLM on the corpus: length-aware vs arrival order, and vs sentence-transformers."""
    n = min(args.requests, 2000)
    closed = {"mode": "closed", "model": "minilm", "requests": n}
    aware = await one("minilm", "worker", **closed)
    fifo = await one("minilm-fifo", "worker", env=FIFO, **closed)
    rate = aware.throughput * 0.5
    await one("minilm-open-50pct", "worker", mode="open", model="minilm", rate=rate,
              requests=max(200, int(rate * 10)))  # fmt: skip
    reference = sentence_transformers_throughput(
        bench_texts(n), batch=args.max_batch_size, threads=torch_threads,
        device=args.device, precision=args.precision,
    )  # fmt: skip
    report["limits"] = {
        "sentence_transformers_sentences_per_s": round(reference, 1),
        "sentence_transformers_batch_size": args.max_batch_size,
        "torch_threads": torch_threads,
    }
    report["ratios"] = {
        "minilm_vs_sentence_transformers": round(aware.throughput / reference, 3),
        "length_aware_vs_fifo": round(aware.throughput / fifo.throughput, 2),
        "padding_efficiency_length_aware": aware.padding_efficiency,
        "padding_efficiency_fifo": fifo.padding_efficiency,
    }


P99_TARGET_MS = 100.0
RATE_STEPS = (0.2, 0.35, 0.5, 0.65, 0.8, 0.95)
"""Open-loop rates tried, as fractions of the closed-loop capacity, lowest first."""


async def _highest_rate(one: Any, *, capacity: float, p99_ms: float) -> float:
    """The highest open-loop rate (of :data:`RATE_STEPS`) whose p99 stays under ``p99_ms``.

    A step that misses is run once more before the search stops: on a shared machine one run
    in a few has a tail from a neighbour's stall, and a miss should be the worker's.
    """
    held = 0.0
    for step in RATE_STEPS:
        rate = capacity * step
        for attempt in ("", "-again"):
            result = await one(f"mlp-open-{round(step * 100)}pct{attempt}", "worker",
                               mode="open", model="mlp", rate=rate,
                               requests=max(500, int(rate * 4)))  # fmt: skip
            if result.percentile(99) < p99_ms and not result.errors:
                break
        else:
            return held
        held = rate
    return held
