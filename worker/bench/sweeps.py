"""``--instances-sweep`` and ``--processes-sweep``: one closed run per count, ratios to the first.

A count given twice (``1,2,1,2``: interleaved, so the machine's drift falls on both) gets a
suffix in its label.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from worker.bench.load import BenchResult

__all__ = ["count_sweep"]


async def count_sweep(
    one: Callable[..., Awaitable[BenchResult]],
    report: dict[str, Any],
    *,
    model: str,
    target: str,
    key: str,
    counts: list[int],
) -> None:
    """Run ``one`` once per count with ``key=count``; throughput ratios to the first run."""
    suffix = {"instances": "x", "processes": "p"}[key]
    labels = [
        f"{model}-{suffix}{n}" + (f"-{i + 1}" if counts.count(n) > 1 else "")
        for i, n in enumerate(counts)
    ]
    runs = [await one(label, target, **{key: n}) for label, n in zip(labels, counts, strict=True)]
    report["ratios"] = {
        f"{label}_vs_{labels[0]}": round(r.throughput / runs[0].throughput, 3)
        for label, r in zip(labels, runs, strict=True)
    }
