"""How many batches a lane's next run may take, bounded in time: no Kafka, no torch.

A *run* is the batches the batcher hands the model in one call (:mod:`worker.batching`).
Its answers are delivered when its last batch is done, so a long run holds the first
batch's answers for the time of all the others; a short one pays the hand-off to the model's
thread and back, and a group of replies, for few requests. :class:`Pace` sizes runs by time:

- whoever processes a run reports what the model did (:meth:`Pace.ran`): the batches it ran,
  their requests, and the seconds from the hand-off to the answers' delivery. A run that ran
  nothing (every request expired) reports nothing, and a run cut short reports only what ran,
  so neither moves the estimate;
- the estimate is of the time per request, halfway between the last run's and the estimate
  before, and a run is sized for *full* batches at it (a run of small batches under light
  traffic then errs on the long side per batch, so on the short side per run);
- the next run takes as many full batches as fit ``max_run_seconds`` at the estimate, at least
  one, and at most twice the longest run reported so far (one before any): an estimate that
  is still low can lengthen runs only step by step, each step measured.

Small, fast batches then go in long runs (batches of one request on a small model: 64 to a run,
about twice the throughput of runs of 8); a slow model's batches one at a time.
"""

from __future__ import annotations

__all__ = ["Pace"]

_SIZE_CAP = 1 << 30
"""A batch size beyond any real one (keeps the arithmetic in floats' range)."""


class Pace:
    """The time bound on a lane's runs: an estimate of the time per request, from reports."""

    def __init__(self, max_run_seconds: float) -> None:
        if not max_run_seconds > 0:  # NaN fails this too
            raise ValueError("max_run_seconds must be positive")
        self.max_run_seconds = max_run_seconds
        self._per_item: float | None = None
        """Estimated seconds per request of a run (None: no run reported yet)."""
        self._longest = 0
        """Most batches of a run reported so far."""

    def ran(self, batches: int, items: int, seconds: float) -> None:
        """A run's model work: ``batches`` of ``items`` requests, ``seconds`` until delivered."""
        if batches < 1 or items < 1 or not seconds >= 0:
            return
        took, last = seconds / items, self._per_item
        self._per_item = took if last is None else (last + took) / 2
        self._longest = max(self._longest, batches)

    def batches(self, most: int, max_batch_size: int) -> int:
        """Most batches the next run may take (at most ``most``; batches of ``max_batch_size``)."""
        per_item = self._per_item
        if per_item is None:
            return 1
        cap = min(most, 2 * self._longest)
        per_batch = per_item * min(max_batch_size, _SIZE_CAP)
        if per_batch <= 0 or self.max_run_seconds >= per_batch * cap:
            return cap
        return max(1, int(self.max_run_seconds / per_batch))
