"""Reloading the model repository while serving: on request (SIGHUP) or when its files change.

A reload never stops the worker: whatever fails, the current models keep serving and the reload
counts as ``failed`` (``inference_model_reloads_total``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from worker.metrics import Metrics
from worker.repository import ModelRepository

__all__ = ["Reloader", "names"]

log = structlog.get_logger(__name__)


class Reloader:
    """Re-reads the repository (``current()``) and hands the result to ``serve``.

    ``serve`` must change nothing when it raises (the pipeline builds every new lane before it
    retires any); the repository it was given is the one serving from then on.
    """

    def __init__(
        self,
        current: Callable[[], ModelRepository],
        serve: Callable[[ModelRepository], None],
        *,
        poll_interval_s: float,
        metrics: Metrics,
    ) -> None:
        self._current = current
        self._serve = serve
        self._interval = poll_interval_s
        self._metrics = metrics
        self._requested = asyncio.Event()

    def request(self) -> None:
        """Re-read the repository soon."""
        self._requested.set()

    async def run(self) -> None:
        """Reload on request, or (``poll_interval_s`` > 0) when the repository's files change."""
        seen = await asyncio.to_thread(self._current().fingerprint)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval or None):
                    await self._requested.wait()
            requested = self._requested.is_set()
            self._requested.clear()
            current = self._current()
            fingerprint = await asyncio.to_thread(current.fingerprint)
            if fingerprint == seen and not requested:
                continue
            seen = fingerprint
            await self._reload(current)

    async def _reload(self, current: ModelRepository) -> None:
        errors: list[Exception]
        try:
            repository, config_errors = await asyncio.to_thread(current.reload)
            self._serve(repository)
            errors = list(config_errors)
        except Exception as exc:
            log.exception("model reload failed; the current models keep serving")
            errors, repository = [exc], current
        for error in errors:
            log.error(
                "model reload failed; the model keeps its current versions",
                error=str(error)[:500],
            )
        self._metrics.reloads.labels("failed" if errors else "ok").inc()
        log.info("model repository reloaded", models=names(repository), failed=len(errors))


def names(repository: ModelRepository) -> list[str]:
    """``name:version`` of every served version, sorted (for log lines)."""
    return sorted(f"{m.name}:{m.version}" for m in repository.all())
