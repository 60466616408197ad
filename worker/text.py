"""A model's tokenizer step: strings in, token ids and attention masks out.

A model whose ``config.toml`` has a ``[tokenizer]`` table takes one ``BYTES`` input (UTF-8
strings) and its version folder holds a Hugging Face ``tokenizer.json``. Each request's strings
are tokenised once, before batching, with the ``tokenizers`` library (Rust; ``encode_batch``
releases the GIL): the exact token counts then steer batching (:mod:`worker.batching`). The
worker tokenises what has arrived in one call, in a thread of its own
(:mod:`worker.tokenizing`). Strings longer than ``max_length`` tokens are cut, and the reply
says how many were.

What one string costs is bounded by ``max_length``, not by its size: the tokenizer never sees
more than :attr:`TextEncoder.cut_bytes` of a string at once, and no overflow is built (strings
are truncated here, by count). A longer string is read piece by piece, each ending before
whitespace or punctuation (in a run of neither, before its last word, by the tokenizer's word
ids: the next piece reads that word again), until its first ``max_length`` tokens are known.
For a BERT-style tokenizer such as MiniLM's those are exactly the tokens of the whole string,
truncated, and the string counts as truncated exactly when the whole string would be
(``tests/test_text_bounds.py``). Reading stops early, and the string counts as truncated, only
after :attr:`TextEncoder.read_bytes`, or at a piece that is one word from start to end (a run
of ``cut_bytes`` without whitespace or punctuation that the tokenizer reads as one word).
Those bounds, and where a string is cut into pieces, are :mod:`worker.text_reading`; here, the
tokenizer itself and the tokens of each piece.

Nothing here touches Kafka, asyncio or torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tokenizers import Encoding, Tokenizer

from worker.errors import ConfigError, ErrorCode, RequestError, detached, shown
from worker.model_config import TOKENIZER_FEEDS
from worker.text_reading import (
    BYTES_PER_TOKEN,
    PASS_BYTES,
    READ_BYTES_PER_TOKEN,
    Piece,
    Reading,
    groups,
    next_piece,
    separators_of,
    transparent,
)

__all__ = [
    "BYTES_PER_TOKEN",
    "FEEDS",
    "MAX_TOKENIZER_BYTES",
    "PASS_BYTES",
    "READ_BYTES_PER_TOKEN",
    "TextEncoder",
    "Tokenized",
]

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


@dataclass(frozen=True, slots=True)
class _Template:
    """The special tokens the post-processor puts around one string's tokens."""

    before: tuple[int, ...]
    after: tuple[int, ...]
    before_types: tuple[int, ...]
    after_types: tuple[int, ...]
    type_id: int
    """Token type id of the string's own tokens."""

    @property
    def specials(self) -> int:
        """Special tokens added to each string."""
        return len(self.before) + len(self.after)


class TextEncoder:
    """A ``tokenizer.json`` set up for the worker: strings cut to ``max_length`` tokens."""

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
        tokenizer.no_truncation()  # truncated here, by count: no overflow is ever built
        self._tokenizer = tokenizer
        self._separators = separators_of(tokenizer)
        """Characters a word always ends before, in this tokenizer's own view."""
        self._template = _template(tokenizer, path)
        self.max_length = max_length
        self.content_length = max_length - self._template.specials
        """Tokens of a string kept (``max_length`` less the special tokens)."""
        if self.content_length < 0:
            raise ConfigError(
                f"{path}: max_length {max_length} leaves no room for the tokenizer's "
                f"{self._template.specials} special tokens"
            )
        self.cut_bytes = max_length * BYTES_PER_TOKEN
        """The most bytes of one string the tokenizer is given at once (:data:`BYTES_PER_TOKEN`)."""
        self.read_bytes = max_length * READ_BYTES_PER_TOKEN
        """The most bytes of one string read in all (:data:`READ_BYTES_PER_TOKEN`)."""
        self._added = tuple(
            (t.content, t.normalized)
            for t in tokenizer.get_added_tokens_decoder().values()
            if len(t.content) > 1
        )
        self.feeds = tuple(feeds)

    def pad_value(self, feed: str) -> int:
        """What a feed is padded with: the pad id for ``input_ids``, 0 otherwise."""
        return self.pad_id if feed == "input_ids" else 0

    def cost(self, strings: npt.NDArray[Any]) -> int:
        """Bytes of these strings the tokenizer is first given (each at most :attr:`cut_bytes`)."""
        cut = self.cut_bytes
        return sum(min(len(raw), cut) for raw in strings.tolist())

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
        """Tokenise several requests' strings together (each call at most :data:`PASS_BYTES`).

        Per request (input name, strings): its :class:`Tokenized`, or the
        :class:`RequestError` that refuses it (the others are not affected).
        """
        readings: list[Reading] = []
        spans: list[tuple[int, int] | RequestError] = []
        for name, strings in requests:
            try:
                decoded = _decoded(name, strings)
            except RequestError as exc:
                spans.append(detached(exc))  # kept: not with this frame (all the strings)
                continue
            spans.append((len(readings), len(readings) + len(decoded)))
            readings += (Reading(text, size) for text, size in decoded)
        self._read(readings)
        return [
            span if isinstance(span, RequestError) else self._pack(readings[span[0] : span[1]])
            for span in spans
        ]

    def _read(self, readings: Sequence[Reading]) -> None:
        """Tokenise every string: all first pieces, then the next pieces of those not done."""
        active = list(readings)
        while active:
            pieces = [
                (r, next_piece(r, self.cut_bytes, self._separators, self._added)) for r in active
            ]
            for group in groups(pieces):
                encodings = self._tokenizer.encode_batch(
                    [piece.text for _, piece in group], add_special_tokens=False
                )
                for (reading, piece), encoding in zip(group, encodings, strict=True):
                    self._take(reading, piece, encoding)
            active = [r for r in active if not r.done]

    def _take(self, reading: Reading, piece: Piece, encoding: Encoding) -> None:
        """Keep what a piece's tokens settle; mark the string done when its tokens are known."""
        reading.read += piece.size
        if piece.kind == "word":
            self._take_word(reading, piece, encoding)
            return
        ids = encoding.ids  # the piece ends the string or before a separator: all are final
        need = self.content_length - len(reading.ids)
        if len(ids) > need:
            reading.finish(ids[:need], truncated=True)
        elif piece.kind == "end":
            reading.finish(ids, truncated=False)
        else:
            reading.ids += ids
            reading.position = piece.end
            if reading.read >= self.read_bytes:
                reading.finish([], truncated=True)

    def _take_word(self, reading: Reading, piece: Piece, encoding: Encoding) -> None:
        """A piece cut within a run without separators: its last word may go on past the cut."""
        ids = encoding.ids
        need = self.content_length - len(reading.ids)
        if not ids:  # nothing but characters the tokenizer drops: read on after them
            reading.position = piece.end
            if reading.read >= self.read_bytes:
                reading.finish([], truncated=True)
            return
        text, start, offsets = reading.text, reading.position, encoding.offsets
        words = encoding.word_ids
        last = words[-1]
        final = 0 if last is None else words.index(last)  # tokens before the last word's
        if last is not None and text[start + offsets[final][0]] in self._separators:
            final = len(ids)  # the last word is a punctuation mark: whole (split off alone)
        if final > need or (final == need and final < len(ids)):  # known, and more follow
            reading.finish(ids[:need], truncated=True)
            return
        if final:
            # After the last whole word (and any marks that belong to it), up to the next one.
            after = start + max(end for _, end in offsets[:final])
            while after < piece.end and transparent(text[after]):
                after += 1
        else:
            # The piece is one word so far: from where that word starts, marks before it too.
            after = start + offsets[0][0]
            while after > start and transparent(text[after - 1]):
                after -= 1
        if after == start or reading.read >= self.read_bytes:
            reading.finish(ids[:need], truncated=True)  # one word from start to cut, or read enough
            return
        reading.ids += ids[:final]
        reading.position = after

    def _pack(self, readings: Sequence[Reading]) -> Tokenized:
        template = self._template
        lengths = [len(r.ids) + template.specials for r in readings]
        width = max(lengths)
        arrays = []
        for feed in self.feeds:
            out = np.full((len(readings), width), self.pad_value(feed), dtype=np.int64)
            for row, reading in enumerate(readings):
                if feed == "input_ids":
                    values = [*template.before, *reading.ids, *template.after]
                    out[row, : len(values)] = values
                elif feed == "attention_mask":
                    out[row, : lengths[row]] = 1
                else:
                    types = [*template.before_types, *[template.type_id] * len(reading.ids),
                             *template.after_types]  # fmt: skip
                    out[row, : len(types)] = types
            arrays.append(out)
        truncated = sum(1 for r in readings if r.truncated)
        return Tokenized(arrays, lengths, truncated)


def _template(tokenizer: Tokenizer, path: Path) -> _Template:
    """The special tokens around one string, found by post-processing a one-word probe."""
    probe = tokenizer.encode("a", add_special_tokens=False)
    done = tokenizer.post_process(probe)
    own = [i for i, special in enumerate(done.special_tokens_mask) if not special]
    first = own[0] if own else 0
    if (
        not probe.ids
        or own != list(range(first, first + len(probe.ids)))
        or done.ids[first : first + len(own)] != probe.ids
        or not all(done.attention_mask)
        or len(done.ids) - len(own) != tokenizer.num_special_tokens_to_add(is_pair=False)
    ):
        raise ConfigError(
            f"{path}: the tokenizer's post-processor does not put fixed special tokens around "
            "a string's tokens; not supported"
        )
    after = first + len(own)
    return _Template(
        tuple(done.ids[:first]), tuple(done.ids[after:]),
        tuple(done.type_ids[:first]), tuple(done.type_ids[after:]), done.type_ids[first],
    )  # fmt: skip


def _decoded(name: str, strings: npt.NDArray[Any]) -> list[tuple[str, int]]:
    texts = []
    for i, raw in enumerate(strings.tolist()):
        try:
            texts.append((raw.decode("utf-8"), len(raw)))
        except UnicodeDecodeError as exc:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"input {shown(name)}: element {i} is not UTF-8 text (byte {exc.start})",
            ) from exc
    if not texts:
        raise RequestError(ErrorCode.INVALID_ARGUMENT, f"input {shown(name)} has no strings")
    return texts
