"""The response cache in the request path: looked up at admission, filled when a batch answers.

::

    Pipeline.dispatch ─> admit ─> Admitted ─> lookup(job) ─┬─ hit: its Answer now (no batch,
                                                           │        no shadow copy, no model)
                                                           └─ miss: tokenizer stage, lanes
    RunAnswers._answer (worker.answering) ─> store(job, outputs): a success, not truncated

The cache itself (:mod:`worker.response_cache`) is pure; here it meets jobs, replies and
metrics. A version's cache is its :class:`~worker.model.LoadedModel`'s (``[cache]`` in its
``config.toml``); :class:`CacheGauges` follows reloads: a cache no longer served (the version
was removed, or reloaded with a changed program or ``[cache]`` table) is closed, so that it
frees its memory at once and a job of the old version answered later stores nothing.

A hit's reply: the cached outputs under the request's own id, model name and the version that
served it, timing ``queue_us`` 0, ``compute_us`` 0, ``batch_size`` 0 (it ran in no batch), and
the parameter ``cached`` true. A request whose deadline has passed is not looked up: it goes
its usual way and its lane answers DEADLINE_EXCEEDED without running the model, as without a
cache. Shadow copies are never looked up nor stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from worker.admission import Job
from worker.answers import Answer
from worker.domain import InferenceRequest, InferenceResponse, Tensor, Timing
from worker.metrics import Metrics
from worker.model import LoadedModel
from worker.repository import ModelRepository
from worker.response_cache import ResponseCache, cache_key

__all__ = ["CACHED", "CacheGauges", "cached_response", "lookup", "store"]

CACHED = "cached"
"""The reply parameter (true) of an answer from the cache."""


def lookup(job: Job, metrics: Metrics) -> Answer | None:
    """A hit's answer to ``job`` (its version's cache holds its inputs' outputs), else None.

    None also when the version has no cache, for a shadow copy and for an expired request.
    """
    model = job.model
    cache = model.cache
    if cache is None or job.is_shadow:
        return None
    if job.deadline_ms is not None and job.deadline_ms < time.time() * 1000:
        return None
    job.cache_key = key = cache_key(job.request.inputs)  # kept: a miss stores under it
    outputs = cache.get(key)
    labels = (model.name, model.version)
    if outputs is None:
        metrics.cache_misses.labels(*labels).inc()
        return None
    metrics.cache_hits.labels(*labels).inc()
    return Answer(job.origin, cached_response(job.request, model, outputs), served=True)


def store(job: Job, outputs: list[Tensor], metrics: Metrics) -> None:
    """Keep a successful answer's ``outputs`` in its version's cache (if it has one).

    Not for shadow copies, nor for an answer whose strings the tokenizer cut (``truncated``):
    it answers a request other than the one that was sent.
    """
    cache = job.model.cache
    if cache is None or job.is_shadow or job.prepared.truncated:
        return
    key = job.cache_key if job.cache_key is not None else cache_key(job.request.inputs)
    evicted = cache.put(key, outputs)
    if evicted:
        metrics.cache_evictions.labels(job.model.name, job.model.version).inc(evicted)


def cached_response(
    request: InferenceRequest, model: LoadedModel, outputs: list[Tensor]
) -> InferenceResponse:
    """The reply to ``request`` from ``model``'s cache (see the module docstring)."""
    return InferenceResponse(
        id=request.id,
        model_name=model.name,
        model_version=model.version,
        outputs=outputs,
        timing=Timing(0, 0, 0),
        parameters={CACHED: True},
    )


class CacheGauges:
    """``inference_cache_bytes`` of every served version with a cache; old caches closed."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._served: dict[tuple[str, str], ResponseCache] = {}

    def open(self, repository: ModelRepository) -> None:
        """Follow ``repository`` (at start, and after each reload)."""
        served = {(m.name, m.version): m.cache for m in repository.all() if m.cache is not None}
        kept = {id(cache) for cache in served.values()}
        for labels, cache in self._served.items():
            if id(cache) not in kept:
                cache.close()
            if labels not in served:
                self._metrics.cache_bytes.remove(*labels)
        for labels, cache in served.items():
            self._metrics.cache_bytes.labels(*labels).set_function(_size_of(cache))
        self._served = served


def _size_of(cache: ResponseCache) -> Callable[[], float]:
    return lambda: float(cache.bytes)
