"""What one string costs the tokenizer is bounded (worker.text), and the tokens stay exact.

The reference is the MiniLM tokenizer itself, given each whole string with truncation on: the
worker must produce the same ids, mask and type ids, and count a string as truncated exactly
when the reference truncates it, while its tokenizer never sees more than ``cut_bytes`` of a
string at once. Small ``max_length`` values make small bounds, so that generated strings cross
them many times over. No broker, no model.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tokenizers import Encoding, Tokenizer

from worker.bench.corpus import paragraphs
from worker.text import BYTES_PER_TOKEN, TextEncoder, Tokenized

from .conftest import TEXT_MODELS

TOKENIZER = TEXT_MODELS / "minilm" / "1" / "tokenizer.json"
FEEDS = ("input_ids", "attention_mask", "token_type_ids")

SEPARATORS = [" ", "  ", "\n", "\t", "\r\n", "\u3000", "\u00a0", ",", ".", "!", "?", "\u2014",
              "\u3002", "\u3001", "(", ")", '"', "\u2026", "-", "'"]  # fmt: skip
"""Whitespace and punctuation: where BERT's pre-tokenizer ends a word."""
DROPPED = ["\x00", "\x07", "\x0b", "\x1f", "\x7f", "\x85", "\u200b", "\u200d", "\ufeff", "\u00ad",
           "\ue000", "\U000f0000", "\u0301", "\u0308", "\u0591", "\ufffd"]  # fmt: skip
"""Characters BERT's normalizer drops (controls, format, private use, accents; checked below)."""
SPECIAL = ["[SEP]", "[CLS]", "[UNK]", "[MASK]", "[PAD]"]


class Spy:
    """The encoder's tokenizer, recording every string it is given."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.seen: list[str] = []

    def encode_batch(self, texts: Sequence[str], **options: Any) -> list[Encoding]:
        """Record, then tokenise."""
        self.seen += texts
        return self.inner.encode_batch(texts, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@functools.cache
def encoder(max_length: int) -> TextEncoder:
    """The worker's encoder of MiniLM's tokenizer, cut at ``max_length`` tokens."""
    return TextEncoder(TOKENIZER, max_length=max_length, feeds=FEEDS)


@functools.cache
def reference(max_length: int) -> Tokenizer:
    """MiniLM's tokenizer as its authors use it: the whole string, truncated."""
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return tokenizer


def spied(max_length: int, monkeypatch: pytest.MonkeyPatch) -> tuple[TextEncoder, Spy]:
    """The encoder, its tokenizer replaced by a :class:`Spy` for this test."""
    text = encoder(max_length)
    spy = Spy(text._tokenizer)
    monkeypatch.setattr(text, "_tokenizer", spy)
    return text, spy


def encoded(text: TextEncoder, *strings: str) -> Tokenized:
    """The worker's tokens of some strings (one request)."""
    return text.encode("text", np.array([s.encode() for s in strings], dtype=object))


def assert_exact(text: TextEncoder, tokenized: Tokenized, row: int, whole: str) -> None:
    """Row ``row`` is what the reference makes of ``whole``, and so is its truncation count."""
    expected = reference(text.max_length).encode(whole)
    length = tokenized.lengths[row]
    got = [a[row, :length].tolist() for a in tokenized.arrays]
    assert got == [expected.ids, expected.attention_mask, expected.type_ids]
    assert all(
        (a[row, length:] == text.pad_value(f)).all()
        for a, f in zip(tokenized.arrays, FEEDS, strict=True)
    )


@st.composite
def long_texts(draw: st.DrawFn, max_length: int) -> str:
    """Text up to about half ``read_bytes``, no word longer than ``cut_bytes`` but dropped runs.

    Words, separators, runs of dropped characters, of whitespace and of Chinese (one word a
    character), special tokens: within the bounds of exactness.
    """
    cut = max_length * BYTES_PER_TOKEN
    spaces = draw(st.booleans())  # without ASCII spaces, pieces are cut by word ids alone
    blanks = " \n\t\u3000" if spaces else "\n\t\u3000"
    chars = st.characters(codec="utf-8", exclude_characters=None if spaces else " ")

    def run_of(alphabet: str) -> st.SearchStrategy[str]:
        """Long runs of a few characters (at most cut of them)."""
        return st.lists(
            st.tuples(st.sampled_from(alphabet), st.integers(1, cut // 4)), min_size=1, max_size=4
        ).map(lambda parts: "".join(c * k for c, k in parts))

    runs = {
        "word": st.text(chars, max_size=cut // 16),  # at most cut / 4 bytes
        "dropped": run_of("".join(DROPPED)),
        "blank": run_of(blanks),
        "special": st.sampled_from(SPECIAL),
        "glued": st.tuples(
            st.text(chars, max_size=cut // 32),
            st.text(st.sampled_from(DROPPED), max_size=cut // 32),
        ).map("".join),
        "chinese": st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=cut),
        "unknown": st.sampled_from(string.ascii_lowercase).map(lambda c: c * 101),  # one [UNK]
    }
    # Mostly words, or mostly runs that hold no tokens (read on, piece after piece).
    sparse = draw(st.booleans())
    kinds = ["dropped", "blank"] * 20 + [*runs] if sparse else ["word"] * 6 + [*runs]
    separators = st.sampled_from(
        [s for s in SEPARATORS if (spaces or " " not in s) and (s.isspace() or not sparse)]
    )
    half = encoder(max_length).read_bytes // 2
    target = draw(st.one_of(st.integers(0, cut), st.integers(cut, half)))
    out: list[str] = []
    size = 0
    while size < target:
        run, separator = draw(runs[draw(st.sampled_from(kinds))]), draw(separators)
        out += (run, separator)
        size += len(run.encode()) + len(separator.encode())
    return "".join(out)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 48).flatmap(lambda n: st.tuples(st.just(n), st.text(max_size=16 * n))))
def test_a_string_within_the_bound_is_tokenised_whole_and_exactly(case: tuple[int, str]) -> None:
    """A string of at most cut_bytes goes to the tokenizer whole; ids and count are exact."""
    max_length, whole = case
    text = encoder(max_length)
    assert len(whole.encode()) <= text.cut_bytes
    with pytest.MonkeyPatch.context() as patch:
        text, spy = spied(max_length, patch)
        tokenized = encoded(text, whole)
    assert spy.seen == [whole]
    assert_exact(text, tokenized, 0, whole)
    assert tokenized.truncated == int(bool(reference(max_length).encode(whole).overflowing))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(4, 24).flatmap(lambda n: st.tuples(st.just(n), long_texts(n))))
def test_a_long_string_keeps_exactly_the_first_tokens_of_the_whole(case: tuple[int, str]) -> None:
    """Past the bound: pieces of at most cut_bytes, yet the ids and count of the whole string."""
    max_length, whole = case
    with pytest.MonkeyPatch.context() as patch:
        text, spy = spied(max_length, patch)
        tokenized = encoded(text, whole, "a short one")
    assert max(len(s.encode()) for s in spy.seen) <= text.cut_bytes
    assert_exact(text, tokenized, 0, whole)
    assert_exact(text, tokenized, 1, "a short one")
    cut = [bool(reference(max_length).encode(s).overflowing) for s in (whole, "a short one")]
    assert tokenized.truncated == sum(cut)
    event(f"pieces of the long string: {min(len(spy.seen) - 1, 5)}{'+' * (len(spy.seen) > 6)}")
    event(f"truncated: {cut[0]}")


def test_megabyte_strings_cost_one_piece_and_are_counted_truncated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1 MiB of prose, of Chinese, of words without spaces: 16 KiB read each, exact tokens."""
    text, spy = spied(256, monkeypatch)
    assert text.cut_bytes == 16 * 1024
    prose = " ".join(paragraphs(400, seed=4))
    strings = [
        (prose * (2**20 // len(prose) + 1))[: 2**20],
        "东京是日本的首都\uff0c也是世界上最大的城市之一\u3002" * 20_000,
        "-".join(["word"] * 200_000),
    ]
    tokenized = encoded(text, *strings)
    assert len(spy.seen) == 3
    assert max(len(s.encode()) for s in spy.seen) <= text.cut_bytes
    assert tokenized.truncated == 3
    assert tokenized.lengths == [256, 256, 256]
    for row, whole in enumerate(strings):
        assert_exact(text, tokenized, row, whole[:50_000])  # its first 254 tokens are in there


def test_a_string_short_in_tokens_but_long_in_bytes_is_read_on_and_not_truncated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whitespace and dropped characters past the bound, then words: all read, nothing cut."""
    text, spy = spied(256, monkeypatch)
    whole = "start " + " " * 60_000 + "\x00" * 30_000 + " middle \n" + "\u200b" * 20_000 + " end"
    tokenized = encoded(text, whole)
    assert len(spy.seen) > 1
    assert max(len(s.encode()) for s in spy.seen) <= text.cut_bytes
    assert tokenized.truncated == 0
    assert_exact(text, tokenized, 0, whole)


@pytest.mark.parametrize(
    ("whole", "pieces"),
    [
        (" " * (2 << 20) + " the end", 16),  # read_bytes (256 KiB) of whitespace, then stop
        ("x" * (2 << 20) + " the end", 1),  # a 2 MiB run without a separator: one piece
    ],
)
def test_reading_stops_at_read_bytes_or_at_a_run_longer_than_a_piece(
    monkeypatch: pytest.MonkeyPatch, whole: str, pieces: int
) -> None:
    """The documented limits: what was read is used, and the string counts as truncated."""
    text, spy = spied(256, monkeypatch)
    tokenized = encoded(text, whole)
    assert len(spy.seen) == pieces
    assert sum(len(s.encode()) for s in spy.seen) <= text.read_bytes
    assert tokenized.truncated == 1
    assert tokenized.lengths[0] < 256


def test_the_dropped_characters_of_these_tests_are_dropped_by_the_tokenizer() -> None:
    """The generator's premise: MiniLM's normalizer makes no token of DROPPED characters."""
    assert [reference(256).encode(c * 3).ids for c in DROPPED] == [[101, 102]] * len(DROPPED)


def test_the_stage_cost_of_a_request_counts_each_string_at_most_cut_bytes() -> None:
    """cost(): what the first pass gives the tokenizer, the round budget's unit."""
    text = encoder(256)
    strings = np.array([b"x" * 10, b"y" * (4 << 20), b""], dtype=object)
    assert text.cost(strings) == 10 + text.cut_bytes


NEWER_PUNCTUATION = ["\u2e4f", "\u061d", "\u0a76", "\u2e52", "\U00010ead"]
"""Punctuation in Python's Unicode tables that tokenizers 0.23's older tables do not split at."""


@pytest.mark.parametrize("mark", NEWER_PUNCTUATION)
@pytest.mark.parametrize("lead", [" " * 16382, " " * 16378, "\u200b" * 6000])
def test_a_cut_never_falls_at_punctuation_the_tokenizer_does_not_know(lead: str, mark: str) -> None:
    """Only ASCII marks end a piece: 'ab' + U+2E4F + 'cd' near the cut stays one word."""
    text = encoder(256)
    whole = lead + f"ab{mark}cd efg hij"
    assert_exact(text, encoded(text, whole), 0, whole)
