"""observe_many (worker.metrics) counts a group as Histogram.observe counts it one by one."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from worker.metrics import observe_many

BOUNDS = (0.001, 0.01, 0.1, 1.0, 10.0)
AMOUNTS = st.lists(
    st.one_of(st.sampled_from([*BOUNDS, 0.0, -1.0, math.inf]), st.floats(-5, 50)), max_size=40
)


def samples(histogram: Histogram, registry: CollectorRegistry) -> dict[str, float]:
    """The histogram's samples by name and ``le``."""
    del histogram
    return {
        f"{s.name}{s.labels.get('le', '')}": s.value
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


@settings(max_examples=300, deadline=None)
@given(AMOUNTS, st.booleans())
def test_observe_many_counts_as_observe_does(amounts: list[float], labelled: bool) -> None:
    """Every bucket, the count and the sum match observing the amounts one at a time."""
    counted = []
    for _ in range(2):
        registry = CollectorRegistry()
        histogram = Histogram(
            "h", "test", ["model"] if labelled else [], buckets=BOUNDS, registry=registry
        )
        counted.append((histogram.labels("m") if labelled else histogram, registry))
    (one_by_one, first), (grouped, second) = counted
    for amount in amounts:
        one_by_one.observe(amount)
    observe_many(grouped, amounts)
    expected, got = samples(one_by_one, first), samples(grouped, second)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        if name.endswith("_sum"):
            assert math.isclose(got[name], value, rel_tol=1e-9, abs_tol=1e-9)
        else:
            assert got[name] == value, name
