"""Process mode's parent (worker.processes) with stand-in children: restarts, stop, metrics."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.cli import MAX_PROCESSES, _processes
from worker.errors import ConfigError
from worker.processes import Parent, child_environment
from worker.settings import HttpSettings, KafkaSettings, Settings

from .conftest import wait_for

# A stand-in child: notes its start, counts its index + 1 in a counter it serves on /metrics
# (every path: /healthz too) at a port it writes where the parent looks, then exits with
# EXIT_CODE at once, or (unset) waits for SIGTERM, notes it and exits 0.
CHILD = """
import os, signal, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from prometheus_client import Counter, Gauge, generate_latest
log = Path(sys.argv[1])
index = int(os.environ["WORKER_KAFKA__CLIENT_ID"].rsplit("-", 1)[1])
stopped = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stopped.set())
with log.open("a") as f:
    f.write(f"start {index} {os.getpid()} {os.environ.get('WORKER_MODELS__TORCH_THREADS')}\\n")
Counter("stand_in_requests", "requests").inc(index + 1)
Gauge("stand_in_busy", "now").set(10)
if "WIDE" in os.environ:  # an exposition of some 300 KB: read whole, however it arrives
    wide = Counter("stand_in_wide", "many series", ["n"])
    for n in range(4000):
        wide.labels(str(n)).inc()
if "EXIT_CODE" in os.environ:
    sys.exit(int(os.environ["EXIT_CODE"]))
class Handler(BaseHTTPRequestHandler):  # /metrics on every path, sent in 8 KB pieces
    def do_GET(self):
        body = generate_latest()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for start in range(0, len(body), 8192):
            self.wfile.write(body[start:start + 8192])
            self.wfile.flush()
            time.sleep(0.0005)
    def log_message(self, *_):
        pass
server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
Path(os.environ["WORKER_HTTP__PORT_FILE"]).write_text(str(server.server_port))
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


async def test_a_child_that_exits_is_started_again_until_the_parent_stops(
    tmp_path: Path,
) -> None:
    """A child exiting on its own (status 3: the watchdog's) is restarted, with backoff."""
    log = tmp_path / "children.log"
    command = (sys.executable, "-c", CHILD, str(log))
    async with Parent.running(
        parent_settings(tmp_path), 1, environ={"EXIT_CODE": "3"}, command=command
    ) as parent:
        running = asyncio.create_task(parent.run())
        await wait_for(lambda: len(lines(log, "start")) >= 3, timeout=30, what="two restarts")
        parent.stop()
        await asyncio.wait_for(running, 30)


async def test_a_child_exiting_with_a_config_error_stops_the_parent_with_status_2(
    tmp_path: Path,
) -> None:
    """Exit status 2 (invalid settings) would recur on every restart: the parent gives up."""
    log = tmp_path / "children.log"
    command = (sys.executable, "-c", CHILD, str(log))
    async with Parent.running(
        parent_settings(tmp_path), 2, environ={"EXIT_CODE": "2"}, command=command
    ) as parent:
        assert await asyncio.wait_for(parent.run(), 30) == 2
    assert len(lines(log, "start")) <= 2, "never restarted"


async def scrape(base: str, path: str) -> tuple[int, str]:
    """(status, text) of one of the parent's paths."""
    async with aiohttp.ClientSession() as session, session.get(f"{base}{path}") as response:
        return response.status, await response.text()


async def test_metrics_are_merged_over_every_child_and_a_restarted_childs_counts_stay(
    tmp_path: Path,
) -> None:
    """/metrics sums the children's (a killed child's counts kept); probes need every child."""
    log = tmp_path / "children.log"
    command = (sys.executable, "-c", CHILD, str(log))
    settings = parent_settings(tmp_path)
    async with Parent.running(settings, 2, environ={}, command=command) as parent:
        running = asyncio.create_task(parent.run())
        assert settings.http.port_file is not None
        await wait_for(settings.http.port_file.exists, timeout=30, what="the parent's port")
        base = f"http://127.0.0.1:{settings.http.port_file.read_text()}"

        async def shows(*wanted: str) -> bool:
            text = (await scrape(base, "/metrics"))[1]
            return all(line in text.splitlines() for line in wanted)

        await wait_for(lambda: shows("stand_in_requests_total 3.0", "stand_in_busy 20.0"),
                       timeout=30, what="1 + 2 counted, 10 + 10 busy")  # fmt: skip

        async def healthy() -> bool:  # each child asked within 1.5 s: a loaded machine may miss
            return (await scrape(base, "/healthz"))[0] == 200

        await wait_for(healthy, timeout=30, what="every child answering /healthz")
        assert (await scrape(base, "/healthz"))[1].count("process ") == 2
        victim = int(lines(log, "start 1")[0].split()[2])
        os.kill(victim, signal.SIGKILL)
        await wait_for(lambda: len(lines(log, "start 1")) == 2, timeout=30, what="a restart")
        # The new child 1 counts 2 again; the killed one's 2 stay: 1 + 2 + 2. Busy: the living.
        await wait_for(
            lambda: shows("stand_in_requests_total 5.0", "stand_in_busy 20.0",
                          "inference_process_restarts_total 1.0"),
            timeout=30, what="the killed child's counts kept",
        )  # fmt: skip
        parent.stop()
        assert await asyncio.wait_for(running, 30) == 0


def test_each_child_gets_its_own_client_id_member_id_port_file_and_shared_ports() -> None:
    """Children differ where the group and the endpoint need them to; the rest is inherited."""
    settings = Settings(kafka=KafkaSettings(client_id="w", group_instance_id="pod-a"))
    folder = Path("/run/x")
    envs = [child_environment(settings, {"KEEP": "1"}, i, folder) for i in range(3)]
    assert [e["WORKER_KAFKA__CLIENT_ID"] for e in envs] == ["w-0", "w-1", "w-2"]
    assert [e["WORKER_LOG__CHILD"] for e in envs] == ["0", "1", "2"], "their log lines say which"
    assert [e["WORKER_KAFKA__GROUP_INSTANCE_ID"] for e in envs] == ["pod-a-0", "pod-a-1", "pod-a-2"]
    assert len({e["WORKER_HTTP__PORT_FILE"] for e in envs}) == 3
    assert all(e["KEEP"] == "1" and e["WORKER_REST__REUSE_PORT"] == "true" for e in envs)
    assert all(int(e["WORKER_MODELS__TORCH_THREADS"]) >= 1 for e in envs)
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


def test_a_member_id_too_long_for_its_suffixes_is_refused_before_any_child_starts(
    tmp_path: Path,
) -> None:
    """Static ids get '-<n>' per child: one that would pass the 249-character limit is refused."""
    settings = Settings(kafka=KafkaSettings(group_instance_id="a" * 247))
    Parent(settings, 10, tmp_path, environ={})  # "-9" fits: 249
    with pytest.raises(ConfigError, match="too long for 11 processes"):
        Parent(settings, 11, tmp_path, environ={})  # "-10" does not


PARENT = """
import asyncio, sys
from pathlib import Path
from worker.processes import Parent
from worker.settings import HttpSettings, Settings
async def main():
    settings = Settings(http=HttpSettings(enabled=False))
    command = (sys.executable, "-c", sys.argv[2], sys.argv[1])
    async with Parent.running(settings, 2, environ={}, command=command) as parent:
        await parent.run()
asyncio.run(main())
"""


async def test_children_drain_when_their_parent_is_killed(tmp_path: Path) -> None:
    """SIGKILL to the parent: each child gets SIGTERM (PR_SET_PDEATHSIG) and drains."""
    log = tmp_path / "children.log"
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PARENT, str(log), CHILD, cwd=Path(__file__).parent.parent
    )
    try:
        await wait_for(lambda: len(lines(log, "start")) == 2, timeout=30, what="two children")
        parent.kill()
        await parent.wait()
        await wait_for(lambda: len(lines(log, "drained")) == 2, timeout=30, what="both drained")
    finally:
        if parent.returncode is None:
            parent.kill()


async def test_a_large_exposition_is_read_whole_and_merged(tmp_path: Path) -> None:
    """Children's /metrics of some 300 KB each: every series merged, none cut off."""
    log = tmp_path / "children.log"
    command = (sys.executable, "-c", CHILD, str(log))
    settings = parent_settings(tmp_path)
    async with Parent.running(settings, 2, environ={"WIDE": "1"}, command=command) as parent:
        running = asyncio.create_task(parent.run())
        assert settings.http.port_file is not None
        await wait_for(settings.http.port_file.exists, timeout=30, what="the parent's port")
        base = f"http://127.0.0.1:{settings.http.port_file.read_text()}"

        async def whole() -> bool:
            text = (await scrape(base, "/metrics"))[1].splitlines()
            wide = [line for line in text if line.startswith("stand_in_wide_total{")]
            return len(wide) == 4000 and all(line.endswith(" 2.0") for line in wide)

        await wait_for(whole, timeout=60, what="4,000 series, each counted by both children")
        parent.stop()
        assert await asyncio.wait_for(running, 30) == 0
