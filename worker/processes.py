"""Process mode: ``python -m worker serve --processes N`` runs N workers under one parent.

One Python process uses about one core for Kafka work (decoding, batching, replies: the event
loop), however many the machine has. Process mode runs N full workers (each its own consumer,
producer, lanes and models) in one consumer group, so a machine's cores are used. The parent
loads no model and reads no record; it

- starts the children (``python -m worker serve`` with this process's environment, plus: a
  client id, and a static member id when one is set, made unique per child (``-0``, ``-1``...);
  the HTTP endpoint on 127.0.0.1 at a free port, which the child writes to a file here);
- restarts a child that exits while the parent is serving, after a backoff that doubles from
  :data:`BACKOFF_S` to :data:`BACKOFF_MAX_S` (back to the start once a child ran
  :data:`STEADY_S`); the group gives its partitions to the others meanwhile;
- forwards SIGTERM/SIGINT to every child (each drains and commits, as alone), waits for them
  (``shutdown_timeout_s`` plus :data:`GRACE_S`, then SIGKILL) and exits 0 only if all did;
- serves one endpoint at ``WORKER_HTTP__*``: ``/metrics`` merged from every child's, counts of
  children that exited included (prometheus-client's multiprocess mode: each child writes its
  samples to files in a folder the parent reads; gauges are summed over live children),
  ``/healthz`` 200 only while every child runs and answers its own as healthy, ``/readyz``
  200 only when every child is ready.

REST and gRPC: each child serves them on the same port (SO_REUSEPORT; the kernel spreads
connections over the children).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from worker.http import Probes, serve_http
from worker.settings import Settings

__all__ = ["BACKOFF_MAX_S", "BACKOFF_S", "GRACE_S", "STEADY_S", "Parent", "child_environment"]

log = structlog.get_logger(__name__)

BACKOFF_S = 0.5
"""The first wait before a child that exited is started again."""
BACKOFF_MAX_S = 30.0
"""The longest wait between restarts of a child that keeps exiting."""
STEADY_S = 60.0
"""A child that ran this long before exiting is restarted after the first backoff again."""
GRACE_S = 10.0
"""Beyond ``shutdown_timeout_s``: how long children may take to drain before SIGKILL."""
PROBE_TIMEOUT_S = 2.0
"""How long the parent's probes wait for a child's answer."""


def child_environment(
    settings: Settings, environ: Mapping[str, str], index: int, folder: Path
) -> dict[str, str]:
    """The environment of child ``index``: the parent's, made unique where children differ."""
    env = dict(environ)
    env |= {
        "PROMETHEUS_MULTIPROC_DIR": str(folder / "metrics"),
        "WORKER_HTTP__ENABLED": "true",
        "WORKER_HTTP__HOST": "127.0.0.1",
        "WORKER_HTTP__PORT": "0",
        "WORKER_HTTP__PORT_FILE": str(folder / f"child-{index}.port"),
        "WORKER_KAFKA__CLIENT_ID": f"{settings.kafka.client_id}-{index}",
        "WORKER_REST__REUSE_PORT": "true",
        "WORKER_GRPC__REUSE_PORT": "true",
    }
    member = settings.kafka.group_instance_id
    if member is not None:
        env["WORKER_KAFKA__GROUP_INSTANCE_ID"] = f"{member}-{index}"
    return env


@dataclass
class _Child:
    index: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    failures: int = 0
    exits: list[int] = field(default_factory=list)


class Parent:
    """N worker processes in one group, one endpoint for all (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        processes: int,
        folder: Path,
        *,
        environ: Mapping[str, str],
        command: Sequence[str] = (sys.executable, "-m", "worker", "serve"),
    ) -> None:
        self._settings = settings
        self._environ = environ
        self._command = command
        self._children = [_Child(i) for i in range(processes)]
        self._folder = folder
        (folder / "metrics").mkdir(parents=True, exist_ok=True)
        self._stopping = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls,
        settings: Settings,
        processes: int,
        *,
        environ: Mapping[str, str],
        command: Sequence[str] = (sys.executable, "-m", "worker", "serve"),
    ) -> AsyncIterator[Parent]:
        """A parent with a private folder (port files, metrics) removed on exit.

        ``environ`` is passed on to the children (the secrets folder and the like included);
        ``command`` starts one (a seam for tests).
        """
        with tempfile.TemporaryDirectory(prefix="worker-processes-") as folder:
            yield cls(settings, processes, Path(folder), environ=environ, command=command)

    def stop(self) -> None:
        """Begin stopping: every child is sent SIGTERM, none is restarted."""
        self._stopping.set()

    def reload(self) -> None:
        """SIGHUP: every running child reloads its model repository."""
        for child in self._children:
            if child.process is not None and child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGHUP)

    @property
    def pids(self) -> list[int]:
        """The running children's process ids."""
        return [c.process.pid for c in self._children if c.process and c.process.returncode is None]

    async def run(self) -> int:
        """Serve until stopped; 0 if every child stopped cleanly."""
        http = self._settings.http
        async with contextlib.AsyncExitStack() as stack:
            self._session = await stack.enter_async_context(aiohttp.ClientSession())
            if http.enabled:
                probes = Probes(self._metrics, self._healthy_now, self._ready_now)
                port = await stack.enter_async_context(serve_http(probes, http))
                log.info("process mode", processes=len(self._children), http_port=port)
            try:
                async with asyncio.TaskGroup() as group:
                    for child in self._children:
                        group.create_task(self._keep(child))
            finally:  # the parent failing: no child is left behind
                for child in self._children:
                    if child.process is not None and child.process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            child.process.kill()
        return 0 if all(c.exits[-1:] in ([0], []) for c in self._children) else 1

    async def _keep(self, child: _Child) -> None:
        """Run one child, restarting it with backoff, until stopping; then stop it."""
        while not self._stopping.is_set():
            await self._start(child)
            assert child.process is not None
            exited = asyncio.ensure_future(child.process.wait())
            stopping = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
            if not exited.done():
                await self._terminate(child, exited)
                return
            code = exited.result()
            self._gone(child, code)
            ran = time.monotonic() - child.started
            child.failures = 1 if ran >= STEADY_S else child.failures + 1
            wait = min(BACKOFF_S * 2 ** (child.failures - 1), BACKOFF_MAX_S)
            log.error("worker process exited; restarting it", child=child.index,
                      exit_code=code, ran_s=round(ran, 1), restart_in_s=wait)  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)

    async def _start(self, child: _Child) -> None:
        env = child_environment(self._settings, self._environ, child.index, self._folder)
        (self._folder / f"child-{child.index}.port").unlink(missing_ok=True)
        child.process = await asyncio.create_subprocess_exec(*self._command, env=env)
        child.started = time.monotonic()
        log.info("worker process started", child=child.index, pid=child.process.pid)

    async def _terminate(self, child: _Child, exited: asyncio.Future[int]) -> None:
        """SIGTERM, a bounded wait for the drain, SIGKILL past it."""
        assert child.process is not None
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(signal.SIGTERM)
        bound = self._settings.runtime.shutdown_timeout_s + GRACE_S
        try:
            code = await asyncio.wait_for(asyncio.shield(exited), bound)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                child.process.kill()
            code = await exited
            log.warning("worker process did not stop in time; killed", child=child.index)
        self._gone(child, code)

    def _gone(self, child: _Child, code: int) -> None:
        child.exits.append(code)
        assert child.process is not None
        multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
            child.process.pid, str(self._folder / "metrics")
        )

    def _metrics(self) -> bytes:
        registry = CollectorRegistry()
        folder = str(self._folder / "metrics")
        multiprocess.MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    async def _healthy_now(self) -> tuple[bool, str]:
        return await self._ask("healthz")

    async def _ready_now(self) -> tuple[bool, str]:
        return await self._ask("readyz")

    async def _ask(self, probe: str) -> tuple[bool, str]:
        """Every child's answer to ``probe``: ok only if all are ok; a line per child."""
        lines, ok = [], True
        for child in self._children:
            answer = await self._ask_child(child, probe)
            ok = ok and answer[0]
            lines.append(f"process {child.index}: {answer[1]}")
        return ok, "\n".join(lines)

    async def _ask_child(self, child: _Child, probe: str) -> tuple[bool, str]:
        process = child.process
        if process is None or process.returncode is not None:
            return False, "not running (restarting)"
        try:
            port = int((self._folder / f"child-{child.index}.port").read_text())
        except (OSError, ValueError):
            return False, "starting"
        assert self._session is not None
        url = f"http://127.0.0.1:{port}/{probe}"
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S), self._session.get(url) as response:
                text = (await response.content.read(1000)).decode("utf-8", "replace").strip()
                return response.status == 200, text  # noqa: PLR2004 - HTTP OK
        except (aiohttp.ClientError, TimeoutError) as exc:
            return False, f"no answer ({type(exc).__name__})"
