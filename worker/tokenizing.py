"""The tokenizer stage: text requests are tokenised batch-wise, off the event loop.

Admission checks a text model's request (datatype, shape, string layout) but leaves its strings
``pending`` (:class:`~worker.model.Prepared`). :class:`Tokenizing` takes every pending job that
has arrived, tokenises them in one ``encode_batch`` call per model in a thread of its own (the
Rust tokenizer releases the GIL, so this overlaps the inference thread's forward pass), and
hands each job, now with its exact token counts, to its lane. A request the tokenizer refuses
(a string that is not UTF-8) is answered with its error reply; a shadow copy it refuses is
dropped, the primary goes on. If tokenising raises unexpectedly (a bug), the round's records
are dead-lettered (stage ``TOKENIZE``) and the stage goes on.

Nothing is lost or reordered for commits: records stay tracked by the intake until answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import replace

import structlog

from worker.admission import Admitted, Job
from worker.errors import RequestError
from worker.inbox import Inbox
from worker.model import LoadedModel, Prepared
from worker.outgoing import Destinations, Outgoing, Stage, dead_letter, error_response, reply

__all__ = ["Tokenizing"]

log = structlog.get_logger(__name__)


class Tokenizing:
    """Collects admitted text jobs; tokenises them in ``executor``; passes them to ``forward``."""

    def __init__(
        self,
        executor: Executor,
        *,
        forward: Callable[[Admitted], None],
        answer: Callable[[Sequence[Outgoing]], None],
        destinations: Destinations,
    ) -> None:
        self._executor = executor
        self._forward = forward
        self._answer = answer
        self._destinations = destinations
        self._inbox: Inbox[Admitted] = Inbox()

    def __len__(self) -> int:
        """Jobs waiting to be tokenised."""
        return len(self._inbox)

    def put(self, admitted: Admitted) -> None:
        """Queue a job whose strings are pending (and its shadow copy, if any)."""
        self._inbox.extend((admitted,))

    def close(self) -> None:
        """Tokenise what is queued, then let :meth:`run` return."""
        self._inbox.close()

    async def run(self) -> None:
        """Tokenise everything waiting, one call per model and round, until closed and empty."""
        loop = asyncio.get_running_loop()
        while taken := await self._inbox.take_all():
            jobs = [j for a in taken for j in (a.job, a.shadow) if j is not None]
            try:
                outcomes = await loop.run_in_executor(self._executor, tokenize_jobs, jobs)
            except Exception as exc:  # the last-resort guard: a bug must not stop the worker
                log.exception("tokenising raised; its requests are dead-lettered")
                self._answer(
                    [dead_letter(self._destinations, a.job.source, Stage.TOKENIZE, exc)
                     for a in taken]
                )  # fmt: skip
                continue
            for admitted in taken:
                self._settle(admitted, outcomes)

    def _settle(self, admitted: Admitted, outcomes: dict[int, Prepared | RequestError]) -> None:
        job, copy = admitted.job, admitted.shadow
        outcome = outcomes[id(job)]
        if isinstance(outcome, RequestError):
            response = replace(
                error_response(job.request, outcome), model_version=job.model.version
            )
            self._answer(reply(self._destinations, job.source, response, served=True))
            return
        job.prepared = outcome
        if copy is not None:
            shadowed = outcomes[id(copy)]
            if isinstance(shadowed, RequestError):
                admitted.shadow, job.comparison = None, None
            else:
                copy.prepared = shadowed
        self._forward(admitted)


def tokenize_jobs(jobs: Sequence[Job]) -> dict[int, Prepared | RequestError]:
    """Each job's tokenised inputs or its refusal, by ``id(job)``; one call per model (blocking)."""
    by_model: dict[int, tuple[LoadedModel, list[Job]]] = {}
    for job in jobs:
        by_model.setdefault(id(job.model), (job.model, []))[1].append(job)
    out: dict[int, Prepared | RequestError] = {}
    for model, group in by_model.values():
        results = model.tokenize_many([j.prepared for j in group])
        out.update((id(j), r) for j, r in zip(group, results, strict=True))
    return out
