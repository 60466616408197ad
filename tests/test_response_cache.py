"""The response cache on its own (worker.response_cache) and its ``[cache]`` config table.

Property-based: any sequence of stores and lookups keeps the bytes within the bound and the
least recently used order of a reference model; keys are equal exactly for equal canonical
inputs. No model, no broker.
"""

from __future__ import annotations

import os
import tracemalloc
from collections import OrderedDict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.config_sections import MAX_CACHE_BYTES
from worker.domain import Tensor
from worker.errors import ConfigError
from worker.model_config import ModelConfig
from worker.response_cache import KEY_BYTES, ResponseCache, cache_key, entry_size

from .conftest import MODELS

names = st.text(min_size=0, max_size=6)
tensors = st.builds(
    Tensor,
    name=names,
    datatype=st.sampled_from(["FP32", "INT64", "BYTES", "UINT8"]),
    shape=st.lists(st.integers(0, 300), max_size=3).map(tuple),
    data=st.binary(max_size=24),
)
input_lists = st.lists(tensors, max_size=3)


def canonical(inputs: list[Tensor]) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    """What the key promises to depend on: the inputs by name, each field whole."""
    return sorted((t.name, t.datatype, t.shape, t.data) for t in inputs)


def outputs_of(size: int) -> list[Tensor]:
    """One FP32 output of ``size`` bytes (its values do not matter here)."""
    return [Tensor("y", "FP32", (1, size // 4), bytes(size))]


@given(input_lists, input_lists)
@settings(max_examples=400)
def test_keys_are_equal_exactly_when_canonical_inputs_are(a: list[Tensor], b: list[Tensor]) -> None:
    """Two input lists share a key if and only if they are the same inputs (any order)."""
    same = canonical(a) == canonical(b)
    if len({t.name for t in a}) == len(a) and len({t.name for t in b}) == len(b):
        assert (cache_key(a) == cache_key(b)) == same
    elif not same:  # duplicate names: order among them may count, but never a collision
        assert cache_key(a) != cache_key(b)


@given(input_lists, st.randoms())
def test_the_order_of_inputs_does_not_change_the_key(inputs: list[Tensor], rng: object) -> None:
    """A request's inputs in any order (distinct names) have one key, of KEY_BYTES bytes."""
    unique = list({t.name: t for t in inputs}.values())
    shuffled = list(unique)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    assert cache_key(shuffled) == cache_key(unique)
    assert len(cache_key(unique)) == KEY_BYTES


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([Tensor("ab", "FP32", (1,), b"")], [Tensor("a", "bFP32", (1,), b"")]),
        ([Tensor("x", "UINT8", (1, 11), b"")], [Tensor("x", "UINT8", (11, 1), b"")]),
        ([Tensor("x", "UINT8", (), b"")], [Tensor("x", "UINT8", (0,), b"")]),
        ([Tensor("x", "UINT8", (2,), b"ab")], [Tensor("x", "UINT8", (2,), b"a"),
                                                Tensor("y", "UINT8", (2,), b"b")]),
        ([Tensor("x", "UINT8", (1,), b"a"), Tensor("y", "UINT8", (1,), b"")],
         [Tensor("x", "UINT8", (1,), b""), Tensor("y", "UINT8", (1,), b"a")]),
        ([Tensor("\ud800", "BYTES", (1,), b"")], [Tensor("?", "BYTES", (1,), b"")]),
    ],
)  # fmt: skip
def test_fields_that_concatenate_alike_never_share_a_key(a: list[Tensor], b: list[Tensor]) -> None:
    """Names, datatypes, shapes and bytes are length-prefixed: no collision by concatenation."""
    assert cache_key(a) != cache_key(b)


def test_parameters_and_outputs_asked_for_are_not_part_of_the_key() -> None:
    """The key is over the inputs only: nothing else of a request changes its outputs."""
    inputs = [Tensor.from_strings("text", ["hello"])]
    assert cache_key(inputs) == cache_key(list(inputs))
    assert cache_key(inputs) != cache_key([Tensor.from_strings("text", ["hello "])])


ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 7), st.integers(0, 900)),
        st.tuples(st.just("get"), st.integers(0, 7), st.just(0)),
    ),
    max_size=60,
)


@given(st.integers(1, 3000), ops)
@settings(max_examples=300)
def test_bytes_stay_within_the_bound_and_the_order_is_least_recently_used(
    max_bytes: int, steps: list[tuple[str, int, int]]
) -> None:
    """Against a reference LRU: same entries, same order, same evictions; never over the bound."""
    cache = ResponseCache(max_bytes)
    reference: OrderedDict[bytes, int] = OrderedDict()
    evictions = 0
    for op, k, size in steps:
        key = bytes([k]) * KEY_BYTES
        if op == "get":
            got = cache.get(key)
            assert (got is not None) == (key in reference)
            if key in reference:
                reference.move_to_end(key)
        else:
            outputs = outputs_of(size)
            need = entry_size(key, outputs)
            evicted = cache.put(key, outputs)
            expected = 0
            if need <= max_bytes:
                reference.pop(key, None)
                while sum(reference.values()) + need > max_bytes:
                    reference.popitem(last=False)
                    expected += 1
                reference[key] = need
            assert evicted == expected
            evictions += expected
        assert cache.bytes == sum(reference.values()) <= max_bytes
        assert cache.keys() == list(reference)
    assert cache.evictions == evictions


def test_an_entry_larger_than_the_bound_is_never_stored_and_evicts_nothing() -> None:
    """A too-big answer leaves the cache as it was."""
    cache = ResponseCache(2000)
    small = bytes([1]) * KEY_BYTES
    cache.put(small, outputs_of(100))
    assert cache.put(bytes([2]) * KEY_BYTES, outputs_of(4000)) == 0
    assert cache.keys() == [small]
    assert cache.get(bytes([2]) * KEY_BYTES) is None


def test_hits_misses_and_a_returned_list_that_cannot_change_the_entry() -> None:
    """A lookup counts a hit or a miss; the list it returns is a copy."""
    cache = ResponseCache(10_000)
    key = bytes(KEY_BYTES)
    assert cache.get(key) is None
    cache.put(key, outputs_of(8))
    got = cache.get(key)
    assert got is not None
    got.clear()
    assert cache.get(key) == outputs_of(8)
    assert (cache.hits, cache.misses) == (2, 1)


def test_a_closed_cache_holds_nothing_and_stores_nothing() -> None:
    """Closing frees every entry; a late store (a job of a retired version) is dropped."""
    cache = ResponseCache(10_000)
    cache.put(bytes(KEY_BYTES), outputs_of(8))
    cache.close()
    cache.put(bytes([1]) * KEY_BYTES, outputs_of(8))
    assert (len(cache), cache.bytes) == (0, 0)


def test_a_stream_of_unique_inputs_never_grows_the_cache_past_its_bound() -> None:
    """10,000 distinct requests, a 64 KiB cache: within the bound after every store."""
    cache = ResponseCache(64 * 1024)
    for i in range(10_000):
        key = cache_key([Tensor("pixels", "FP32", (1, 1), i.to_bytes(4, "little"))])
        assert cache.get(key) is None
        cache.put(key, outputs_of(40))
        assert cache.bytes <= cache.max_bytes
    assert cache.evictions == 10_000 - len(cache)
    assert len(cache) == 64 * 1024 // entry_size(key, outputs_of(40))


def test_counted_bytes_cover_the_memory_entries_really_take() -> None:
    """tracemalloc: what 2,000 entries allocate (their tensors too) is within what they count."""
    cache = ResponseCache(10**9)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            outputs = [
                Tensor(f"out{i}", "FP32", (1, 10), os.urandom(40)),
                Tensor(f"lab{i}", "INT64", (1,), os.urandom(8)),
            ]
            cache.put(os.urandom(KEY_BYTES), outputs)
        del outputs
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache) == 2000
    assert held <= cache.bytes


def test_max_bytes_below_one_is_refused() -> None:
    """A cache of no bytes is no cache: the config's 0 means none is made."""
    with pytest.raises(ValueError, match="at least 1"):
        ResponseCache(0)


def write_config(tmp_path: Path, extra: str) -> Path:
    """A copy of digits' config.toml with ``extra`` at its top (top-level keys too); its folder."""
    folder = tmp_path / "digits"
    folder.mkdir()
    text = (MODELS / "digits" / "config.toml").read_text()
    (folder / "config.toml").write_text(extra + "\n" + text)
    return folder


def test_a_config_without_cache_has_none_and_max_bytes_is_read(tmp_path: Path) -> None:
    """No [cache]: max_bytes 0 (off); [cache] max_bytes = N: N."""
    assert ModelConfig.load(MODELS / "digits").cache.max_bytes == 0
    config = ModelConfig.load(write_config(tmp_path, "[cache]\nmax_bytes = 1048576"))
    assert config.cache.max_bytes == 1_048_576


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ("[cache]\nmax_bytes = -1", "cache.max_bytes = -1"),
        ('[cache]\nmax_bytes = "1GB"', "cache.max_bytes = '1GB'"),
        ("[cache]\nmax_bytes = 1.5e6", "cache.max_bytes = 1500000.0"),
        ("[cache]\nmax_bytes = true", "cache.max_bytes = True"),
        (f"[cache]\nmax_bytes = {MAX_CACHE_BYTES + 1}", "expected a whole number of bytes"),
        ("[cache]\nmax_bytes = 9223372036854775807", "expected a whole number of bytes"),
        ("[cache]\nmax_bytes = [1]", "cache.max_bytes = [1]"),
        ("[cache]\nmax_bytes = 10\nmax_entries = 5", "unknown [cache] key(s) ['max_entries']"),
        ("cache = 5", "[cache] must be a table"),
        ("[cache.max_bytes]\nx = 1", "cache.max_bytes = {'x': 1}"),
    ],
)
def test_hostile_cache_values_are_a_clear_config_error(
    tmp_path: Path, extra: str, says: str
) -> None:
    """Every bad [cache] value names the file and the key, and says what is expected."""
    with pytest.raises(ConfigError) as raised:
        ModelConfig.load(write_config(tmp_path, extra))
    assert says in str(raised.value)
    assert "config.toml" in str(raised.value)
