"""The benchmark runs end to end against the real broker (briefly; it asserts no speed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.settings import Settings

from .conftest import ROOT

pytestmark = pytest.mark.kafka


def bench(settings: Settings, tmp_path: Path, *args: str) -> dict[str, object]:
    """Run `python -m worker bench` with ``args``; return its JSON report."""
    out = tmp_path / f"report-{len(list(tmp_path.iterdir()))}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env["WORKER_KAFKA__BOOTSTRAP_SERVERS"] = settings.kafka.bootstrap_servers
    done = subprocess.run(
        [sys.executable, "-m", "worker", "bench", "--json", str(out), "--timeout", "120", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "python -m worker bench" in done.stdout, "the table is printed"
    report = json.loads(out.read_text())
    assert isinstance(report, dict)
    return report


def check_sane(row: dict[str, object], requests: int) -> None:
    """Counts add up and percentiles are ordered."""
    assert row["requests"] == requests
    assert row["errors"] == 0
    assert isinstance(row["requests_per_s"], float)
    assert row["requests_per_s"] > 0
    p50, p95, p99, top = (float(row[k]) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms"))  # type: ignore[arg-type]
    assert 0 < p50 <= p95 <= p99 <= top


def test_closed_loop_against_the_worker_and_the_echo_reference(
    settings: Settings, tmp_path: Path
) -> None:
    """Closed loop on the worker reports batches; on the echo worker it reports none."""
    worker = bench(settings, tmp_path, "-n", "300")["results"]
    echo = bench(settings, tmp_path, "-n", "300", "--target", "echo")["results"]
    assert isinstance(worker, list)
    assert isinstance(echo, list)
    check_sane(worker[0], 300)
    assert 1 <= worker[0]["mean_batch"] <= worker[0]["max_batch"] <= 64
    check_sane(echo[0], 300)
    assert echo[0]["mean_batch"] is None
    assert (worker[0]["responses"], echo[0]["responses"]) == (300, 0)


def test_plain_loop_reference_answers_every_request(settings: Settings, tmp_path: Path) -> None:
    """The plain-loop reference serves the mlp model at batch size 1: real replies, no batches."""
    rows = bench(settings, tmp_path, "-n", "200", "--target", "plain", "--model", "mlp")["results"]
    assert isinstance(rows, list)
    check_sane(rows[0], 200)
    assert rows[0]["responses"] == 200, "every reply is a model's response, not an echo"
    assert rows[0]["mean_batch"] is None, "the plain loop sends no timing"


def test_open_loop_sweep_writes_a_plot(settings: Settings, tmp_path: Path) -> None:
    """An open-loop sweep over max_batch_size gives one row per size and a PNG plot."""
    plot = tmp_path / "sweep.png"
    report = bench(
        settings, tmp_path, "--mode", "open", "--rate", "200", "-n", "150",
        "--sweep", "1,8", "--plot", str(plot),
    )  # fmt: skip
    rows = report["results"]
    assert isinstance(rows, list)
    assert [r["label"] for r in rows] == ["batch-1", "batch-8"]
    assert rows[0]["max_batch"] == 1
    for row in rows:
        check_sane(row, 150)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_int8_heavy_model_is_served_through_the_broker(settings: Settings, tmp_path: Path) -> None:
    """--quantize int8 serves the heavy MLP quantised: every request answered, no errors."""
    rows = bench(settings, tmp_path, "--model", "heavy", "--quantize", "int8", "-n", "64")[
        "results"
    ]
    assert isinstance(rows, list)
    check_sane(rows[0], 64)
    assert rows[0]["mean_batch"] >= 1
