"""The benchmark runs end to end against the real broker (briefly; it asserts no speed)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from structlog.testing import capture_logs

from worker.bench import suite
from worker.bench.targets import bench_topics, delete_bench_topics
from worker.kafka import delete_topics, ensure_topics, list_topics
from worker.settings import KafkaSettings, Settings

from .conftest import ROOT, changed, wait_for

sys.path.insert(0, str(ROOT / "dev"))
from local_kafka import LocalBroker

pytestmark = pytest.mark.kafka


def bench(
    settings: Settings, tmp_path: Path, *args: str, env_over: dict[str, str] | None = None
) -> dict[str, object]:
    """Run `python -m worker bench` with ``args`` (and ``env_over``); return its JSON report."""
    out = tmp_path / f"report-{len(list(tmp_path.iterdir()))}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env["WORKER_KAFKA__BOOTSTRAP_SERVERS"] = settings.kafka.bootstrap_servers
    env |= env_over or {}
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
    for row in (worker[0], echo[0]):  # who used the CPU while the clock ran
        cpu = row["cpu_us_per_request"]
        assert isinstance(cpu, dict)
        assert set(cpu) == {"client", "broker", "target", "idle"}
        assert cpu["client"] > 0, "the bench process itself sent and read"
        assert cpu["target"] > 0, "the worker (or echo loop) it started answered"


async def bench_topics_now(settings: Settings) -> set[str]:
    """The broker's topics that a bench run created (``bench.<id>.*``)."""
    return {t for t in await list_topics(settings.kafka) if t.startswith("bench.")}


async def test_a_bench_run_deletes_the_topics_it_created(
    settings: Settings, tmp_path: Path
) -> None:
    """Each leg runs on fresh topics and deletes them after it: the broker is left as it was."""
    mine = settings.kafka.requests_topic  # not the bench's: it must survive the run
    await ensure_topics(settings.kafka, [mine])
    before = await bench_topics_now(settings)
    await asyncio.to_thread(bench, settings, tmp_path, "-n", "50", "--sweep", "1,8")

    async def none_left() -> bool:
        return await bench_topics_now(settings) <= before

    await wait_for(none_left, timeout=30, what="the bench's topics deleted")
    assert mine in await list_topics(settings.kafka)


@pytest.fixture
def no_delete_broker() -> Iterator[LocalBroker]:
    """A broker of this test's own (ports 19292/19293) with topic deletion turned off."""
    broker = LocalBroker.named("no-delete", 19292, 19293, config=("delete.topic.enable=false",))
    broker.start()
    yield broker
    broker.stop()


async def test_a_broker_refusing_deletion_keeps_the_topics_and_the_bench_warns(
    settings: Settings, no_delete_broker: LocalBroker
) -> None:
    """Deletion off on the broker (error 73): the topics stay, a warning names the error."""
    kafka = bench_topics(
        changed(settings, "kafka", bootstrap_servers=no_delete_broker.bootstrap).kafka, "echo"
    )
    await ensure_topics(kafka, [kafka.requests_topic])
    with capture_logs() as logs:
        await delete_bench_topics(kafka)
    warned = [e for e in logs if e["event"] == "the bench's topics were not deleted"]
    assert warned, logs
    assert "error 73" in warned[0]["error"]
    assert kafka.requests_topic in await list_topics(kafka)


async def test_a_refused_deletion_of_the_bench_topics_is_only_a_warning() -> None:
    """Topics that cannot be deleted (no broker, no permission) leave a warning, not an error."""
    kafka = bench_topics(KafkaSettings(bootstrap_servers="127.0.0.1:1"), "echo")
    with capture_logs() as logs:
        await delete_bench_topics(kafka)
    warned = [e for e in logs if e["event"] == "the bench's topics were not deleted"]
    assert warned, logs
    assert warned[0]["topics"][0] == kafka.requests_topic


async def test_delete_topics_deletes_those_named_and_skips_unknown_ones(settings: Settings) -> None:
    """delete_topics removes the topics named; a name that is no topic is no error."""
    kafka = settings.kafka
    await ensure_topics(kafka, [kafka.requests_topic, kafka.replies_topic])
    await delete_topics(kafka, [kafka.requests_topic, f"{kafka.requests_topic}.never-created"])

    async def deleted() -> bool:
        topics = await list_topics(kafka)
        return kafka.requests_topic not in topics and kafka.replies_topic in topics

    await wait_for(deleted, timeout=30, what="only the requests topic deleted")


@pytest.mark.parametrize(("threshold", "warned"), [(0, True), (10**9, False)])
async def test_a_broker_with_many_topics_is_reported_before_a_bench(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, threshold: int, warned: bool
) -> None:
    """More topics than LADEN_TOPICS on the broker: the bench says to start an empty one."""
    await ensure_topics(settings.kafka, [settings.kafka.requests_topic])
    monkeypatch.setattr(suite, "LADEN_TOPICS", threshold)
    out = io.StringIO()
    await suite._warn_if_laden(settings.kafka, Console(file=out, width=400))
    assert ("make kafka-fresh" in out.getvalue()) is warned


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


def test_rebalance_scenario_runs_every_event_and_loses_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    """--rebalance, small and fast: every event happens and settles; nothing is lost.

    Every window is reported and every worker's rebalance metrics are scraped.
    """
    report = bench(
        settings, tmp_path, "--rebalance", "--model", "mlp", "--rate", "40", "--window", "1",
        env_over={"WORKER_KAFKA__SESSION_TIMEOUT_MS": "6000"},  # the broker's least: a short kill
    )  # fmt: skip
    rows = report["results"]
    assert isinstance(rows, list)
    labels = ["steady", "starting", "join", "leave", "static-restart", "kill"]
    assert [r["label"] for r in rows] == labels
    for row in rows:
        assert row["requests"] > 0, row
        assert (row["errors"], row["lost"]) == (0, 0), row
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"], row
        assert isinstance(row["duplicates"], int)
    assert rows[1]["worker"] == "w3", "the third worker's start-up, before it joins"
    for row, worker in zip(rows[2:], ["w3", "w3", "w1", "w2"], strict=True):
        assert row["worker"] == worker
        assert row["settled_after_s"] is not None, f"the group settled after {row['label']}"
        assert isinstance(row["others_rebalances"], int)
    assert rows[2]["others_rebalances"] >= 2, "the join rebalanced both other workers"
    assert rows[4]["others_rebalances"] == 0, "a static member's restart: no rebalance"
    assert (report["lost"], report["lost_ids"]) == (0, [])
    assert isinstance(report["duplicates"], int)
    workers = {w["name"]: w for w in report["workers"]}  # type: ignore[attr-defined]
    assert {name: w["ended"] for name, w in workers.items()} == {
        "w1": "stopped (SIGTERM), restarted as w1'",
        "w2": "killed (SIGKILL)",
        "w3": "left (SIGTERM)",
        "w1'": "ran to the end",
    }
    assert workers["w1"]["instance_id"] == workers["w1'"]["instance_id"] is not None
    assert workers["w2"]["instance_id"] is None, "without --static only w1 is a static member"
    for worker in workers.values():
        assert worker["rebalances"] >= 1, worker
        assert {"revokes", "revoke_seconds", "abandoned", "partitions"} <= set(worker)
    assert workers["w1'"]["partitions"] == 6, "the last worker holds every partition"
    assert set(report["ratios"]) >= {  # type: ignore[call-overload]
        "join_p99_minus_steady_ms", "leave_p99_minus_steady_ms", "kill_stall_ms",
        "static_restart_stall_ms", "static_restart_rebalances_in_others",
        "static_restart_within_session_timeout",
    }  # fmt: skip
    assert report["limits"]["session_timeout_ms"] == 6000  # type: ignore[index]
