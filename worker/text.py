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

Nothing here touches Kafka, asyncio or torch.
"""

from __future__ import annotations

import functools
import string
import sys
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tokenizers import Encoding, Tokenizer

from worker.errors import ConfigError, ErrorCode, RequestError, shown
from worker.model_config import TOKENIZER_FEEDS

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

BYTES_PER_TOKEN = 64
"""The tokenizer sees at most ``max_length`` times this many bytes of one string at once.

Generous for any ordinary text: the longest token in MiniLM's vocabulary is 18 bytes
("telecommunications"), English prose takes about 4 bytes a token with its space (the bench
corpus: 3.9), Chinese 3 (one token per character), and WordPiece reads at most 100 characters
(400 bytes) as one word. So one piece of ``max_length`` x 64 bytes (16 KiB for MiniLM) holds
``max_length`` tokens of ordinary text many times over, and a long string costs one piece.
Sparser text (runs of whitespace or of characters the tokenizer drops) is read on, piece by
piece, up to :data:`READ_BYTES_PER_TOKEN`."""

READ_BYTES_PER_TOKEN = 1024
"""At most ``max_length`` times this many bytes of one string are read (256 KiB for MiniLM):
text that holds fewer than ``max_length`` tokens in that much is not prose; what was read is
used and the string counts as truncated."""

PASS_BYTES = 1024 * 1024
"""Bytes of strings one ``encode_batch`` call takes (at least one piece): the tokenizer's
memory grows with what it holds at once (about 32 MiB per MiB of prose, measured)."""


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
        self._separators = _separators(tokenizer)
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
        readings: list[_Reading] = []
        spans: list[tuple[int, int] | RequestError] = []
        for name, strings in requests:
            try:
                decoded = _decoded(name, strings)
            except RequestError as exc:
                spans.append(exc)
                continue
            spans.append((len(readings), len(readings) + len(decoded)))
            readings += (_Reading(text, size) for text, size in decoded)
        self._read(readings)
        return [
            span if isinstance(span, RequestError) else self._pack(readings[span[0] : span[1]])
            for span in spans
        ]

    def _read(self, readings: Sequence[_Reading]) -> None:
        """Tokenise every string: all first pieces, then the next pieces of those not done."""
        active = list(readings)
        while active:
            for group in _groups([(r, self._next_piece(r)) for r in active]):
                encodings = self._tokenizer.encode_batch(
                    [piece.text for _, piece in group], add_special_tokens=False
                )
                for (reading, piece), encoding in zip(group, encodings, strict=True):
                    self._take(reading, piece, encoding)
            active = [r for r in active if not r.done]

    def _next_piece(self, reading: _Reading) -> _Piece:
        """The next piece of a string: the rest if it fits, else up to its last separator."""
        text, start, cut = reading.text, reading.position, self.cut_bytes
        if start == 0 and reading.size <= cut:
            return _Piece(text, len(text), reading.size, "end")
        window = text[start : start + cut]  # cut characters: at least cut bytes, if there are
        data = window.encode()
        if len(data) <= cut:
            if start + len(window) == len(text):
                return _Piece(window, len(text), len(data), "end")
            end = start + len(window)
        else:
            end = start + len(data[:cut].decode("utf-8", "ignore"))  # whole characters only
        split = _last_separator(text, start + 1, end, self._separators)
        kind = "split" if split > 0 else "word"
        end = self._clear_of_added(text, start, split if split > 0 else end)
        piece = text[start:end]
        return _Piece(piece, end, len(piece.encode()), kind)

    def _clear_of_added(self, text: str, start: int, end: int) -> int:
        """``end``, or the start of an added token (``[SEP]``, say) that it would cut in two."""
        moved = True
        while moved:
            moved = False
            for content, normalized in self._added:
                for i in range(max(start + 1, end - len(content) + 1), end):
                    got = text[i : i + len(content)]
                    if got == content or (normalized and got.lower() == content.lower()):
                        end, moved = i, True
                        break
        return end

    def _take(self, reading: _Reading, piece: _Piece, encoding: Encoding) -> None:
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

    def _take_word(self, reading: _Reading, piece: _Piece, encoding: Encoding) -> None:
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
            while after < piece.end and _transparent(text[after]):
                after += 1
        else:
            # The piece is one word so far: from where that word starts, marks before it too.
            after = start + offsets[0][0]
            while after > start and _transparent(text[after - 1]):
                after -= 1
        if after == start or reading.read >= self.read_bytes:
            reading.finish(ids[:need], truncated=True)  # one word from start to cut, or read enough
            return
        reading.ids += ids[:final]
        reading.position = after

    def _pack(self, readings: Sequence[_Reading]) -> Tokenized:
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


@dataclass(slots=True)
class _Reading:
    """One string being tokenised: where reading goes on, and the tokens settled so far."""

    text: str
    size: int
    """Its UTF-8 bytes."""
    position: int = 0
    """Character where the next piece starts."""
    read: int = 0
    """Bytes given to the tokenizer so far."""
    ids: list[int] = field(default_factory=list)
    truncated: bool = False
    done: bool = False

    def finish(self, ids: list[int], *, truncated: bool) -> None:
        """The last tokens are known."""
        self.ids += ids
        self.truncated = truncated
        self.done = True


@dataclass(frozen=True, slots=True)
class _Piece:
    text: str
    end: int
    """Character of the string where the piece ends."""
    size: int
    """UTF-8 bytes."""
    kind: str
    """``end`` (the rest of the string), ``split`` (ends before whitespace or punctuation), or
    ``word`` (cut within a run of ``cut_bytes`` without either: its last word may go on)."""


def _groups(pieces: list[tuple[_Reading, _Piece]]) -> Iterator[list[tuple[_Reading, _Piece]]]:
    """Consecutive pieces of at most :data:`PASS_BYTES` together (at least one)."""
    group: list[tuple[_Reading, _Piece]] = []
    size = 0
    for item in pieces:
        if group and size + item[1].size > PASS_BYTES:
            yield group
            group, size = [], 0
        group.append(item)
        size += item[1].size
    if group:
        yield group


def _last_separator(text: str, low: int, high: int, separators: frozenset[str]) -> int:
    """The last index from ``low`` to ``high`` (included) of one of ``separators``; -1."""
    space = text.rfind(" ", low, high + 1) if " " in separators else -1
    for i in range(high, max(space, low - 1), -1):
        if text[i] in separators:
            return i
    return space


def _separators(tokenizer: Tokenizer) -> frozenset[str]:
    """Whitespace and punctuation this tokenizer itself always splits a word at.

    Probed, not assumed: which characters count as punctuation depends on the Unicode tables
    the tokenizer was built with, older than Python's (U+2E4F is punctuation to Python, not to
    tokenizers 0.23, so a cut there would split a word the whole string keeps). A candidate
    counts if, between two letters, the normalizer keeps it apart and the pre-tokenizer ends
    the first letter's word at it. (A piece of a long string is cut only before one of these,
    or else by word ids.)
    """
    normalizer, pre = tokenizer.normalizer, tokenizer.pre_tokenizer
    found = []
    for char in _candidates():
        probe = f"a{char}b"
        normal = normalizer.normalize_str(probe) if normalizer is not None else probe
        words = [w for w, _ in pre.pre_tokenize_str(normal)] if pre is not None else [normal]
        if len(words) >= 2 and words[0] == "a" and words[-1] == "b":  # noqa: PLR2004
            found.append(char)
    return frozenset(found)


@functools.cache
def _candidates() -> tuple[str, ...]:
    """ASCII whitespace and punctuation, and Python's Unicode spaces and punctuation."""
    unicode = (
        chr(c)
        for c in range(0x80, sys.maxunicode + 1)
        if unicodedata.category(chr(c)) in _SEPARATING_CATEGORIES
    )
    return (*" \t\n\r", *string.punctuation, *unicode)


_SEPARATING_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po"})


def _transparent(char: str) -> bool:
    """A character that never ends a word: one BERT's normalizer drops, or a combining mark.

    Only looked at between a word's last token and the next separator, or between the piece's
    start and its one word: where the tokenizer made no token of it, so it cannot be a word's.
    """
    if char in "\t\n\r":
        return False
    return (
        unicodedata.combining(char) != 0
        or unicodedata.category(char) in _DROPPED_CATEGORIES
        or char == "\ufffd"
    )


_DROPPED_CATEGORIES = frozenset({"Mn", "Cc", "Cf", "Co", "Cs"})


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
