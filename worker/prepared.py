"""A request's inputs as the program takes them (:class:`Prepared`), and the program's arguments.

A model takes its inputs positionally in ``config.toml`` order; a ``[tokenizer]`` model takes
the tokenizer's feeds instead (token ids, attention mask), and a sequence model without one may
take an extra last argument (attention mask or lengths) that
:func:`~worker.stacking.stack_inputs` builds while padding the batch. :func:`program_arguments`
says which, in order (:class:`Argument`). A request becomes :class:`Prepared` at admission
(:mod:`worker.validation`); batches of them are stacked by :mod:`worker.stacking`.

Plain data: no torch, no Kafka.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from worker.model_config import ModelConfig
from worker.records import record
from worker.text import TextEncoder, Tokenized

__all__ = ["Argument", "Prepared", "program_arguments"]


@record
class Prepared:
    """One request's inputs as the program takes them, and what batching needs to know."""

    arrays: list[npt.NDArray[Any]]
    """One array per program input (the extra mask or lengths argument excepted)."""
    rows: int
    length: int = 1
    """Sequence models: the request's length (second dimension); 1 otherwise."""
    tokens: int = 1
    """Real tokens (rows x length; for strings, their token counts): padding efficiency."""
    truncated: int = 0
    """Strings cut to the tokenizer's ``max_length``."""
    pending: bool = False
    """Strings not tokenised yet (``arrays`` holds them): for
    :meth:`~worker.model.LoadedModel.tokenize_many`."""

    @classmethod
    def from_tokenized(cls, tokenized: Tokenized) -> Prepared:
        """A request's strings, tokenised: one row per string, as long as the longest."""
        return cls(
            tokenized.arrays,
            rows=len(tokenized.lengths),
            length=max(tokenized.lengths),
            tokens=sum(tokenized.lengths),
            truncated=tokenized.truncated,
        )


@dataclass(frozen=True, slots=True)
class Argument:
    """One positional argument of the program."""

    name: str
    sequence: bool = False
    """Padded along its second dimension to the batch's longest request."""
    pad_value: float = 0.0
    extra: bool = False
    """Built by :func:`~worker.stacking.stack_inputs` (attention mask or lengths), not taken
    from requests."""


def program_arguments(config: ModelConfig, text: TextEncoder | None) -> tuple[Argument, ...]:
    """The program's positional arguments, in order: a tokenizer's feeds, else the inputs."""
    if text is not None:
        return tuple(Argument(f, sequence=True, pad_value=text.pad_value(f)) for f in text.feeds)
    arguments = [Argument(s.name, s.is_sequence, s.pad_value) for s in config.inputs]
    if config.extra_input != "none":
        arguments.append(Argument(config.extra_input, extra=True))
    return tuple(arguments)
