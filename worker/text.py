"""A model's tokenizer step: strings in, token ids and attention masks out.

A model whose ``config.toml`` has a ``[tokenizer]`` table takes one ``BYTES`` input (UTF-8
strings) and its version folder holds a Hugging Face ``tokenizer.json``. Each request's strings
are tokenised once, before batching, with the ``tokenizers`` library (Rust; ``encode_batch``
releases the GIL): the exact token counts then steer batching (:mod:`worker.batching`). The
worker tokenises what has arrived in one call, in a thread of its own
(:mod:`worker.tokenizing`). Strings longer than ``max_length`` tokens are cut, and the reply
says how many were.

Nothing here touches Kafka, asyncio or torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from worker.errors import ConfigError, ErrorCode, RequestError, shown
from worker.model_config import TOKENIZER_FEEDS

__all__ = ["FEEDS", "MAX_TOKENIZER_BYTES", "TextEncoder", "Tokenized"]

FEEDS = dict(zip(TOKENIZER_FEEDS, ("ids", "attention_mask", "type_ids"), strict=True))
"""What a tokenizer step can feed the model (any of them, in the order the config lists them),
and the ``tokenizers.Encoding`` attribute each comes from."""

MAX_TOKENIZER_BYTES = 64 * 1024 * 1024
"""Largest ``tokenizer.json`` loaded (a config file is read as hostile input too)."""


@dataclass(frozen=True, slots=True)
class Tokenized:
    """One request's strings as the model takes them."""

    arrays: list[npt.NDArray[np.int64]]
    """One ``[rows, length]`` INT64 array per feed, padded to the request's longest string."""
    lengths: list[int]
    """Tokens of each string (special tokens included), after truncation."""
    truncated: int
    """How many strings were cut to ``max_length`` tokens."""


class TextEncoder:
    """A ``tokenizer.json`` set up for the worker: truncation on, padding by the batcher."""

    def __init__(self, path: Path, *, max_length: int, feeds: Sequence[str]) -> None:
        try:
            size = path.stat().st_size
            tokenizer = None if size > MAX_TOKENIZER_BYTES else Tokenizer.from_file(str(path))
        except Exception as exc:  # OSError, or the Rust parser's own exception
            raise ConfigError(f"{path}: cannot load tokenizer: {shown(str(exc), 200)}") from exc
        if tokenizer is None:
            raise ConfigError(f"{path}: {size} bytes; at most {MAX_TOKENIZER_BYTES} are read")
        padding: dict[str, Any] | None = tokenizer.padding
        self.pad_id = int(padding["pad_id"]) if padding else 0
        """Token id the batcher pads ``input_ids`` with (the tokenizer's own pad id)."""
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length)
        self._tokenizer = tokenizer
        self.max_length = max_length
        self.feeds = tuple(feeds)

    def pad_value(self, feed: str) -> int:
        """What a feed is padded with: the pad id for ``input_ids``, 0 otherwise."""
        return self.pad_id if feed == "input_ids" else 0

    def encode(self, name: str, strings: npt.NDArray[Any]) -> Tokenized:
        """Tokenise a request's strings (a 1-D object array of ``bytes``).

        Raises :class:`RequestError` (INVALID_ARGUMENT) for a string that is not UTF-8, or for
        no strings at all.
        """
        result = self.encode_many([(name, strings)])[0]
        if isinstance(result, RequestError):
            raise result
        return result

    def encode_many(
        self, requests: Sequence[tuple[str, npt.NDArray[Any]]]
    ) -> list[Tokenized | RequestError]:
        """Tokenise several requests' strings in one ``encode_batch`` call.

        Per request (input name, strings): its :class:`Tokenized`, or the
        :class:`RequestError` that refuses it (the others are not affected).
        """
        texts: list[str] = []
        spans: list[tuple[int, int] | RequestError] = []
        for name, strings in requests:
            try:
                decoded = _decoded(name, strings)
            except RequestError as exc:
                spans.append(exc)
                continue
            spans.append((len(texts), len(texts) + len(decoded)))
            texts += decoded
        encodings = self._tokenizer.encode_batch(texts) if texts else []
        return [
            span if isinstance(span, RequestError) else self._pack(encodings[span[0] : span[1]])
            for span in spans
        ]

    def _pack(self, encodings: Sequence[Any]) -> Tokenized:
        lengths = [len(e.ids) for e in encodings]
        width = max(lengths)
        arrays = []
        for feed in self.feeds:
            out = np.full((len(encodings), width), self.pad_value(feed), dtype=np.int64)
            for row, encoding in enumerate(encodings):
                values = getattr(encoding, FEEDS[feed])
                out[row, : len(values)] = values
            arrays.append(out)
        truncated = sum(1 for e in encodings if e.overflowing)
        return Tokenized(arrays, lengths, truncated)


def _decoded(name: str, strings: npt.NDArray[Any]) -> list[str]:
    texts = []
    for i, raw in enumerate(strings.tolist()):
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"input {shown(name)}: element {i} is not UTF-8 text (byte {exc.start})",
            ) from exc
    if not texts:
        raise RequestError(ErrorCode.INVALID_ARGUMENT, f"input {shown(name)} has no strings")
    return texts
