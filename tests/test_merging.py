"""Merging children's Prometheus expositions (worker.merging): sums, what outlives a child."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from worker.merging import lasting, merge, parse, render

counts = st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=5)


def exposition(requests: int, busy: float, observed: list[float]) -> str:
    """A child's /metrics with a labelled counter, a gauge and a histogram."""
    registry = CollectorRegistry()
    Counter("req", "answered", ["outcome"], registry=registry).labels("ok").inc(requests)
    Gauge("busy", "now", registry=registry).set(busy)
    histogram = Histogram("lat", "seconds", buckets=(0.1, 1.0), registry=registry)
    for value in observed:
        histogram.observe(value)
    return generate_latest(registry).decode()


def value(text: str, sample: str) -> float:
    """The value of one sample line (``name{labels} value``) of an exposition."""
    [line] = [line for line in text.splitlines() if line.startswith(sample + " ")]
    return float(line.rsplit(" ", 1)[1])


@given(counts)
def test_merged_counters_gauges_and_histograms_are_the_sums_of_the_childrens(
    requests: list[int],
) -> None:
    """Every sample of the merge is the sum over the children, as Prometheus text again."""
    children = [parse(exposition(n, 2.5, [0.05] * (n % 7))) for n in requests]
    text = render(merge(children)).decode()
    assert value(text, 'req_total{outcome="ok"}') == sum(requests)
    assert value(text, "busy") == 2.5 * len(requests)
    assert value(text, "lat_count") == sum(n % 7 for n in requests)
    assert value(text, 'lat_bucket{le="0.1"}') == sum(n % 7 for n in requests)
    assert "_created" not in text, "creation times are not summed"
    assert parse(text).samples == merge(children).samples, "the merge reads back the same"


def test_what_outlives_a_child_is_its_counts_not_its_gauges() -> None:
    """lasting() keeps counters and histograms (totals must not fall), drops gauges."""
    gone = lasting(parse(exposition(5, 9.0, [2.0])))
    text = render(merge([gone, parse(exposition(1, 1.0, []))])).decode()
    assert value(text, 'req_total{outcome="ok"}') == 6
    assert value(text, "busy") == 1.0
    assert value(text, 'lat_bucket{le="+Inf"}') == 1.0


def test_a_family_whose_type_differs_between_children_keeps_the_first() -> None:
    """Children of different versions disagreeing on a type never mix their samples."""
    counter = parse("# TYPE x_total counter\nx_total 1\n")
    gauge = parse("# TYPE x gauge\nx 5\n")
    assert counter.families["x"][0] == "counter", "the parser names a counter without _total"
    merged = merge([counter, gauge])
    assert merged.families["x"][0] == "counter"
    assert list(merged.samples.values()) == [1.0]


@pytest.mark.parametrize(
    "text", ["x{ 1", "# TYPE x counter\nx_total not-a-number\n", "Nbn_,{, ={bn_N\\,b}\n"]
)
def test_text_that_is_not_an_exposition_is_a_value_error(text: str) -> None:
    """A broken /metrics is refused (the parent logs it and keeps the last good one)."""
    with pytest.raises(ValueError):  # noqa: PT011 - the parser says little more
        parse(text)
