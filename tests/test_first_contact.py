"""What a new user runs first: `demo` and `predict` on a fresh broker, before any worker.

The broker is real and the topics are new (as after `make kafka` on a fresh clone): the client
commands wait, bounded, for the worker to create its topics instead of failing on first look.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator

import pytest

from worker.repository import ModelRepository
from worker.settings import Settings

from .conftest import MODELS, ROOT, running_worker, worker_env

WAITING = b"waiting for topics"


class Command:
    """``python -m worker ARGS`` as a child process whose stderr is read as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stderr = b""

    async def wait_for_stderr(self, text: bytes, timeout: float = 60) -> None:
        """Read stderr until ``text`` appears; fail (with what was read) after ``timeout``."""
        assert self.proc.stderr is not None
        try:
            async with asyncio.timeout(timeout):
                while text not in self.stderr:
                    line = await self.proc.stderr.readline()
                    if not line:
                        break
                    self.stderr += line
        except TimeoutError:
            pass
        if text not in self.stderr:
            pytest.fail(f"{text!r} not on stderr: {self.stderr.decode(errors='replace')}")

    async def finish(self, timeout: float) -> tuple[int, str, str]:
        """Exit code, stdout and all of stderr; fail if it does not exit within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                out, err = await self.proc.communicate()
        except TimeoutError:
            self.proc.kill()
            pytest.fail(f"the command did not exit within {timeout:.0f}s")
        return self.proc.returncode or 0, out.decode(), (self.stderr + err).decode()


@contextlib.asynccontextmanager
async def command(settings: Settings, *args: str) -> AsyncIterator[Command]:
    """Start ``python -m worker ARGS`` with ``settings``; killed on exit if still running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", *args, env=worker_env(settings), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield Command(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_demo_waits_for_a_worker_started_after_it(
    settings: Settings, repository: ModelRepository
) -> None:
    """`demo` on topics nobody created yet waits, then reports accuracy once a worker starts."""
    async with command(settings, "demo", "--limit", "40", "--timeout", "120") as demo:
        await demo.wait_for_stderr(WAITING)
        assert demo.proc.returncode is None  # still waiting, not failed
        async with running_worker(settings, repository):
            code, out, err = await demo.finish(timeout=120)
    assert code == 0, err
    assert "digits demo: 40 requests, accuracy" in out
    assert '"level": "error"' not in err, "a new user sees no error lines on a fresh broker"


async def test_predict_gives_up_after_its_timeout_naming_the_missing_topics(
    settings: Settings,
) -> None:
    """With no worker, `predict` waits its --timeout, then exits 1 naming what never appeared."""
    example = str(MODELS / "digits" / "example_request.json")
    args = ("predict", "--model", "digits", "--input", example, "--timeout", "2")
    async with command(settings, *args) as predict:
        code, out, err = await predict.finish(timeout=60)
    assert code == 1
    assert out == ""
    assert settings.kafka.requests_topic in err
    assert settings.kafka.replies_topic in err
    assert "after waiting 2s" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_demo_stops_at_once_on_sigterm_or_ctrl_c(
    settings: Settings, sig: signal.Signals
) -> None:
    """SIGTERM (as PID 1 in a container it must) or Ctrl-C ends a waiting `demo`: one line."""
    async with command(settings, "demo", "--timeout", "600") as demo:
        await demo.wait_for_stderr(WAITING)
        demo.proc.send_signal(sig)
        code, _, err = await demo.finish(timeout=20)
    assert code == 128 + sig
    assert f"stopped by {sig.name}" in err
    assert "Traceback" not in err
