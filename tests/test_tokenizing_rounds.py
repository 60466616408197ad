"""The tokenizer stage's rounds (worker.tokenizing): a byte budget, oldest first; no broker.

Requests past their deadline are answered without being tokenised.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from worker import tokenizing
from worker.admission import Admitted, Job, Limits
from worker.answers import Answer
from worker.errors import RequestError
from worker.model import LoadedModel, Prepared
from worker.repository import ModelRepository
from worker.tokenizing import Tokenizing

from .test_tokenizing import admitted


async def test_rounds_keep_to_the_byte_budget_oldest_first_and_nothing_starves(
    text_repository: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rounds take the oldest jobs within budget (one alone if bigger); later ones never pass."""
    loop = asyncio.get_running_loop()
    rounds: list[list[str]] = []
    real = tokenizing.tokenize_jobs
    model = text_repository.route("minilm", None, "").primary
    assert model.text is not None
    budget = 2_500  # two 1,000-byte requests a round
    big = admitted(text_repository, 0, [b"big " * 25_000])  # costs cut_bytes, 16 KiB, alone
    first = [admitted(text_repository, i, [b"word " * 200]) for i in range(1, 6)]
    arrivals = [admitted(text_repository, i, [b"more " * 200]) for i in range(6, 15)]
    costs = {
        a.job.request.id: model.text.cost(a.job.prepared.arrays[0])
        for a in [big, *first, *arrivals]
    }
    later = iter(arrivals)

    def recorded(jobs: Sequence[Job]) -> dict[int, Prepared | RequestError]:
        rounds.append([j.request.id for j in jobs])
        for _ in range(2):  # as many arrive during a round as a round takes
            arriving = next(later, None)
            if arriving is None:
                loop.call_soon_threadsafe(stage.close)
                break
            loop.call_soon_threadsafe(stage.put, arriving)
        return real(jobs)

    monkeypatch.setattr(tokenizing, "tokenize_jobs", recorded)
    forwarded: list[Admitted] = []
    answered: list[Answer] = []
    with ThreadPoolExecutor(1) as pool:
        stage = Tokenizing(pool, forward=forwarded.append, deliver=answered.extend,
                           round_bytes=budget)  # fmt: skip
        for job in [big, *first]:
            stage.put(job)
        await asyncio.wait_for(stage.run(), 30)
    assert not answered
    assert rounds[0] == ["r-0"]
    assert all(len(r) == 2 for r in rounds[1:]), rounds
    assert [i for r in rounds for i in r] == [f"r-{i}" for i in range(15)]
    assert [a.job.request.id for a in forwarded] == [f"r-{i}" for i in range(15)]
    assert costs["r-0"] == model.text.cut_bytes > budget
    assert all(sum(costs[i] for i in r) <= budget for r in rounds[1:])


async def test_requests_past_their_deadline_are_answered_and_never_tokenised(
    text_repository: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deadline passed (its own or the default timeout's): DEADLINE_EXCEEDED, no tokenizer."""
    tokenised: list[list[bytes]] = []
    real = LoadedModel.tokenize_many

    def counted(self: LoadedModel, pending: Sequence[Prepared]) -> list[Prepared | RequestError]:
        tokenised.extend(p.arrays[0].tolist() for p in pending)
        return real(self, pending)

    monkeypatch.setattr(LoadedModel, "tokenize_many", counted)
    now_ms = int(time.time() * 1000)
    timeout = Limits(max_request_bytes=4 << 20, max_request_elements=1_000, default_timeout_ms=5)
    soon = now_ms + 60_000  # a record's timestamp: its default deadline is 5 ms after
    jobs = [
        admitted(text_repository, 1, [b"own deadline passed"], deadline_ms=now_ms - 1),
        admitted(text_repository, 2, [b"no deadline"]),
        admitted(text_repository, 3, [b"default timeout passed"], limits=timeout),
        admitted(text_repository, 4, [b"an hour left"], deadline_ms=now_ms + 3_600_000),
        admitted(text_repository, 5, [b"a minute left"], limits=timeout, timestamp_ms=soon),
    ]
    forwarded: list[Admitted] = []
    answered: list[Answer] = []
    with ThreadPoolExecutor(1) as pool:
        stage = Tokenizing(pool, forward=forwarded.append, deliver=answered.extend)
        for job in jobs:
            stage.put(job)
        stage.close()
        await asyncio.wait_for(stage.run(), 30)
    assert tokenised == [[b"no deadline"], [b"an hour left"], [b"a minute left"]]
    assert [a.job.request.id for a in forwarded] == ["r-2", "r-4", "r-5"]
    assert all(a.failed is None for a in answered)
    replies = [a.response for a in answered]
    assert [r.id if r else None for r in replies] == ["r-1", "r-3"]
    for reply in replies:
        assert reply is not None
        assert reply.error is not None
        assert reply.error.code == "DEADLINE_EXCEEDED"
        assert "before its strings were tokenised" in reply.error.message
        assert reply.model_version == "1"
