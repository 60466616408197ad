"""Prometheus metrics of one worker (prometheus-client), in seconds, by model and version.

Each :class:`Metrics` has its own registry, so several workers in one process (tests) do not
mix their counts. The HTTP endpoint (:mod:`worker.http`) serves :meth:`Metrics.render`.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from worker.answers import Settled

__all__ = ["Metrics", "observe_many"]

# Latency buckets from 1 ms to 30 s: a batch delay of a few ms up to a backlog being drained.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_COMPUTE = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric the worker exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "inference_requests",
            "Requests answered, by outcome: ok or the error code of the reply",
            ["model", "version", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "inference_request_latency_seconds",
            "From the request record's Kafka timestamp to its reply being acknowledged",
            ["model", "version"],
            buckets=_LATENCY,
            registry=r,
        )
        self.queue_wait = Histogram(
            "inference_queue_wait_seconds",
            "From decoding a request to the start of its batch's forward pass",
            ["model", "version"],
            buckets=_LATENCY,
            registry=r,
        )
        self.compute = Histogram(
            "inference_batch_compute_seconds",
            "Forward pass time of one batch",
            ["model", "version"],
            buckets=_COMPUTE,
            registry=r,
        )
        self.batch_size = Histogram(
            "inference_batch_size",
            "Requests per batch",
            ["model", "version"],
            buckets=_BATCH,
            registry=r,
        )
        self.tokens = Counter(
            "inference_batch_tokens",
            "Sequence models: tokens in batches, real or padded (efficiency: real / padded)",
            ["model", "version", "kind"],
            registry=r,
        )
        self.busy = Counter(
            "inference_instance_busy_seconds",
            "Time each instance of a version spent running batches (rate: its utilisation)",
            ["model", "version", "instance"],
            registry=r,
        )
        self.device_memory = Gauge(
            "inference_device_memory_bytes",
            "CUDA memory held by torch on each device in use, allocated or reserved (cached)",
            ["device", "kind"],
            registry=r,
        )
        self.transport = Counter(
            "inference_transport_requests",
            "Answered requests by transport (kafka, rest, grpc) and outcome (ok or an error code)",
            ["transport", "outcome"],
            registry=r,
        )
        self.schema_lookups = Counter(
            "inference_schema_lookups",
            "Schema registry lookups of new schema ids, by result (ok, missing, unavailable)",
            ["result"],
            registry=r,
        )
        self.in_flight = Gauge(
            "inference_requests_in_flight",
            "Requests in flight, Kafka records and REST/gRPC calls: taken in, not yet answered",
            registry=r,
        )
        self.shadow_queued = Gauge(
            "inference_shadow_queued",
            "Shadow copies waiting for their lane (bounded by max_in_flight; beyond it dropped)",
            registry=r,
        )
        self.lag = Gauge(
            "inference_consumer_lag",
            "Records of an assigned partition not yet committed (high watermark - committed)",
            ["topic", "partition"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "inference_dead_lettered",
            "Records copied to the dead-letter topic, by stage",
            ["stage"],
            registry=r,
        )
        self.reply_topic_refused = Counter(
            "inference_reply_topic_refused",
            "Requests that named a reply topic they may not use (answered on the default one)",
            registry=r,
        )
        self.fetch_errors = Counter(
            "inference_fetch_errors",
            "Fetches that failed with a Kafka error (retried)",
            registry=r,
        )
        self.fetch_pauses = Counter(
            "inference_fetch_pauses",
            "Times fetching paused because max_in_flight requests were in flight",
            registry=r,
        )
        self.commits = Counter(
            "inference_commits", "Offset commits, by result", ["result"], registry=r
        )
        self.shadow = Counter(
            "inference_shadow_comparisons",
            "Shadow results compared with the primary's: agreed, disagreed, failed, dropped",
            ["model", "primary", "shadow", "result"],
            registry=r,
        )
        self.rebalances = Counter(
            "inference_rebalances",
            "Rebalances this worker took part in (each new assignment it received)",
            registry=r,
        )
        self.revoke = Histogram(
            "inference_revoke_seconds",
            "Time from partitions revoked to their running batches answered and committed",
            buckets=_LATENCY,
            registry=r,
        )
        self.partitions = Gauge(
            "inference_partitions_assigned",
            "Partitions of the requests topic assigned to this worker now",
            registry=r,
        )
        self.abandoned = Counter(
            "inference_abandoned_requests",
            "Requests of revoked partitions left unanswered for their partitions' next owner",
            registry=r,
        )
        self.transactions = Counter(
            "inference_transactions",
            "Exactly-once delivery: transactions by result (committed, aborted)",
            ["result"],
            registry=r,
        )
        self.transaction_time = Histogram(
            "inference_transaction_seconds",
            "Exactly-once delivery: from a transaction's start to its commit",
            buckets=_LATENCY,
            registry=r,
        )
        self.cache_hits = Counter(
            "inference_cache_hits",
            "Requests answered from their version's response cache ([cache] in config.toml)",
            ["model", "version"],
            registry=r,
        )
        self.cache_misses = Counter(
            "inference_cache_misses",
            "Requests looked up in their version's response cache and not found (then run)",
            ["model", "version"],
            registry=r,
        )
        self.cache_evictions = Counter(
            "inference_cache_evictions",
            "Entries a version's response cache dropped (least recently used) to make room",
            ["model", "version"],
            registry=r,
        )
        self.cache_bytes = Gauge(
            "inference_cache_bytes",
            "Bytes a served version's response cache holds now (entries at their real size)",
            ["model", "version"],
            registry=r,
        )
        self.reloads = Counter(
            "inference_model_reloads",
            "Model repository reloads, by result",
            ["result"],
            registry=r,
        )

    def acknowledged(self, items: Sequence[Settled], now_ms: float) -> None:
        """Count a group of acknowledged messages: replies by outcome, latency, dead letters."""
        outcomes: Tally[tuple[str, str, str]] = Tally()
        transports: Tally[tuple[str, str]] = Tally()
        latency: dict[tuple[str, str], list[float]] = {}  # per version, observed once per group
        for item in items:
            if item.stage is not None:
                self.dead_lettered.labels(item.stage).inc()
            meta = item.meta
            if meta is None:
                continue
            if meta.refused_topic:
                self.reply_topic_refused.inc()
            labels = meta.labels
            outcomes[(*labels, meta.outcome)] += 1
            transports[(item.origin.transport, meta.outcome)] += 1
            waited = max(0.0, now_ms - item.origin.timestamp_ms) / 1000
            (latency.get(labels) or latency.setdefault(labels, [])).append(waited)
        for labels, amounts in latency.items():
            observe_many(self.latency.labels(*labels), amounts)
        for labels_outcome, count in outcomes.items():
            self.requests.labels(*labels_outcome).inc(count)
        for transport_outcome, count in transports.items():
            self.transport.labels(*transport_outcome).inc(count)

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample (0 if it was never set): for probes and tests."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


def observe_many(histogram: Histogram, amounts: Sequence[float]) -> None:
    """``histogram.observe(a)`` for each of ``amounts``, with one increment per bucket hit.

    A group's observations are counted at once: the bucket of each is found by bisection
    (``observe`` scans the bounds, under a lock per increment). Reads prometheus-client's
    ``Histogram`` internals; tests/test_metrics_batched.py holds it to ``observe``.
    """
    histogram._raise_if_not_observable()  # type: ignore[no-untyped-call]  # its own check
    bounds = histogram._upper_bounds
    buckets = histogram._buckets
    hits = Tally(bisect_left(bounds, a) for a in amounts if not math.isnan(a))
    histogram._sum.inc(sum(amounts))
    for index, count in hits.items():
        buckets[index].inc(count)
