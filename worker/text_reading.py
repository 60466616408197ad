"""Reading a long string piece by piece, within the bounds of what the tokenizer is given.

The tokenizer never sees more than ``max_length`` x :data:`BYTES_PER_TOKEN` bytes of one string
at once (a *piece*), nor more than ``max_length`` x :data:`READ_BYTES_PER_TOKEN` of it in all,
nor more than :data:`PASS_BYTES` of strings in one call. A piece ends before whitespace or
punctuation that the tokenizer itself always splits a word at (:func:`separators_of`, probed),
or, in a run of neither, is cut within it (a ``word`` piece: its last word may go on, and
:class:`~worker.text.TextEncoder` reads it again in the next piece). :class:`Reading` is one
string's progress, :func:`next_piece` its next piece, :func:`groups` the pieces of one call.

Nothing here touches Kafka, asyncio or torch.
"""

from __future__ import annotations

import functools
import string
import sys
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tokenizers import Tokenizer

__all__ = [
    "BYTES_PER_TOKEN",
    "PASS_BYTES",
    "READ_BYTES_PER_TOKEN",
    "Piece",
    "Reading",
    "groups",
    "next_piece",
    "separators_of",
    "transparent",
]

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


@dataclass(slots=True)
class Reading:
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
class Piece:
    """Part of a string, given to the tokenizer at once."""

    text: str
    end: int
    """Character of the string where the piece ends."""
    size: int
    """UTF-8 bytes."""
    kind: str
    """``end`` (the rest of the string), ``split`` (ends before whitespace or punctuation), or
    ``word`` (cut within a run of ``cut_bytes`` without either: its last word may go on)."""


def groups(pieces: list[tuple[Reading, Piece]]) -> Iterator[list[tuple[Reading, Piece]]]:
    """Consecutive pieces of at most :data:`PASS_BYTES` together (at least one)."""
    group: list[tuple[Reading, Piece]] = []
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


def separators_of(tokenizer: Tokenizer) -> frozenset[str]:
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


def transparent(char: str) -> bool:
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


def next_piece(
    reading: Reading, cut: int, separators: frozenset[str], added: Sequence[tuple[str, bool]]
) -> Piece:
    """The next piece of a string: the rest if it fits, else up to its last separator.

    ``cut``: the most bytes of a piece; ``separators``: :func:`separators_of` the tokenizer;
    ``added``: its added tokens of more than one character (content, normalized), never cut
    in two.
    """
    text, start = reading.text, reading.position
    if start == 0 and reading.size <= cut:
        return Piece(text, len(text), reading.size, "end")
    window = text[start : start + cut]  # cut characters: at least cut bytes, if there are
    data = window.encode()
    if len(data) <= cut:
        if start + len(window) == len(text):
            return Piece(window, len(text), len(data), "end")
        end = start + len(window)
    else:
        end = start + len(data[:cut].decode("utf-8", "ignore"))  # whole characters only
    split = _last_separator(text, start + 1, end, separators)
    kind = "split" if split > 0 else "word"
    end = _clear_of_added(text, start, split if split > 0 else end, added)
    piece = text[start:end]
    return Piece(piece, end, len(piece.encode()), kind)


def _clear_of_added(text: str, start: int, end: int, added: Sequence[tuple[str, bool]]) -> int:
    """``end``, or the start of an added token (``[SEP]``, say) that it would cut in two."""
    moved = True
    while moved:
        moved = False
        for content, normalized in added:
            for i in range(max(start + 1, end - len(content) + 1), end):
                got = text[i : i + len(content)]
                if got == content or (normalized and got.lower() == content.lower()):
                    end, moved = i, True
                    break
    return end
