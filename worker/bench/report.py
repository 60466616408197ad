"""The benchmark's output: a progress bar on stderr, the tables on stdout, a PNG plot."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from worker.bench.cpu import PARTIES
from worker.bench.load import BenchResult

__all__ = ["padding_efficiency", "plot", "print_rebalance", "print_table", "progress_bar"]


@contextlib.contextmanager
def progress_bar(console: Any, label: str, total: int) -> Iterator[Any]:
    """A transient progress bar; yields a function taking the number of replies so far."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn  # noqa: PLC0415

    with Progress(
        f"[bold]{label}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task(label, total=total)
        yield lambda done: progress.update(task, completed=done)


def print_table(console: Any, report: dict[str, Any]) -> None:
    """The results table on stdout, then the limits and ratios."""
    from rich.table import Table  # noqa: PLC0415

    table = Table(title="python -m worker bench")
    columns = ["label", "mode", "requests", "requests_per_s", "p50_ms", "p95_ms", "p99_ms",
               "max_ms", "mean_batch", "max_batch", "errors"]  # fmt: skip
    if any(row.get("tokens_per_s") for row in report["results"]):  # a text model's run
        columns[4:4] = ["tokens_per_s", "padding_efficiency"]
    shares = any(row.get("cpu_us_per_request") for row in report["results"])
    if shares:  # CPU per request of the load client, the broker, the target; idle cores
        columns.append("cpu_us c/b/t/idle")
    for column in columns:
        table.add_column(column, justify="left" if column in ("label", "mode") else "right")
    plain = columns[:-1] if shares else columns  # the CPU shares' cell is built below
    for row in report["results"]:
        cells = ["" if row.get(c) is None else str(row[c]) for c in plain]
        if shares:
            cpu = row.get("cpu_us_per_request") or {}
            cells.append("/".join(f"{cpu[p]:.0f}" for p in PARTIES) if cpu else "")
        table.add_row(*cells)
    Console = type(console)  # noqa: N806 - print the table on stdout, progress stays on stderr
    out = Console(width=max(120, Console().width))
    out.print(table)
    for section in ("limits", "ratios"):
        for key, value in report[section].items():
            out.print(f"{section[:-1]} {key}: {value}")


def print_rebalance(console: Any, report: dict[str, Any]) -> None:
    """``--rebalance``: the windows and the workers as tables on stdout, then the figures."""
    from rich.table import Table  # noqa: PLC0415

    windows = Table(title="python -m worker bench --rebalance: windows")
    columns = {"label": "window", "from_s": "from s", "worker": "worker", "requests": "requests",
               "p50_ms": "p50 ms", "p99_ms": "p99 ms", "max_ms": "max ms",
               "settled_after_s": "settled after s", "others_rebalances": "others' rebalances",
               "duplicates": "dups", "lost": "lost", "errors": "errors"}  # fmt: skip
    for column, title in columns.items():
        windows.add_column(title, justify="left" if column in ("label", "worker") else "right")
    for row in report["results"]:
        windows.add_row(*("" if row.get(c) is None else str(row[c]) for c in columns))
    workers = Table(title="workers (last scrape of /metrics before each stopped)")
    names = list(report["workers"][0]) if report["workers"] else []
    for column in names:
        workers.add_column(column)
    for row in report["workers"]:
        workers.add_row(*("" if row.get(c) is None else str(row[c]) for c in names))
    Console = type(console)  # noqa: N806 - tables on stdout, progress stays on stderr
    out = Console(width=max(120, Console().width))
    out.print(windows)
    out.print(workers)
    out.print(f"lost {report['lost']}, duplicates {report['duplicates']}")
    for section in ("limits", "ratios"):
        for key, value in report[section].items():
            out.print(f"{section[:-1]} {key}: {value}")


def plot(results: list[BenchResult], path: Path, *, sweep: bool) -> None:
    """A PNG: latency histograms, and throughput against max_batch_size for a sweep."""
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


async def padding_efficiency(port: int) -> float | None:
    """Real / padded tokens in a worker's batches, from its ``/metrics``."""
    import aiohttp  # noqa: PLC0415
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    kinds: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "inference_batch_tokens_total":
                kind = sample.labels["kind"]
                kinds[kind] = kinds.get(kind, 0.0) + sample.value
    padded = kinds.get("padded", 0.0)
    return kinds.get("real", 0.0) / padded if padded else None
