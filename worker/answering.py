"""Answering a lane's run of batches: expired jobs at once, the rest through the model.

:class:`RunAnswers` is what a lane's batcher calls with a run of batches
(:mod:`worker.lanes`): it answers the jobs whose deadline passed without running them, hands
the live batches to the version's runner in one hand-off (:func:`worker.forward.run_batches`,
off the event loop), and turns each batch's results into answers
(:func:`~worker.answers.model_response`) with the batch's metrics, delivered in groups of
whole batches (:data:`DELIVER_EVERY` jobs, or the run's end) with the event loop
free in between (a run's replies encoded at once would hold it for tens of milliseconds, a
waiting REST or gRPC request included; a group per batch of one would cost a loop turn per
request); shadow copies are compared
(:mod:`worker.shadow`), never answered. A bug answering a batch fails its requests at stage
``BATCH`` (the last-resort guard) and the lane goes on.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import threading
import time
from collections.abc import Awaitable, Callable

import structlog

from worker.admission import Job
from worker.answers import Answer, Deliver, Stage, expired_response, model_response
from worker.caching import store
from worker.domain import Timing
from worker.errors import SHOWN_CHARS, detached
from worker.forward import Run
from worker.metrics import Metrics, observe_many
from worker.model import LoadedModel, Prepared
from worker.pacing import Pace
from worker.shadow import Comparison, Outcome, Result

__all__ = ["DELIVER_EVERY", "RunAnswers", "Runner"]

log = structlog.get_logger(__name__)

DELIVER_EVERY = 64
"""Jobs of a run answered between two turns of the event loop, in whole batches: a group
closes at the first batch that brings it to this many (so it holds fewer than this plus one
batch, and the first group also the run's expired jobs), or at the run's end."""

Runner = Callable[[LoadedModel, list[list[Prepared]], threading.Event | None], Awaitable[Run]]
"""Runs a run of batches off the event loop (:func:`worker.forward.run_batches`); the event, when
set, ends the run early (its results then cover the first batches only)."""


class RunAnswers:
    """Answers runs of batches for every lane: deadlines, the model call, replies, metrics."""

    def __init__(self, deliver: Deliver, metrics: Metrics) -> None:
        self._deliver = deliver
        self._metrics = metrics
        self._batch_ids = itertools.count(1)
        self._batch_prefix = secrets.token_hex(4)

    async def run(
        self,
        runner: Runner,
        urgent: threading.Event | None,
        pace: Pace | None,
        batches: list[list[Job]],
    ) -> list[Job]:
        """Answer a run of batches: expired jobs at once, the rest in one hand-off.

        Returns the jobs of the batches a preempted run did not reach (``urgent`` set
        meanwhile), for the batcher to take again. ``pace``: told what the model ran (its
        batches, their jobs, the seconds from the hand-off to the last delivery).
        """
        left: list[Job] = []
        now_ms = time.time() * 1000
        answers: list[Answer] = []
        live_batches: list[list[Job]] = []
        for jobs in batches:
            live = []
            for job in jobs:
                if job.deadline_ms is None or job.deadline_ms >= now_ms:
                    live.append(job)
                    continue
                self._compare(job, None)
                if not job.is_shadow:
                    response = expired_response(
                        job.request, job.model.version, job.deadline_ms, now_ms
                    )
                    answers.append(Answer(job.origin, response, served=True))
            if live:
                live_batches.append(live)
        if live_batches:
            model = live_batches[0][0].model
            started = time.monotonic()
            runs = await runner(model, [[j.prepared for j in b] for b in live_batches], urgent)
            left = [job for batch in live_batches[len(runs) :] for job in batch]
            handled = 0  # jobs since the event loop was last let go (shadow copies included)
            for live, (offset_s, compute_s, results) in zip(live_batches, runs, strict=False):
                try:
                    answers += self._answer(model, live, started + offset_s, compute_s, results)
                except Exception as exc:  # the last-resort guard: a bug must not stop the lane
                    log.exception("answering a batch raised; its requests failed")
                    answers += [
                        Answer(job.origin, failed=Stage.BATCH, error=detached(exc))
                        for job in live
                        if not job.is_shadow
                    ]
                # In groups, the event loop free in between: encoding a run's replies at once
                # would hold it for tens of ms (a waiting call's request included); a group
                # per small batch would cost a loop turn and a delivery per request.
                handled += len(live)
                if handled >= DELIVER_EVERY:
                    if answers:
                        self._deliver(answers)
                    answers, handled = [], 0
                    await asyncio.sleep(0)
        if answers:
            self._deliver(answers)
        if live_batches and pace is not None:
            ran = live_batches[: len(runs)]
            pace.ran(len(ran), sum(map(len, ran)), time.monotonic() - started)
        return left

    def _answer(
        self,
        model: LoadedModel,
        live: list[Job],
        started: float,
        compute_s: float,
        results: list[Result],
    ) -> list[Answer]:
        """The answers to one batch's (non-shadow) jobs; metrics and shadow comparisons."""
        batch_id = f"{self._batch_prefix}-{next(self._batch_ids)}"
        labels = (model.name, model.version)
        self._metrics.compute.labels(*labels).observe(compute_s)
        self._metrics.batch_size.labels(*labels).observe(len(live))
        if model.config.is_sequence:
            longest = max(job.prepared.length for job in live)
            padded = sum(job.prepared.rows for job in live) * longest
            self._metrics.tokens.labels(*labels, "padded").inc(padded)
            self._metrics.tokens.labels(*labels, "real").inc(
                sum(job.prepared.tokens for job in live)
            )
        observe_many(
            self._metrics.queue_wait.labels(*labels), [started - job.enqueued for job in live]
        )
        answers: list[Answer] = []
        compute_us, size = int(compute_s * 1e6), len(live)
        for job, result in zip(live, results, strict=True):
            if job.comparison is not None:
                self._compare(job, result)
            if job.is_shadow:
                continue
            timing = Timing(int((started - job.enqueued) * 1e6), compute_us, size)
            response = model_response(
                job.request, model.name, model.version, result, timing,
                truncated=job.prepared.truncated,
            )  # fmt: skip
            answers.append(Answer(job.origin, response, batch_id=batch_id, served=True))
            if job.model.cache is not None and not isinstance(result, Exception):
                store(job, result, self._metrics)  # a version with a [cache]: kept for repeats
        return answers

    def _compare(self, job: Job, result: Result | None) -> None:
        comparison = job.comparison
        if comparison is None:
            return
        outcome = comparison.record(result, shadow=job.is_shadow)
        if outcome is None:
            return
        self.count(comparison, outcome)
        if outcome is Outcome.DISAGREED:
            log.info(
                "shadow disagrees with primary",
                correlation_id=job.request.id[:SHOWN_CHARS],
                model=comparison.model,
                output=comparison.output,
            )

    def count(self, comparison: Comparison, outcome: Outcome) -> None:
        """Count one shadow comparison's outcome."""
        self._metrics.shadow.labels(
            comparison.model, comparison.primary_version, comparison.shadow_version, outcome
        ).inc()
