"""REST's numeric headers are plain ASCII decimals or refused: never an exception, never a hang.

``int()`` takes ``" 5 "``, ``"1_000"`` and other scripts' digits, and a 400-digit timeout once
raised ``OverflowError`` out of the handler.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from hypothesis import given
from hypothesis import strategies as st

from worker.repository import ModelRepository
from worker.rest import TIMEOUT_HEADER, whole_number
from worker.settings import Settings

from .test_endpoints import rest, serving, v2_body, with_endpoints

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]

HOSTILE = ["9" * 400, "1_000", "\uff15", "\u0665", "-5", "0", "1e3", "", "0x10", "+5"]
"""As they reach the server (HTTP strips the whitespace around a value)."""


@given(st.text(max_size=30))
def test_a_header_number_is_ascii_digits_or_none(raw: str) -> None:
    """Any text: None, or the value of a string of 1 to 15 ASCII digits and nothing else."""
    value = whole_number(raw)
    if value is not None:
        assert raw.isascii()
        assert raw.isdigit()
        assert len(raw) <= 15
        assert value == int(raw)


@given(st.integers(0, 10**15 - 1))
def test_every_plain_number_up_to_15_digits_is_read(value: int) -> None:
    """Plain decimals are read exactly."""
    assert whole_number(str(value)) == value


async def test_hostile_timeouts_and_lengths_are_400_and_the_worker_goes_on(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """Each hostile Request-Timeout-Ms or binary length header is a 400 saying what is expected."""
    settings = with_endpoints(settings)
    body = {"id": "h", **v2_body(testset[0][:1])}
    path = "/v2/models/digits/infer"
    async with serving(settings, repository) as worker:
        port = worker.rest_port
        assert port is not None
        timeouts = [await rest(port, path, body, {TIMEOUT_HEADER: raw}) for raw in HOSTILE]
        lengths = [
            await rest(port, path, body, {"Inference-Header-Content-Length": raw})
            for raw in HOSTILE
            if raw not in ("0",)
        ]
        fine = await rest(port, path, body, {TIMEOUT_HEADER: "30000"})
    assert [status for status, _ in timeouts] == [400] * len(HOSTILE)
    assert all("whole number of milliseconds" in answer["error"] for _, answer in timeouts)
    assert [status for status, _ in lengths] == [400] * (len(HOSTILE) - 1)
    assert fine[0] == 200
