"""Process mode's parent (worker.processes) with stand-in children: restarts, stop, metrics."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.cli import MAX_PROCESSES, _processes
from worker.processes import Parent, child_environment
from worker.settings import HttpSettings, KafkaSettings, Settings

from .conftest import wait_for

# A stand-in child: notes its start, counts its index + 1 in a multiprocess counter, then
# exits with EXIT_CODE at once, or (unset) waits for SIGTERM, notes it and exits 0.
CHILD = """
import os, signal, sys, threading
from pathlib import Path
from prometheus_client import Counter
log = Path(sys.argv[1])
index = int(os.environ["WORKER_KAFKA__CLIENT_ID"].rsplit("-", 1)[1])
with log.open("a") as f:
    f.write(f"start {index}\\n")
Counter("stand_in_requests", "requests").inc(index + 1)
if "EXIT_CODE" in os.environ:
    sys.exit(int(os.environ["EXIT_CODE"]))
stopped = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stopped.set())
Path(os.environ["WORKER_HTTP__PORT_FILE"]).write_text("1")
stopped.wait()
with log.open("a") as f:
    f.write(f"drained {index}\\n")
"""


def parent_settings(tmp_path: Path) -> Settings:
    """Settings whose endpoint is on a free port, written to a file."""
    return Settings(
        kafka=KafkaSettings(client_id="w", group_instance_id="pod-a"),
        http=HttpSettings(host="127.0.0.1", port=0, port_file=tmp_path / "parent.port"),
    )


def lines(path: Path, word: str) -> list[str]:
    """The lines of the stand-ins' log that begin with ``word``."""
    return (
        [line for line in path.read_text().splitlines() if line.startswith(word)]
        if (path.exists())
        else []
    )


async def test_sigterm_reaches_every_child_and_the_parent_exits_0(tmp_path: Path) -> None:
    """stop() sends each child SIGTERM, waits for its drain, and run() returns 0."""
    log = tmp_path / "children.log"
    command = (sys.executable, "-c", CHILD, str(log))
    async with Parent.running(parent_settings(tmp_path), 3, environ={}, command=command) as parent:
        running = asyncio.create_task(parent.run())
        await wait_for(lambda: len(lines(log, "start")) == 3, timeout=30, what="three children")
        parent.stop()
        assert await asyncio.wait_for(running, 30) == 0
    assert sorted(lines(log, "drained")) == ["drained 0", "drained 1", "drained 2"]


async def test_a_child_that_exits_is_started_again_and_a_failed_last_exit_fails_the_parent(
    tmp_path: Path,
) -> None:
    """A child exiting on its own is restarted (with backoff); its last exit code counts."""
    log = tmp_path / "children.log"
    command = (sys.executable, "-c", CHILD, str(log))
    async with Parent.running(
        parent_settings(tmp_path), 1, environ={"EXIT_CODE": "3"}, command=command
    ) as parent:
        running = asyncio.create_task(parent.run())
        await wait_for(lambda: len(lines(log, "start")) >= 3, timeout=30, what="two restarts")
        parent.stop()
        assert await asyncio.wait_for(running, 30) == 1


async def test_metrics_are_merged_over_every_child_and_probes_need_every_child(
    tmp_path: Path,
) -> None:
    """/metrics sums the children's counters (exited ones too); /healthz asks each child."""
    log = tmp_path / "children.log"
    command = (sys.executable, "-c", CHILD, str(log))
    settings = parent_settings(tmp_path)
    async with Parent.running(settings, 2, environ={}, command=command) as parent:
        running = asyncio.create_task(parent.run())
        await wait_for(lambda: len(lines(log, "start")) == 2, timeout=30, what="two children")
        assert settings.http.port_file is not None
        await wait_for(settings.http.port_file.exists, timeout=30, what="the parent's port")
        base = f"http://127.0.0.1:{settings.http.port_file.read_text()}"
        async with aiohttp.ClientSession() as session:

            async def merged() -> bool:
                async with session.get(f"{base}/metrics") as response:
                    return "stand_in_requests_total 3.0" in await response.text()

            await wait_for(merged, timeout=30, what="1 + 2 counted over both children")
            async with session.get(f"{base}/healthz") as response:
                # The stand-ins serve no HTTP: the parent cannot call them healthy.
                assert response.status == 503
                assert "process 1: no answer" in await response.text()
        parent.stop()
        assert await asyncio.wait_for(running, 30) == 0


def test_each_child_gets_its_own_client_id_member_id_port_file_and_shared_ports() -> None:
    """Children differ where the group and the endpoint need them to; the rest is inherited."""
    settings = Settings(kafka=KafkaSettings(client_id="w", group_instance_id="pod-a"))
    folder = Path("/run/x")
    envs = [child_environment(settings, {"KEEP": "1"}, i, folder) for i in range(3)]
    assert [e["WORKER_KAFKA__CLIENT_ID"] for e in envs] == ["w-0", "w-1", "w-2"]
    assert [e["WORKER_KAFKA__GROUP_INSTANCE_ID"] for e in envs] == ["pod-a-0", "pod-a-1", "pod-a-2"]
    assert len({e["WORKER_HTTP__PORT_FILE"] for e in envs}) == 3
    assert all(e["KEEP"] == "1" and e["WORKER_REST__REUSE_PORT"] == "true" for e in envs)
    assert all(e["PROMETHEUS_MULTIPROC_DIR"] == "/run/x/metrics" for e in envs)
    dynamic = child_environment(Settings(), {}, 0, folder)
    assert "WORKER_KAFKA__GROUP_INSTANCE_ID" not in dynamic


@given(st.text(max_size=30))
def test_processes_is_auto_or_a_bounded_whole_number(text: str) -> None:
    """--processes takes 'auto' or 1..MAX_PROCESSES; anything else is a clear usage error."""
    message = ""
    try:
        value = _processes(text)
    except argparse.ArgumentTypeError as exc:
        message = str(exc)
    if message:
        assert "neither 'auto' nor a whole number" in message
        assert len(message) < 200, "the message never echoes a long argument whole"
    else:
        assert 1 <= value <= MAX_PROCESSES


@pytest.mark.parametrize("text", ["0", "-1", str(MAX_PROCESSES + 1), "1e3", "two", ""])
def test_processes_refuses_what_is_not_a_count(text: str) -> None:
    """Zero, negatives, too many, and words are refused."""
    with pytest.raises(argparse.ArgumentTypeError):
        _processes(text)
