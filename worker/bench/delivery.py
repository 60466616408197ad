"""``python -m worker bench --delivery``: at-least-once against exactly-once on the same load.

Closed loop on the mlp (twice each, interleaved: the machine's drift falls on both) and open
loop at ``--rate`` (500/s by default); the ratio of closed-loop throughputs and both open-loop
p99s go in the report (docs/performance.md has the figures).
"""

from __future__ import annotations

import statistics
from typing import Any

from worker.bench.load import BenchResult

__all__ = ["delivery_comparison"]


async def delivery_comparison(one: Any, report: dict[str, Any]) -> None:
    """``--delivery``: the two delivery modes on the same load, interleaved (ratios count)."""
    modes = {"alo": "at_least_once", "eos": "exactly_once"}
    closed: dict[str, list[BenchResult]] = {"alo": [], "eos": []}
    for turn in (1, 2):
        for short, mode in modes.items():
            env = {"WORKER_KAFKA__DELIVERY": mode}
            run = await one(f"mlp-{short}-{turn}", "worker", env, mode="closed", model="mlp")
            closed[short].append(run)
    opened = {
        short: await one(
            f"mlp-{short}-open",
            "worker",
            {"WORKER_KAFKA__DELIVERY": mode},
            mode="open",
            model="mlp",
        )
        for short, mode in modes.items()
    }
    alo = statistics.fmean(r.throughput for r in closed["alo"])
    eos = statistics.fmean(r.throughput for r in closed["eos"])
    report["ratios"] = {"exactly_once_vs_at_least_once_closed": round(eos / alo, 3)}
    report["limits"] = {
        f"p99_ms_open_{short}": round(r.percentile(99), 1) for short, r in opened.items()
    }
