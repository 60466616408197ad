"""A device that fails for good, on the real broker: the worker commits what it answered, exits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from worker.client import InferenceClient
from worker.errors import ReplyTimeoutError
from worker.settings import Settings

from .conftest import WorkerProcess, changed, group_lag, wait_for
from .test_versions import ask

pytestmark = pytest.mark.kafka

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]

STICKY_HANDLER = '''
def preprocess(inputs):
    """Fails as a CUDA device-side assert does on a batch holding a negative pixel."""
    if (inputs["pixels"] < 0).any():
        raise RuntimeError("CUDA error: device-side assert triggered")
    return inputs
'''


async def test_a_lost_device_stops_the_worker_after_committing_what_was_answered(
    settings: Settings,
    repo_dir: Path,
    testset: TestSet,
    worker_processes: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    """A sticky device error: exit status 4; answered records committed, the failed one not."""
    (repo_dir / "digits" / "2" / "handler.py").write_text(STICKY_HANDLER)
    settings = changed(settings, "models", repository=repo_dir, allow_code=True)
    settings = changed(settings, "runtime", commit_interval_ms=600_000)  # only the exit commits
    proc = worker_processes(settings)
    await wait_for(proc.serving, timeout=90, what="the worker to join its group")
    async with InferenceClient(settings.kafka) as client:
        replies = await ask(client, testset[0][:20], version="2")
        assert all(r.error is None for r in replies)
        poison = np.full((1, 64), -1.0, np.float32)
        with contextlib.suppress(ReplyTimeoutError, asyncio.TimeoutError):
            await client.infer("digits", {"pixels": poison}, version="2", timeout=5)
    assert await proc.wait(timeout=60) == 4
    log = await asyncio.to_thread(lambda: next(tmp_path.glob("worker-*.log")).read_text())
    assert "cpu failed and cannot recover (RuntimeError: CUDA error: device-side assert" in log
    assert await group_lag(settings) == 1, "the 20 answered are committed, the failed one is not"
