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
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from worker.bench.comparisons import reference_suite, text_suite, transport_suite
from worker.bench.delivery import delivery_comparison
from worker.bench.endpoints import drive_endpoint
from worker.bench.interactive import interactive, interactive_arguments
from worker.bench.load import BenchResult, drive
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
    delete_bench_topics,
    free_port,
    spawned,
)
from worker.kafka import ensure_topics, list_topics
from worker.settings import KafkaSettings, Settings

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
        "--rounds", type=int, default=3, choices=(1, 3, 5, 7, 9),
        help="--suite: interleaved rounds (an odd number) of the closed-loop legs on mlp (echo, "
        "worker, plain loop, batch 1); their ratios are the medians of the rounds' ratios",
    )  # fmt: skip
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
    await _warn_if_laden(settings.kafka, console)
    if args.rebalance or args.interactive:
        return await (_rebalance if args.rebalance else interactive)(settings, args, console)
    results: list[BenchResult] = []
    report: dict[str, Any] = {"results": [], "ratios": {}, "limits": {}}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:

        async def run_leg(
            label: str, target: str, kafka: KafkaSettings, env: dict[str, str] | None, **over: Any
        ) -> BenchResult:
            opts = {**vars(args), **over}
            env = {**execution_env(opts), **(env or {})}
            repo = bench_repository(
                Path(tmp) / label, max_batch_size=opts["max_batch_size"],
                delay_ms=opts["max_batch_delay_ms"], quantize=opts["quantize"],
                compile_mode=opts["compile"] if opts["quantize"] == "none" else "none",
            )  # fmt: skip
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

        async def one(
            label: str, target: str, env: dict[str, str] | None = None, **over: Any
        ) -> BenchResult:
            # On topics of its own, deleted after it: the broker stays as lean as it was.
            return await _on_own_topics(
                settings.kafka, target, lambda kafka: run_leg(label, target, kafka, env, **over)
            )

        if args.suite and args.model == "minilm":
            await text_suite(args, one, report, settings.models.threads)
        elif args.suite and args.target in ("grpc", "http"):
            await transport_suite(args, one, report)
        elif args.suite:
            await reference_suite(args, one, report, Path(tmp), settings.models.threads)
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


def execution_env(opts: dict[str, Any]) -> dict[str, str]:
    """The worker's device, precision and instances (``--device`` ...) as its settings."""
    return {
        "WORKER_MODELS__DEVICE": str(opts["device"]),
        "WORKER_MODELS__PRECISION": str(opts["precision"]),
        "WORKER_MODELS__INSTANCES": str(opts["instances"]),
    }


async def _on_own_topics(
    kafka: KafkaSettings, target: str, leg: Callable[[KafkaSettings], Awaitable[BenchResult]]
) -> BenchResult:
    """``leg`` run on fresh topics (the configured ones for ``none``), deleted after it."""
    own = bench_topics(kafka, target)
    try:
        return await leg(own)
    finally:
        if own is not kafka:
            await delete_bench_topics(own)


LADEN_TOPICS = 200
"""More topics than this on the broker: likely one the test suite ran on (see _warn_if_laden)."""


async def _warn_if_laden(kafka: KafkaSettings, console: Any) -> None:
    """Say so when the broker looks like one a test suite has filled (its figures drift)."""
    count = len(await list_topics(kafka))
    if count > LADEN_TOPICS:
        console.print(
            f"[yellow]warning:[/] the broker holds {count} topics (a test run's, or earlier "
            "benches'); on a broker filled by a test run the cost per request drifted upwards "
            "over a sitting (docs/performance.md, ninth pass). For figures to compare, start "
            "an empty one: make kafka-fresh"
        )
