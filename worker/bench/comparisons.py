"""The suite's comparisons (``bench --suite``): each a sequence of legs and the ratios they give.

- :func:`reference_suite` (``--suite``): the worker against the echo loop and the plain loop
  on ``mlp`` (interleaved rounds: ``mlp_vs_echo``, ``mlp_batch1_vs_plain_loop`` and
  ``batching_speedup`` are the medians of the rounds' ratios; the rates that other legs are
  set from, and ``digits_cnn_vs_echo``, take the round of median throughput), the CNN, the heavy
  model against plain torch (float and int8, batch 1, two instances), low-load latency against
  echo, and the highest open-loop rate held with p99 under 100 ms;
- :func:`transport_suite` (``--suite --target grpc|http``): Kafka, gRPC and REST on one model;
- :func:`text_suite` (``--suite --model minilm``): length-aware batching against arrival
  order, and the worker against plain sentence-transformers.

Each takes ``one(label, target, env=None, **options)``, which runs one leg on topics of its own
and returns its :class:`~worker.bench.load.BenchResult` (:func:`worker.bench.suite.run`).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from worker.bench.load import BenchResult, bench_texts
from worker.bench.targets import (
    bench_repository,
    plain_torch_throughput,
    sentence_transformers_throughput,
)

__all__ = ["reference_suite", "text_suite", "transport_suite"]


async def reference_suite(
    args: argparse.Namespace, one: Any, report: dict[str, Any], tmp: Path, torch_threads: int
) -> None:
    """Every reference comparison, on one machine in one run; ratios are what to compare."""
    n = args.requests
    closed = {"mode": "closed", "model": "mlp"}
    # Interleaved rounds: the legs of a round share that moment's machine (broker, client).
    rounds = [
        (
            await one(f"echo-{r}", "echo", **closed),
            await one(f"mlp-{r}", "worker", **closed),
            await one(f"mlp-plain-loop-{r}", "plain", **closed),
            await one(f"mlp-batch-1-{r}", "worker", **closed, max_batch_size=1),
        )
        for r in range(1, args.rounds + 1)
    ]
    echo, mlp = (_median([legs[i] for legs in rounds]) for i in (0, 1))

    def per_round(top: int, bottom: int) -> list[float]:
        return [legs[top].throughput / legs[bottom].throughput for legs in rounds]

    vs_echo, vs_plain, speedup = per_round(1, 0), per_round(3, 2), per_round(1, 3)
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
        "mlp_vs_echo": round(statistics.median(vs_echo), 3),
        "mlp_vs_echo_rounds": [round(x, 3) for x in vs_echo],
        "mlp_batch1_vs_plain_loop": round(statistics.median(vs_plain), 3),
        "mlp_batch1_vs_plain_loop_rounds": [round(x, 3) for x in vs_plain],
        "batching_speedup": round(statistics.median(speedup), 2),
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


async def transport_suite(args: argparse.Namespace, one: Any, report: dict[str, Any]) -> None:
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


async def text_suite(
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


def _median(legs: list[BenchResult]) -> BenchResult:
    """The leg of median throughput (``--rounds`` is odd)."""
    ordered = sorted(legs, key=lambda leg: leg.throughput)
    return ordered[(len(ordered) - 1) // 2]


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
