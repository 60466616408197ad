"""The worker's HTTP endpoint: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

- ``/healthz`` (liveness) answers 200 while the event loop runs (this handler runs on it) and
  the watchdog is content; 503 once the worker has had work without progress for longer than
  the watchdog timeout.
- ``/readyz`` (readiness) answers 200 once the models are loaded and the consumer has joined
  its group and received its assignment (possibly empty, when there are more workers than
  partitions); 503 before that and while stopping.

Served with aiohttp on the worker's own event loop: if the loop is blocked, probes time out.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from worker.endpoint_settings import HttpSettings
from worker.errors import ConfigError

__all__ = ["Check", "Probes", "serve_http"]


Check = Callable[[], tuple[bool, str] | Awaitable[tuple[bool, str]]]
"""A probe: (ok, detail), at once or awaited (process mode asks its children)."""


@dataclass(frozen=True)
class Probes:
    """What the endpoint asks the worker."""

    metrics: Callable[[], bytes | Awaitable[bytes]]
    healthy: Check
    ready: Check


async def _status(check: Check) -> web.Response:
    outcome = check()
    ok, detail = await outcome if inspect.isawaitable(outcome) else outcome
    return web.Response(status=200 if ok else 503, text=detail + "\n")


@contextlib.asynccontextmanager
async def serve_http(probes: Probes, settings: HttpSettings) -> AsyncIterator[int]:
    """Serve the endpoint while the context is open; yields the bound port (``port=0``: any).

    With ``port_file`` set, the bound port is written there (process mode reads its children's).
    """
    host, port = settings.host, settings.port

    async def metrics(_: web.Request) -> web.Response:
        body = probes.metrics()
        body = await body if inspect.isawaitable(body) else body
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return await _status(probes.healthy)

    async def readyz(_: web.Request) -> web.Response:
        return await _status(probes.ready)

    app = web.Application()
    app.add_routes(
        [web.get("/metrics", metrics), web.get("/healthz", healthz), web.get("/readyz", readyz)]
    )
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            what = "metrics and health endpoint"
            raise ConfigError.cannot_listen(
                what, f"{host}:{port}", "WORKER_HTTP__PORT", exc.strerror
            ) from exc
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        bound = int(sockets[0].getsockname()[1]) if sockets else port
        if settings.port_file is not None:
            settings.port_file.write_text(str(bound))
        yield bound
    finally:
        await runner.cleanup()
