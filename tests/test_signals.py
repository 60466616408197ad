"""Worker processes stopped by SIGKILL and SIGTERM mid-stream, against the real broker."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from worker.settings import Settings

from .conftest import (
    ROOT,
    WorkerProcess,
    changed,
    group_lag,
    publish_digits,
    reply_counts,
    reply_reader,
    settle,
    topic_size,
    wait_for,
)

pytestmark = pytest.mark.kafka

N = 6000
KILL_AFTER = 600

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


async def test_sigkill_mid_stream_then_restart_loses_nothing(
    settings: Settings,
    testset: TestSet,
    worker_processes: Callable[[Settings], WorkerProcess],
) -> None:
    """After SIGKILL mid-stream and a restart, every request is answered (duplicates allowed)."""
    ids = await publish_digits(settings, testset[0], N, prefix="sig")
    async with reply_reader(settings) as replies:
        first = worker_processes(settings)
        await wait_for(lambda: len(replies) >= KILL_AFTER, timeout=120, what="first replies")
        first.signal(signal.SIGKILL)
        assert await first.wait(timeout=30) == -signal.SIGKILL
        answered_before_kill = len(reply_counts(replies))
        assert answered_before_kill < N, "the kill must land mid-stream"

        worker_processes(settings)
        counts = await settle(settings, replies, ids)
    duplicates = sum(counts.values()) - len(counts)
    print(f"SIGKILL: {answered_before_kill} answered before the kill, {duplicates} duplicates")
    assert set(counts) == set(ids)


async def test_sigterm_mid_stream_drains_and_restart_has_no_duplicates(
    settings: Settings,
    testset: TestSet,
    worker_processes: Callable[[Settings], WorkerProcess],
) -> None:
    """SIGTERM: the worker drains, commits, exits 0; a restart answers the rest exactly once."""
    ids = await publish_digits(settings, testset[0], N, prefix="sig")
    async with reply_reader(settings) as replies:
        first = worker_processes(settings)
        await wait_for(lambda: len(replies) >= KILL_AFTER, timeout=120, what="first replies")
        first.signal(signal.SIGTERM)
        assert await first.wait(timeout=60) == 0

        async def all_read() -> bool:
            return len(replies) == await topic_size(settings, settings.kafka.replies_topic)

        await wait_for(all_read, timeout=60, what="the stopped worker's replies")
        answered_before_stop = len(replies)
        assert answered_before_stop < N, "the stop must land mid-stream"
        assert await group_lag(settings) == N - answered_before_stop, (
            "a drained worker commits exactly what it answered"
        )

        worker_processes(settings)
        counts = await settle(settings, replies, ids)
    duplicates = {k: v for k, v in counts.items() if v > 1}
    assert set(counts) == set(ids)
    assert duplicates == {}


HANGING_MODEL = """
import os
import threading
from pathlib import Path

import worker.model

_upload = worker.model.LoadedModel.upload


def upload(self, inputs):
    if any((array == -7.0).any() for array in inputs.values()):
        Path(os.environ["TEST_HANG_MARKER"]).touch()
        threading.Event().wait()  # stuck forever, as a deadlocked model would be
    return _upload(self, inputs)


worker.model.LoadedModel.upload = upload
"""


def hanging_model_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a worker process whose model hangs on a pixel of -7 (HANGING_MODEL)."""
    (tmp_path / "sitecustomize.py").write_text(HANGING_MODEL)
    return {
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
        "TEST_HANG_MARKER": str(tmp_path / "stuck"),
    }


async def hang_one_request(settings: Settings, testset: TestSet, tmp_path: Path) -> None:
    """Publish a request with the hanging pixel; return once the model call hangs on it."""
    stuck = testset[0][:1].copy()
    stuck[0, 0] = -7.0
    await publish_digits(settings, stuck, 1, prefix="stuck")
    await wait_for((tmp_path / "stuck").exists, timeout=30, what="the model call to hang")


async def test_sigterm_with_a_stuck_model_exits_after_the_shutdown_timeout(
    settings: Settings,
    testset: TestSet,
    tmp_path: Path,
    worker_processes: Callable[..., WorkerProcess],
) -> None:
    """A model call that never returns: SIGTERM ends the process soon after the drain timeout."""
    settings = changed(settings, "runtime", shutdown_timeout_s=2.0, watchdog_timeout_s=0)
    ids = await publish_digits(settings, testset[0], 20, prefix="before")
    async with reply_reader(settings) as replies:
        process = worker_processes(settings, hanging_model_env(tmp_path))
        await wait_for(lambda: len(replies) >= len(ids), timeout=90, what="the first replies")
        await hang_one_request(settings, testset, tmp_path)
        process.signal(signal.SIGTERM)
        started = time.monotonic()
        code = await process.wait(timeout=30)
        took = time.monotonic() - started
    assert code == 1
    assert took < 2.0 + 10, f"exited {took:.1f}s after SIGTERM"
    assert await group_lag(settings) == 1, "what was answered is committed; the stuck one is not"


async def test_a_stuck_model_makes_the_watchdog_exit_with_status_3(
    settings: Settings,
    testset: TestSet,
    tmp_path: Path,
    worker_processes: Callable[..., WorkerProcess],
) -> None:
    """With a model call that never returns, the process exits 3 after the watchdog timeout."""
    settings = changed(settings, "runtime", watchdog_timeout_s=2.0)
    process = worker_processes(settings, hanging_model_env(tmp_path))
    await wait_for(process.serving, timeout=90, what="the worker to join")
    started = time.monotonic()  # before the request: the watchdog counts from its hang
    await hang_one_request(settings, testset, tmp_path)
    assert await process.wait(timeout=30) == 3
    assert time.monotonic() - started >= 1.0, "not before the watchdog timeout"
    assert await group_lag(settings) == 1, "the unanswered request is not committed"
