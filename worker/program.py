"""What stacking and running batches need of a loaded version: the :class:`Program` protocol.

:class:`~worker.model.LoadedModel` is the one the worker serves; :mod:`worker.stacking` and
:mod:`worker.forward` are written against this protocol instead, so that loading a model
(which stacks a dummy batch to check it) and running batches do not import each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy.typing as npt
import torch

from worker.model_config import ModelConfig
from worker.prepared import Argument, Prepared
from worker.staging import Fetched, Launched, Staged

__all__ = ["Program"]


class Program(Protocol):
    """One version, ready to run: its config, arguments, device and forward steps."""

    config: ModelConfig
    name: str
    version: str
    arguments: tuple[Argument, ...]
    """The program's positional arguments, in order."""
    device: torch.device

    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """One forward pass on a batch (blocking), inputs keyed by argument name."""
        ...

    def stage(self, per_request: Sequence[Prepared]) -> Staged:
        """Assemble a batch and start its copy to the device."""
        ...

    def launch(self, staged: Staged) -> Launched:
        """Run the program on a staged batch (on a GPU: queued, not waited for)."""
        ...

    def fetch(self, launched: Launched) -> Fetched:
        """Start the outputs' copy back to the host (on a GPU: queued, not waited for)."""
        ...

    def collect(self, fetched: Fetched) -> dict[str, npt.NDArray[Any]]:
        """Wait for the outputs on the host, by output name."""
        ...
