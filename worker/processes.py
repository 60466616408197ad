"""Process mode: ``python -m worker serve --processes N`` runs N workers under one parent.

One Python process uses about one core for Kafka work (decoding, batching, replies: the event
loop), however many the machine has. Process mode runs N full workers (each its own consumer,
producer, lanes and models) in one consumer group, so a machine's cores are used. The parent
loads no model and reads no record; it

- starts the children (``python -m worker serve`` with the parent's environment, plus: a
  client id, and a static member id when one is set, made unique per child (``-0``, ``-1``...);
  torch threads shared out when left to the default; the HTTP endpoint on 127.0.0.1 at a free
  port, which the child writes to a file here). A child gets SIGTERM if the parent dies;
- restarts a child that exits while the parent is serving, after a backoff that doubles from
  :data:`BACKOFF_S` to :data:`BACKOFF_MAX_S` (back to the start once a child ran
  :data:`STEADY_S`); the group gives its partitions to the others meanwhile. A child that
  exits with status 2 (its settings are invalid) stops the parent: every restart would too;
- forwards SIGTERM/SIGINT to every child (each drains and commits, as alone), waits for them
  (``shutdown_timeout_s`` plus :data:`GRACE_S`, then SIGKILL) and exits 0 only if all did;
- serves one endpoint at ``WORKER_HTTP__*``: ``/metrics`` merged from every child's
  (:mod:`worker.merging`, read every :data:`SCRAPE_S`: counters and histograms of children
  that exited kept, gauges of the living summed; plus ``inference_process_restarts_total``),
  ``/healthz`` 200 only while every child runs and answers its own as healthy, ``/readyz``
  200 only when every child is ready (children asked at once, :data:`PROBE_TIMEOUT_S` each);
- has every child serve REST and gRPC on the same port (SO_REUSEPORT spreads connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import structlog

from worker.errors import ConfigError
from worker.http import Probes, serve_http
from worker.merging import Snapshot, lasting, merge, parse, render
from worker.settings import Settings

__all__ = [
    "BACKOFF_MAX_S", "BACKOFF_S", "CONFIG_EXIT", "GRACE_S", "MAX_METRICS_BYTES", "PROBE_TIMEOUT_S",
    "SCRAPE_S", "STEADY_S", "Parent", "available_cores", "child_environment",
]  # fmt: skip

log = structlog.get_logger(__name__)

BACKOFF_S = 0.5
"""The first wait before a child that exited is started again."""
BACKOFF_MAX_S = 30.0
"""The longest wait between restarts of a child that keeps exiting."""
STEADY_S = 60.0
"""A child that ran this long before exiting is restarted after the first backoff again."""
GRACE_S = 10.0
"""Beyond ``shutdown_timeout_s``: how long children may take to drain before SIGKILL."""
PROBE_TIMEOUT_S = 1.5
"""How long the parent waits for a child's probe or metrics (children are asked at once)."""
SCRAPE_S = 1.0
"""How often the parent reads its children's metrics."""
MAX_METRICS_BYTES = 16 * 1024 * 1024
"""The most of a child's ``/metrics`` the parent reads."""
CONFIG_EXIT = ConfigError.exit_code
"""``serve``'s exit status for a configuration error (:func:`worker.cli.main`)."""
_MEMBER_ID_MAX = 249


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, within a cgroup v2 CPU quota if any."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def child_environment(
    settings: Settings, environ: Mapping[str, str], index: int, folder: Path, processes: int = 1
) -> dict[str, str]:
    """The environment of child ``index``: the parent's, made unique where children differ."""
    env = dict(environ)
    env |= {
        "WORKER_HTTP__ENABLED": "true",
        "WORKER_HTTP__HOST": "127.0.0.1",
        "WORKER_HTTP__PORT": "0",
        "WORKER_HTTP__PORT_FILE": str(folder / f"child-{index}.port"),
        "WORKER_KAFKA__CLIENT_ID": f"{settings.kafka.client_id}-{index}",
        "WORKER_LOG__CHILD": str(index),
        "WORKER_REST__REUSE_PORT": "true",
        "WORKER_GRPC__REUSE_PORT": "true",
    }
    member = settings.kafka.group_instance_id
    if member is not None:
        env["WORKER_KAFKA__GROUP_INSTANCE_ID"] = f"{member}-{index}"
    if settings.models.torch_threads == 0:  # the default, a thread per core: share them out
        env["WORKER_MODELS__TORCH_THREADS"] = str(max(1, available_cores() // processes - 1))
    return env


def _prctl() -> Callable[..., int] | None:
    """The C library's prctl, looked up before any fork (nothing loads between fork and exec)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _prctl()


def _die_with(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: SIGTERM the child when ``parent`` dies (it then drains and stops)."""

    def arrange() -> None:  # pragma: no cover - runs in the child between fork and exec
        if _PRCTL is not None:
            _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before that: stop now
            os.kill(os.getpid(), signal.SIGTERM)

    return arrange


@dataclass
class _Child:
    index: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    failures: int = 0
    exits: list[int] = field(default_factory=list)
    metrics: str | None = None
    """Its ``/metrics`` as last read (parsed only when asked for, off the event loop)."""


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
        member = settings.kafka.group_instance_id
        if member is not None and len(f"{member}-{processes - 1}") > _MEMBER_ID_MAX:
            raise ConfigError(
                f"WORKER_KAFKA__GROUP_INSTANCE_ID is too long for {processes} processes: each "
                f"child's gets '-<n>' appended, and at most {_MEMBER_ID_MAX} characters are valid"
            )
        self._settings = settings
        self._environ = environ
        self._command = command
        self._children = [_Child(i) for i in range(processes)]
        self._folder = folder
        self._stopping = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._gone: Snapshot = Snapshot()
        """What children that exited had counted (counters, histograms)."""
        self._restarts = 0
        self._fatal: int | None = None

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
        """A parent with a private folder (its children's port files) removed on exit.

        ``environ`` is passed on to the children (the secrets folder and the like included);
        ``command`` starts one (a seam for tests).
        """
        with tempfile.TemporaryDirectory(prefix="worker-processes-") as folder:
            yield cls(settings, processes, Path(folder), environ=environ, command=command)

    def stop(self) -> None:
        """Begin stopping: every child is sent SIGTERM, none is restarted."""
        self._stopping.set()

    def reload(self) -> None:
        """SIGHUP: every serving child reloads its model repository.

        One still starting up loads the repository as it is anyway (and would die of a SIGHUP
        before its handler is in place).
        """
        for child in self._children:
            if self._running(child) and self._port_file(child).exists():
                assert child.process is not None
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGHUP)

    async def run(self) -> int:
        """Serve until stopped: 0 if every child stopped cleanly, 2 on a child's config error."""
        try:
            await self._run()
        finally:  # the parent failing: each child still running drains and stops on its own
            for child in self._children:
                if self._running(child):
                    assert child.process is not None
                    with contextlib.suppress(ProcessLookupError):
                        child.process.send_signal(signal.SIGTERM)
        exits = {c.index: c.exits[-1] for c in self._children if c.exits}
        log.info("worker processes stopped", exit_codes=exits)
        if self._fatal is not None:
            return self._fatal
        return 0 if all(code == 0 for code in exits.values()) else 1

    async def _run(self) -> None:
        http = self._settings.http
        async with contextlib.AsyncExitStack() as stack:
            self._session = await stack.enter_async_context(aiohttp.ClientSession())
            if http.enabled:
                probes = Probes(self._metrics, self._healthy_now, self._ready_now)
                port = await stack.enter_async_context(serve_http(probes, http))
                log.info("process mode", processes=len(self._children), http_port=port)
            async with asyncio.TaskGroup() as group:
                scraping = group.create_task(self._scrape_loop())
                async with asyncio.TaskGroup() as children:
                    for child in self._children:
                        children.create_task(self._keep(child))
                scraping.cancel()

    async def _keep(self, child: _Child) -> None:
        """Run one child, restarting it with backoff, until stopping; then stop it."""
        while not self._stopping.is_set():
            try:
                await self._start(child)
            except OSError as exc:  # fork or exec failed (a pid limit, say): try again later
                log.error("worker process could not be started", child=child.index,  # noqa: TRY400 - the reason is the message
                          error=repr(exc)[:300])  # fmt: skip
                code = -1
                child.exits.append(code)
            else:
                exited = await self._until_exit(child)
                if exited is None:
                    return
                code = exited
                await self._exited(child, code)
                if self._stopping.is_set():
                    return
                if code == CONFIG_EXIT:
                    log.error("worker process exited: its settings are invalid; stopping all",
                              child=child.index)  # fmt: skip
                    self._fatal = CONFIG_EXIT
                    self.stop()
                    return
            ran = time.monotonic() - child.started
            child.failures = 1 if ran >= STEADY_S else child.failures + 1
            wait = min(BACKOFF_S * 2 ** (child.failures - 1), BACKOFF_MAX_S)
            self._restarts += 1
            log.error("worker process exited; restarting it", child=child.index,
                      exit_code=code, ran_s=round(ran, 1), restart_in_s=wait)  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)

    async def _start(self, child: _Child) -> None:
        processes = len(self._children)
        env = child_environment(self._settings, self._environ, child.index, self._folder, processes)
        self._port_file(child).unlink(missing_ok=True)
        child.started = time.monotonic()
        child.process = await asyncio.create_subprocess_exec(
            *self._command, env=env, preexec_fn=_die_with(os.getpid())
        )
        log.info("worker process started", child=child.index, pid=child.process.pid)

    async def _until_exit(self, child: _Child) -> int | None:
        """The child's exit status; or, when stopping comes first, stop it and None."""
        assert child.process is not None
        async with asyncio.TaskGroup() as group:
            exited = group.create_task(child.process.wait())
            stopping = group.create_task(self._stopping.wait())
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if exited.done():
                return exited.result()
            code = await self._terminate(child, exited)
        await self._exited(child, code)
        return None

    async def _terminate(self, child: _Child, exited: asyncio.Task[int]) -> int:
        """SIGTERM, a bounded wait for the drain, SIGKILL past it; the exit status."""
        assert child.process is not None
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(signal.SIGTERM)
        bound = self._settings.runtime.shutdown_timeout_s + GRACE_S
        await asyncio.wait({exited}, timeout=bound)
        if not exited.done():
            with contextlib.suppress(ProcessLookupError):
                child.process.kill()
            log.warning("worker process did not stop in time; killed", child=child.index)
        code = await exited
        # Ended by this SIGTERM (or a terminal's SIGINT) before its handlers were in place: it
        # had fetched nothing.
        return 0 if code in (-signal.SIGTERM, -signal.SIGINT) else code

    async def _exited(self, child: _Child, code: int) -> None:
        child.exits.append(code)
        text, child.metrics = child.metrics, None
        if text is not None:  # its counts stay in the merged totals
            try:
                gone = lasting(await asyncio.to_thread(parse, text))
            except ValueError as exc:
                log.warning("a worker process's last metrics could not be read",
                            child=child.index, error=repr(exc)[:300])  # fmt: skip
            else:
                self._gone = merge([self._gone, gone])

    def _running(self, child: _Child) -> bool:
        return child.process is not None and child.process.returncode is None

    def _port_file(self, child: _Child) -> Path:  # as child_environment names it
        return self._folder / f"child-{child.index}.port"

    async def _metrics(self) -> bytes:
        """Every child's metrics merged (parsed in a thread: large texts take a while)."""
        texts = [c.metrics for c in self._children if c.metrics is not None]
        return await asyncio.to_thread(_merged, self._gone, texts, self._restarts)

    async def _scrape_loop(self) -> None:
        """Read every running child's metrics every :data:`SCRAPE_S`."""
        while True:
            async with asyncio.TaskGroup() as group:
                for child in self._children:
                    group.create_task(self._scrape(child))
            await asyncio.sleep(SCRAPE_S)

    async def _scrape(self, child: _Child) -> None:
        status, text = await self._get(child, "metrics", MAX_METRICS_BYTES)
        if status == 200 and self._running(child):  # noqa: PLR2004 - HTTP OK
            child.metrics = text

    async def _healthy_now(self) -> tuple[bool, str]:
        return await self._ask("healthz")

    async def _ready_now(self) -> tuple[bool, str]:
        return await self._ask("readyz")

    async def _ask(self, probe: str) -> tuple[bool, str]:
        """Every child's answer to ``probe``, asked at once: ok only if all are ok."""
        async with asyncio.TaskGroup() as group:
            asked = [group.create_task(self._get(c, probe, 1000)) for c in self._children]
        answers = [task.result() for task in asked]
        ok = all(status == 200 for status, _ in answers)  # noqa: PLR2004 - HTTP OK
        lines = [f"process {i}: {text.strip()}" for i, (_, text) in enumerate(answers)]
        return ok, "\n".join(lines)

    async def _get(self, child: _Child, path: str, limit: int) -> tuple[int, str]:
        """(status, text) of a child's endpoint; (0, why) if it does not answer."""
        if not self._running(child):
            return 0, "not running (restarting)"
        try:
            port = int(self._port_file(child).read_text())
        except (OSError, ValueError):
            return 0, "starting"
        assert self._session is not None
        url = f"http://127.0.0.1:{port}/{path}"
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S), self._session.get(url) as response:
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > limit and path == "metrics":  # never a part of it
                        return 0, f"metrics over {limit} bytes"
                    if len(body) > limit:  # a probe's status says it; its text is shown cut
                        break
                return response.status, body[:limit].decode("utf-8", "replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 0, f"no answer ({type(exc).__name__})"


def _merged(gone: Snapshot, texts: list[str], restarts: int) -> bytes:
    """The children's metrics (``gone``: of those that exited) merged, with the restarts."""
    living = []
    for text in texts:
        try:
            living.append(parse(text))
        except ValueError as exc:  # that child's are left out this time
            log.warning("a worker process's metrics could not be read", error=repr(exc)[:300])
    name = "inference_process_restarts"
    counted = Snapshot(
        {name: ("counter", "Worker processes restarted by the parent")},
        {(name, f"{name}_total", ()): float(restarts)},
    )
    return render(merge([gone, *living, counted]))
