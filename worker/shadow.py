"""Shadow comparison: a request's primary and shadow results, compared once both are in.

A model's ``[routing] shadow`` version gets a copy of the requests that name no version
(:meth:`worker.repository.ServedModel.route` decides). The copy runs in the shadow version's
own lane; its result is never sent. Each side records its result in the request's
:class:`Comparison`; the second side to arrive gets the outcome, which the lane counts
(``inference_shadow_comparisons``). Pure: no Kafka, no asyncio, no metrics.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from worker.domain import Tensor

__all__ = ["Comparison", "Outcome"]

Result = list[Tensor] | Exception
"""A side's result: the request's output tensors, or what its rows raised."""


class Outcome(enum.StrEnum):
    """The ``result`` label of ``inference_shadow_comparisons``."""

    AGREED = "agreed"
    """Both sides ran; the compared output is equal (shape and values)."""
    DISAGREED = "disagreed"
    """Both sides ran; the compared output differs."""
    FAILED = "failed"
    """A side raised, or its deadline passed before it ran."""
    DROPPED = "dropped"
    """The copy was not run: the shadow's queue was full (the primary is never slowed)."""


@dataclass(slots=True)
class Comparison:
    """Primary and shadow results of one request."""

    model: str
    primary_version: str
    shadow_version: str
    output: str
    """The output compared (``routing.shadow_compare``, default the last output)."""
    primary: Result | None = None
    shadow: Result | None = None

    def record(self, result: Result | None, *, shadow: bool) -> Outcome | None:
        """Note one side's result (None: it did not run); the outcome once both are in."""
        outcome: Result = result if result is not None else TimeoutError("deadline passed")
        if shadow:
            self.shadow = outcome
        else:
            self.primary = outcome
        first, second = self.primary, self.shadow
        if first is None or second is None:
            return None
        if isinstance(first, Exception) or isinstance(second, Exception):
            return Outcome.FAILED
        a = _output(first, self.output)
        b = _output(second, self.output)
        if a is None or b is None:
            return Outcome.FAILED
        same = a.shape == b.shape and bool((a.to_numpy() == b.to_numpy()).all())
        return Outcome.AGREED if same else Outcome.DISAGREED


def _output(tensors: list[Tensor], name: str) -> Tensor | None:
    return next((t for t in tensors if t.name == name), None)
