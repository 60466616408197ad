"""The tokenizer stage: text requests are tokenised batch-wise, off the event loop.

Admission checks a text model's request (datatype, shape, string layout) but leaves its strings
``pending`` (:class:`~worker.model.Prepared`). :class:`Tokenizing` takes the pending jobs that
have arrived, oldest first, up to a byte budget per round (:data:`ROUND_BYTES` of strings, as
the tokenizer is given them: each string at most :attr:`~worker.text.TextEncoder.cut_bytes`;
at least one job; the rest wait for the next round), tokenises them in one call per model in a
thread of its own (the Rust tokenizer releases the GIL, so this overlaps the inference thread's
forward pass), and hands each job, now with its exact token counts, to its lane. A job whose
deadline has passed when a round takes it is answered ``DEADLINE_EXCEEDED`` at once, never
tokenised. A request the tokenizer refuses (a string that is not UTF-8) is answered with its
error reply; a shadow copy it refuses is dropped, the primary goes on. If tokenising raises
unexpectedly (a bug), the round's records are dead-lettered (stage ``TOKENIZE``) and the stage
goes on.

Nothing is lost or reordered for commits: records stay tracked by the intake until answered.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import replace

import structlog

from worker.admission import Admitted, Job
from worker.answers import Answer, Deliver, Stage, error_response, expired_response
from worker.errors import RequestError, detached
from worker.inbox import Inbox
from worker.model import LoadedModel, Prepared
from worker.text import PASS_BYTES

__all__ = ["ROUND_BYTES", "Tokenizing"]

log = structlog.get_logger(__name__)

ROUND_BYTES = PASS_BYTES
"""Bytes of strings one round tokenises (each string counted as the tokenizer is first given
it, at most ``cut_bytes``): what the tokenizer holds at once, about 32 MiB per MiB of prose."""


class Tokenizing:
    """Collects admitted text jobs; tokenises them in ``executor``; passes them to ``forward``."""

    def __init__(
        self,
        executor: Executor,
        *,
        forward: Callable[[Admitted], None],
        deliver: Deliver,
        round_bytes: int = ROUND_BYTES,
    ) -> None:
        self._executor = executor
        self._forward = forward
        self._deliver = deliver
        self._round_bytes = round_bytes
        self._inbox: Inbox[Admitted] = Inbox()
        self._waiting: deque[Admitted] = deque()
        """Taken from the inbox, left for a later round by the budget (oldest first)."""

    def __len__(self) -> int:
        """Jobs waiting to be tokenised."""
        return len(self._inbox) + len(self._waiting)

    def put(self, admitted: Admitted) -> None:
        """Queue a job whose strings are pending (and its shadow copy, if any)."""
        self._inbox.extend((admitted,))

    def withdraw(self, unwanted: Callable[[Job], bool]) -> list[Admitted]:
        """Take out every waiting job that is ``unwanted`` (with its shadow copy): never tokenised.

        A round being tokenised now is not waited for: its jobs go on to their lanes.
        """

        def drop(admitted: Admitted) -> bool:
            return unwanted(admitted.job)

        out = self._inbox.withdraw(drop)
        kept = [a for a in self._waiting if not drop(a)]
        if len(kept) != len(self._waiting):
            out += [a for a in self._waiting if drop(a)]
            self._waiting = deque(kept)
        return out

    def close(self) -> None:
        """Tokenise what is queued, then let :meth:`run` return."""
        self._inbox.close()

    async def run(self) -> None:
        """Tokenise everything waiting, round by round (one call per model), until closed."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting or len(self._inbox):  # the latter returns at once
                taken = await self._inbox.take_all()
                if not taken and not self._waiting:
                    return
                self._waiting.extend(taken)
            batch = self._next_round()
            if not batch:
                continue
            jobs = [j for a in batch for j in (a.job, a.shadow) if j is not None]
            try:
                outcomes = await loop.run_in_executor(self._executor, tokenize_jobs, jobs)
            except Exception as exc:  # the last-resort guard: a bug must not stop the worker
                log.exception("tokenising raised; its requests are dead-lettered")
                error = detached(exc)
                self._deliver(
                    [Answer(a.job.origin, failed=Stage.TOKENIZE, error=error) for a in batch]
                )
                continue
            for admitted in batch:
                self._settle(admitted, outcomes)

    def _next_round(self) -> list[Admitted]:
        """The oldest waiting jobs within the byte budget (at least one).

        A job whose deadline has passed is answered on the way, without being tokenised.
        """
        now_ms = time.time() * 1000
        expired: list[Answer] = []
        batch: list[Admitted] = []
        spent = 0
        while self._waiting:
            admitted = self._waiting[0]
            job = admitted.job
            if job.deadline_ms is not None and job.deadline_ms < now_ms:
                self._waiting.popleft()
                late = expired_response(
                    job.request, job.model.version, job.deadline_ms, now_ms,
                    before="its strings were tokenised",
                )  # fmt: skip
                expired.append(Answer(job.origin, late, served=True))
                continue
            cost = _cost(admitted)
            if batch and spent + cost > self._round_bytes:
                break
            self._waiting.popleft()
            batch.append(admitted)
            spent += cost
        if expired:
            self._deliver(expired)
        return batch

    def _settle(self, admitted: Admitted, outcomes: dict[int, Prepared | RequestError]) -> None:
        job, copy = admitted.job, admitted.shadow
        outcome = outcomes[id(job)]
        if isinstance(outcome, RequestError):
            response = replace(
                error_response(job.request, outcome), model_version=job.model.version
            )
            self._deliver([Answer(job.origin, response, served=True)])
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


def _cost(admitted: Admitted) -> int:
    """Bytes of a job's strings (and its shadow copy's) the tokenizer is first given."""
    return sum(
        j.model.text.cost(j.prepared.arrays[0])
        for j in (admitted.job, admitted.shadow)
        if j is not None and j.model.text is not None
    )
