"""Unit tests of shadow comparison (worker.shadow): outcomes once both sides are in."""

from __future__ import annotations

import pytest

from worker.domain import Tensor
from worker.shadow import Comparison, Outcome


def sides(label: int) -> list[Tensor]:
    return [Tensor.from_numpy("p", [0.5, 0.5]), Tensor.from_numpy("label", [label])]


def comparison() -> Comparison:
    return Comparison("digits", "1", "2", "label")


@pytest.mark.parametrize("shadow_first", [False, True])
def test_outcome_comes_when_the_second_side_arrives(shadow_first: bool) -> None:
    """The first side gets no outcome; the second gets it, whichever order they come in."""
    c = comparison()
    assert c.record(sides(3), shadow=shadow_first) is None
    assert c.record(sides(3), shadow=not shadow_first) is Outcome.AGREED


def test_only_the_compared_output_counts() -> None:
    """Different labels disagree; the other outputs are not compared."""
    c = comparison()
    c.record(sides(3), shadow=False)
    assert c.record(sides(4), shadow=True) is Outcome.DISAGREED
    other = [Tensor.from_numpy("p", [0.9, 0.1]), Tensor.from_numpy("label", [3])]
    c = comparison()
    c.record(sides(3), shadow=False)
    assert c.record(other, shadow=True) is Outcome.AGREED


def test_shape_differences_disagree() -> None:
    """Equal values in another shape are not agreement."""
    c = comparison()
    c.record([Tensor.from_numpy("label", [3, 3])], shadow=False)
    assert c.record([Tensor.from_numpy("label", [[3, 3]])], shadow=True) is Outcome.DISAGREED


@pytest.mark.parametrize(
    ("primary", "shadow"),
    [
        (ValueError("boom"), "ok"),
        ("ok", RuntimeError("boom")),
        (None, "ok"),
        ("ok", None),
    ],
)
def test_a_side_that_raised_or_did_not_run_fails(primary: object, shadow: object) -> None:
    """An exception, or a side whose deadline passed (None), makes the comparison failed."""
    c = comparison()

    def result(value: object) -> list[Tensor] | Exception | None:
        return sides(3) if value == "ok" else value  # type: ignore[return-value]

    c.record(result(primary), shadow=False)
    assert c.record(result(shadow), shadow=True) is Outcome.FAILED


def test_missing_compared_output_fails() -> None:
    """A side without the compared output cannot agree: failed."""
    c = comparison()
    c.record([Tensor.from_numpy("p", [1.0])], shadow=False)
    assert c.record(sides(3), shadow=True) is Outcome.FAILED
