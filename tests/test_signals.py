"""Worker processes stopped by SIGKILL and SIGTERM mid-stream, against the real broker."""

from __future__ import annotations

import signal
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from worker.settings import Settings

from .conftest import (
    WorkerProcess,
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
