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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["Probes", "serve_http"]


@dataclass(frozen=True)
class Probes:
    """What the endpoint asks the worker."""

    metrics: Callable[[], bytes]
    healthy: Callable[[], tuple[bool, str]]
    ready: Callable[[], tuple[bool, str]]


def _status(check: Callable[[], tuple[bool, str]]) -> web.Response:
    ok, detail = check()
    return web.Response(status=200 if ok else 503, text=detail + "\n")


@contextlib.asynccontextmanager
async def serve_http(probes: Probes, host: str, port: int) -> AsyncIterator[int]:
    """Serve the endpoint while the context is open; yields the bound port (``port=0``: any)."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=probes.metrics(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return _status(probes.healthy)

    async def readyz(_: web.Request) -> web.Response:
        return _status(probes.ready)

    app = web.Application()
    app.add_routes(
        [web.get("/metrics", metrics), web.get("/healthz", healthz), web.get("/readyz", readyz)]
    )
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        yield sockets[0].getsockname()[1] if sockets else port
    finally:
        await runner.cleanup()
