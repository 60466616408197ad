"""Unit tests of the tokenizer stage (worker.tokenizing): batch-wise, off the loop; no broker."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from aiokafka import TopicPartition

from worker.admission import Admitted, Limits, admit
from worker.answers import Answer, Stage
from worker.bench.corpus import paragraphs
from worker.codec import encode_request
from worker.domain import InferenceRequest, Tensor
from worker.errors import RequestError
from worker.formats import PLAIN
from worker.model import LoadedModel, Prepared
from worker.origins import Origin, Record
from worker.outgoing import Destinations
from worker.repository import ModelRepository
from worker.tokenizing import Tokenizing

from .conftest import wait_for

DEST = Destinations("replies", "dlq", "g")
LIMITS = Limits(max_request_bytes=4 << 20, max_request_elements=1_000_000)


def admitted(
    repository: ModelRepository,
    offset: int,
    strings: list[bytes],
    *,
    deadline_ms: int | None = None,
    limits: Limits = LIMITS,
    timestamp_ms: int = 1_000,
) -> Admitted:
    """A text request admitted as the worker admits it: strings checked, left pending."""
    request = InferenceRequest(
        f"r-{offset}", "minilm", [Tensor.from_strings("text", strings)], deadline_ms=deadline_ms
    )
    source = Record(TopicPartition("requests", 0), offset, None, encode_request(request), [],
                    timestamp_ms)  # fmt: skip
    outcome = admit(source, repository, limits, DEST, PLAIN, now=0.0, tokenize=False)
    assert isinstance(outcome, Admitted), outcome
    assert outcome.job.prepared.pending
    return outcome


def offset(origin: Origin) -> int:
    """The offset of a request record (every request here is one)."""
    assert isinstance(origin, Record), origin
    return origin.offset


async def test_pending_jobs_are_tokenised_in_one_call_off_the_event_loop(
    text_repository: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What has arrived is tokenised in one call per model, in the stage's own thread."""
    calls: list[tuple[str, int]] = []
    real = LoadedModel.tokenize_many

    def counted(self: LoadedModel, pending: Sequence[Prepared]) -> list[Prepared | RequestError]:
        calls.append((threading.current_thread().name, len(pending)))
        return real(self, pending)

    monkeypatch.setattr(LoadedModel, "tokenize_many", counted)
    texts = paragraphs(12, seed=5)
    forwarded: list[Admitted] = []
    answered: list[Answer] = []
    with ThreadPoolExecutor(1, thread_name_prefix="tokenize") as pool:
        stage = Tokenizing(pool, forward=forwarded.append, deliver=answered.extend)
        for i, text in enumerate(texts):
            stage.put(admitted(text_repository, i, [text.encode()]))
        stage.put(admitted(text_repository, 99, [b"fine", b"\xff bad"]))
        stage.close()
        await asyncio.wait_for(stage.run(), 30)
    assert len(calls) == 1, "one call for everything that had arrived"
    assert calls[0][0].startswith("tokenize")
    assert calls[0][1] == 13
    model = text_repository.route("minilm", None, "").primary
    for i, outcome in enumerate(forwarded):
        prepared = outcome.job.prepared
        assert not prepared.pending
        alone = model.validate(
            InferenceRequest("r", "minilm", [Tensor.from_strings("text", [texts[i]])])
        )
        assert (prepared.rows, prepared.length, prepared.tokens) == (1, alone.length, alone.tokens)
        np.testing.assert_array_equal(prepared.arrays[0], alone.arrays[0])
    assert [offset(o.job.origin) for o in forwarded] == list(range(12))
    [refusal] = answered
    response = refusal.response
    assert response is not None
    assert offset(refusal.origin) == 99
    assert response.id == "r-99"
    assert response.error is not None
    assert response.error.code == "INVALID_ARGUMENT"
    assert "element 1 is not UTF-8" in response.error.message


async def test_a_bug_while_tokenising_dead_letters_the_round_and_the_stage_goes_on(
    text_repository: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Last-resort guard: an unexpected exception dead-letters the round (TOKENIZE); then on."""
    real = LoadedModel.tokenize_many
    rounds: list[int] = []

    def flaky(self: LoadedModel, pending: Sequence[Prepared]) -> list[Prepared | RequestError]:
        rounds.append(len(pending))
        if len(rounds) == 1:
            raise RuntimeError("a bug in tokenising")
        return real(self, pending)

    monkeypatch.setattr(LoadedModel, "tokenize_many", flaky)
    forwarded: list[Admitted] = []
    answered: list[Answer] = []
    with ThreadPoolExecutor(1) as pool:
        stage = Tokenizing(pool, forward=forwarded.append, deliver=answered.extend)
        running = asyncio.create_task(stage.run())
        stage.put(admitted(text_repository, 1, [b"first"]))
        stage.put(admitted(text_repository, 2, [b"second"]))
        await wait_for(lambda: len(answered) == 2, timeout=30, what="two dead-letter copies")
        stage.put(admitted(text_repository, 3, [b"third"]))
        stage.close()
        await asyncio.wait_for(running, 30)
    assert [(a.failed, offset(a.origin), a.response) for a in answered] == [
        (Stage.TOKENIZE, 1, None),
        (Stage.TOKENIZE, 2, None),
    ]
    assert all(isinstance(a.error, RuntimeError) for a in answered)
    assert [offset(a.job.origin) for a in forwarded] == [3]
