"""Process mode on the real broker: two children in one group, a child killed, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.settings import Settings

from .conftest import WorkerProcess, publish_digits, reply_counts, reply_reader, wait_for

pytestmark = pytest.mark.kafka

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


class Endpoint:
    """The parent's /metrics, /healthz and /readyz, at the port it wrote to a file."""

    def __init__(self, port_file: Path) -> None:
        self._port_file = port_file

    async def get(self, path: str) -> tuple[int, str]:
        """(status, body) of one probe; (0, reason) while the parent does not answer."""
        try:
            port = int(self._port_file.read_text())
        except (OSError, ValueError):
            return 0, "no port yet"
        async with aiohttp.ClientSession() as session:
            try:
                async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                    return response.status, await response.text()
            except aiohttp.ClientError as exc:
                return 0, repr(exc)

    async def ok(self, path: str) -> bool:
        """True if the probe answers 200."""
        return (await self.get(path))[0] == 200

    async def answered(self, outcome: str = "ok") -> float:
        """Merged ``inference_requests_total`` over models and versions, for one outcome."""
        _, text = await self.get("/metrics")
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "inference_requests_total" and sample.labels["outcome"] == outcome
        )


def children_of(pid: int) -> set[int]:
    """The process ids of a process's children (Linux)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(child) for child in text.split()}


async def started(
    settings: Settings, tmp_path: Path, worker_processes: Callable[..., WorkerProcess]
) -> tuple[WorkerProcess, Endpoint]:
    """``serve --processes 2``, waited for until every child is ready (assigned)."""
    port_file = tmp_path / "parent.port"
    env = {"WORKER_HTTP__PORT_FILE": str(port_file)}
    parent = worker_processes(settings, env, ["--processes", "2"])
    endpoint = Endpoint(port_file)
    await wait_for(lambda: endpoint.ok("/readyz"), timeout=180, what="both children ready")
    return parent, endpoint


async def test_two_processes_share_the_group_and_the_merged_metrics_count_every_reply(
    settings: Settings,
    testset: TestSet,
    tmp_path: Path,
    worker_processes: Callable[..., WorkerProcess],
) -> None:
    """Two children split the partitions; /metrics counts both; SIGTERM drains both, exit 0."""
    parent, endpoint = await started(settings, tmp_path, worker_processes)
    _, ready = await endpoint.get("/readyz")
    assert ready.count("process ") == 2, ready
    assert len(children_of(parent.proc.pid)) == 2
    total = 400
    ids = await publish_digits(settings, testset[0], total, prefix="proc")
    async with reply_reader(settings) as replies:
        await wait_for(
            lambda: set(ids) <= set(reply_counts(replies)), timeout=120, what="every reply"
        )

    # No rebalance while serving (both were ready first): each request counted exactly once,
    # over the two children (the three partitions are split 2 + 1, keys spread over them).
    async def counted() -> bool:
        return await endpoint.answered() == total

    await wait_for(counted, timeout=30, what="400 counted in all")
    parent.signal(signal.SIGTERM)
    assert await parent.wait(timeout=90) == 0
    assert parent.log().count("worker stopped cleanly") == 2, "each child drained and stopped"
    stopped = [
        json.loads(line) for line in parent.log().splitlines() if "worker stopped cleanly" in line
    ]
    assert sorted(line.get("child") for line in stopped) == [0, 1], "each child's lines name it"


async def test_a_killed_child_is_restarted_and_no_request_is_lost(
    settings: Settings,
    testset: TestSet,
    tmp_path: Path,
    worker_processes: Callable[..., WorkerProcess],
) -> None:
    """SIGKILL to one child mid-stream: every id still answered, the child back, healthy."""
    parent, endpoint = await started(settings, tmp_path, worker_processes)
    first = children_of(parent.proc.pid)
    ids = await publish_digits(settings, testset[0], 1500, prefix="kill")
    async with reply_reader(settings) as replies:
        await wait_for(lambda: len(replies) >= 150, timeout=120, what="first replies")
        os.kill(min(first), signal.SIGKILL)
        before = await endpoint.answered()
        # Published after the kill: the stream goes on across it, on every partition.
        ids += await publish_digits(settings, testset[0], 1500, prefix="after")
        await wait_for(
            lambda: set(ids) <= set(reply_counts(replies)), timeout=180, what="every reply"
        )
    await wait_for(
        lambda: len(children_of(parent.proc.pid) - first) == 1, timeout=60, what="a new child"
    )
    await wait_for(lambda: endpoint.ok("/healthz"), timeout=180, what="healthy again")
    # The killed child's counts (as last read, a second before) stay in the merged totals.
    assert await endpoint.answered() >= before
    _, text = await endpoint.get("/metrics")
    assert "inference_process_restarts_total 1.0" in text.splitlines()
    assert "worker process exited; restarting it" in parent.log()
    parent.signal(signal.SIGTERM)
    assert await parent.wait(timeout=90) == 0
