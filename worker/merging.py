"""Prometheus expositions of several worker processes merged into one (process mode).

Pure functions, no I/O: :func:`parse` reads one child's ``/metrics`` text into a
:class:`Snapshot`, :func:`merge` sums snapshots sample by sample (same name, same labels),
:func:`lasting` keeps what must outlive a child (counters, histograms, summaries: the parent
adds a dead child's last ones to the living children's, so totals do not fall when a child
is restarted; gauges describe now, so only living children's count) and :func:`render`
writes the text exposition back. ``*_created`` samples (a counter's creation time) are
dropped: a sum of them means nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

__all__ = ["LASTING_TYPES", "Snapshot", "lasting", "merge", "parse", "render"]

LASTING_TYPES = frozenset({"counter", "histogram", "summary"})
"""Metric types whose values accumulate over a process's life."""

Labels = tuple[tuple[str, str], ...]


@dataclass
class Snapshot:
    """Metric families (name: type, help) and their samples ((family, sample, labels): value)."""

    families: dict[str, tuple[str, str]] = field(default_factory=dict)
    samples: dict[tuple[str, str, Labels], float] = field(default_factory=dict)


def parse(text: str) -> Snapshot:
    """One exposition; raises ValueError if it is not Prometheus text."""
    try:
        return _parse(text)
    except ValueError:
        raise
    except Exception as exc:  # the parser fails in several ways on malformed text
        raise ValueError(f"not a Prometheus exposition: {exc!r:.200}") from exc


def _parse(text: str) -> Snapshot:
    snapshot = Snapshot()
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):
            continue
        snapshot.families.setdefault(family.name, (family.type, family.documentation))
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
            snapshot.samples[key] = snapshot.samples.get(key, 0.0) + sample.value
    return snapshot


def lasting(snapshot: Snapshot) -> Snapshot:
    """The part of a snapshot that keeps counting after its process is gone."""
    families = {n: f for n, f in snapshot.families.items() if f[0] in LASTING_TYPES}
    samples = {k: v for k, v in snapshot.samples.items() if k[0] in families}
    return Snapshot(families, samples)


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Sum samples of the same family, name and labels; the first type and help win."""
    merged = Snapshot()
    for snapshot in snapshots:
        for name, described in snapshot.families.items():
            merged.families.setdefault(name, described)
        for key, value in snapshot.samples.items():
            if merged.families[key[0]] == snapshot.families[key[0]]:
                merged.samples[key] = merged.samples.get(key, 0.0) + value
    return merged


class _Fixed(Collector):
    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        metrics: dict[str, Metric] = {}
        for name, (kind, documentation) in sorted(self._snapshot.families.items()):
            metrics[name] = Metric(name, documentation, kind)
        for (name, sample, labels), value in self._snapshot.samples.items():
            metrics[name].add_sample(sample, dict(labels), value)
        yield from metrics.values()


def render(snapshot: Snapshot) -> bytes:
    """The Prometheus text exposition of a snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(snapshot))
    return generate_latest(registry)
