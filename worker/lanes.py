"""Lanes: one batcher per served model version, running its batches through the model.

A lane takes admitted jobs (:mod:`worker.admission`), forms batches (:mod:`worker.batching`)
and hands each run of batches to :mod:`worker.answering`, which answers the expired jobs,
runs the rest as one forward pass per batch off the event loop (bad requests isolated:
:func:`worker.forward.run_isolated`) and delivers the answers. Each lane runs its batches in its
version's instances (:mod:`worker.instances`): up to ``instances`` batches at once, so lanes
of different models never wait behind each other. Under a backlog the batcher hands over
several full batches at once (a run), and an instance runs them back to back, pipelined
(:func:`worker.forward.run_batches`): one hand-off between the event loop and the thread per
run, not per batch. Shadow copies run in a lane of their own, in one shadow thread shared by
all; their results are compared (:mod:`worker.shadow`), never sent.

:meth:`Lanes.open` applies a repository (at start and on every reload): a version whose
program and batching are unchanged keeps its lane; a version no longer served, or changed,
has its lane retired: it answers everything it holds, then ends.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import structlog

from worker.admission import Admitted, Job
from worker.answering import RunAnswers, Runner
from worker.answers import Answer, Deliver, error_response
from worker.batching import Batcher
from worker.device import memory
from worker.errors import ErrorCode, RequestError
from worker.forward import Run, run_batches
from worker.instances import Instances
from worker.metrics import Metrics
from worker.model import LoadedModel, Prepared
from worker.pacing import Pace
from worker.priority import Priority
from worker.repository import ModelRepository
from worker.settings import BatchingSettings
from worker.shadow import Outcome

__all__ = ["Lanes"]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Lane:
    model: LoadedModel
    batcher: Batcher[Job]
    task: asyncio.Task[None]
    instances: Instances | None
    """None for a shadow lane (it runs in the shadow thread)."""


class Lanes:
    """Every served version's lane, started in ``group``; batches run in its instances.

    A version that shadows another has a second lane for the shadow copies, running on
    ``shadow_executor``: shadow batches never queue ahead of primary ones, and the shadow's
    queue is bounded (``shadow_queue_limit``; beyond it copies are dropped and counted).
    ``threads``: torch intra-op threads, split between the instances of a version.
    """

    def __init__(
        self,
        group: asyncio.TaskGroup,
        *,
        threads: int,
        shadow_executor: Executor,
        batching: BatchingSettings,
        deliver: Deliver,
        metrics: Metrics,
        shadow_queue_limit: int,
    ) -> None:
        self._group = group
        self._threads = threads
        self._shadow_executor = shadow_executor
        self._batching = batching
        self._deliver = deliver
        self._answers = RunAnswers(deliver, metrics)
        self._metrics = metrics
        self._shadow_queue_limit = shadow_queue_limit
        self._lanes: dict[tuple[str, str, bool], _Lane] = {}
        """By (model, version, shadow copies?)."""
        self._retired: set[asyncio.Task[None]] = set()
        self._pools: set[Instances] = set()
        """Every lane's instances not closed yet (retired lanes' included)."""
        metrics.shadow_queued.set_function(self._shadow_queued)

    def open(self, repository: ModelRepository) -> None:
        """Give every served version a lane; retire lanes of versions gone or changed.

        All new batchers are built before anything changes, so a batcher that cannot be built
        (it raises) leaves every lane as it was.
        """
        wanted = {(m.name, m.version, False): m for m in repository.all()}
        wanted |= {
            (m.name, m.version, True): m
            for m in repository.all()
            if m.config.routing.shadow == m.version
        }
        stale = {
            key
            for key, lane in self._lanes.items()
            if key not in wanted
            or not lane.model.same_program(wanted[key])
            or self._max_batch_size(wanted[key]) != lane.batcher.max_batch_size
            or self._length_aware(wanted[key]).get("max_batch_tokens")
            != lane.batcher.max_batch_tokens
            or (lane.instances is not None and lane.instances.count != _count(wanted[key]))
        }
        fresh = {
            key: self._batcher(model, shadow=key[2])
            for key, model in wanted.items()
            if key not in self._lanes or key in stale
        }
        for key in stale:
            lane = self._lanes.pop(key)
            lane.batcher.close()
            self._retired.add(lane.task)
            lane.task.add_done_callback(partial(self._retire, lane))
        for key, model in wanted.items():
            if key in fresh:
                batcher, instances = fresh[key]
                task = self._group.create_task(batcher.run())
                self._lanes[key] = _Lane(model, batcher, task, instances)
                if model.device.type == "cuda":
                    self._watch_memory(model)
            else:
                self._lanes[key].model = model  # same program; the config (routing) may be new

    def _retire(self, lane: _Lane, task: asyncio.Task[None]) -> None:
        """A retired lane answered all it held: its instances end."""
        self._retired.discard(task)
        if lane.instances is not None:
            lane.instances.close()
            self._pools.discard(lane.instances)

    def close(self) -> None:
        """End every lane's instances (a call still running is not waited for)."""
        for instances in self._pools:
            instances.close()
        self._pools.clear()

    def _watch_memory(self, model: LoadedModel) -> None:
        device = model.device
        for i, kind in enumerate(("allocated", "reserved")):
            gauge = self._metrics.device_memory.labels(str(device), kind)
            gauge.set_function(partial(lambda i, d: memory(d)[i], i, device))

    def _batcher(
        self, model: LoadedModel, *, shadow: bool
    ) -> tuple[Batcher[Job], Instances | None]:
        delay_ms = model.config.max_batch_delay_ms
        if delay_ms is None:
            delay_ms = self._batching.max_batch_delay_ms
        instances = None
        urgent = None if shadow else threading.Event()  # shadow runs are never cut short
        if shadow:
            runner: Runner = self._in_shadow_thread
        else:
            instances = Instances(
                model.name, model.version, _count(model), device=model.device,
                threads=self._threads, busy=self._metrics.busy, warm_up=self._warm_up(model),
            )  # fmt: skip
            self._pools.add(instances)
            runner = _in(instances)
        run_ms = self._batching.max_run_ms
        pace = Pace(run_ms / 1000) if run_ms else None
        batcher = Batcher(
            partial(self._answers.run, runner, urgent, pace),
            max_batch_size=self._max_batch_size(model),
            max_batch_delay=delay_ms / 1000,
            max_concurrent_batches=1 if instances is None else instances.count,
            max_batches_per_run=self._batching.max_batches_per_run,
            pace=pace,
            start_when_idle=self._batching.start_when_idle,
            classify=_priority,
            classes=len(Priority),
            aging=self._batching.priority_aging_ms / 1000,
            urgent=urgent,
            **self._length_aware(model),
        )
        return batcher, instances

    def _warm_up(self, model: LoadedModel) -> Callable[[], object] | None:
        """A version's warm-up at its lane's bounds (batch size, token budget), if it has one."""
        if not model.warms_up:
            return None
        tokens = self._length_aware(model).get("max_batch_tokens")
        return partial(model.warm_up, self._max_batch_size(model), tokens)

    async def _in_shadow_thread(
        self, model: LoadedModel, batches: list[list[Prepared]], _: threading.Event | None
    ) -> Run:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._shadow_executor, run_batches, model, batches)

    def _length_aware(self, model: LoadedModel) -> dict[str, Any]:
        """Batcher options of a sequence model: measure, token budget, sort window."""
        if not model.config.is_sequence:
            return {}
        return {
            "measure": _measure,
            "max_batch_tokens": model.config.max_batch_tokens or self._batching.max_batch_tokens,
            "sort_window": self._batching.sort_window,
            "min_padding_efficiency": self._batching.min_padding_efficiency,
        }

    def put(self, admitted: Admitted) -> None:
        """Queue a job in its version's lane, and its shadow copy (unless the shadow is full).

        A job whose version was unloaded since it was admitted (it waited in the tokenizer
        stage while a reload removed the version) is answered UNAVAILABLE: send it again. A
        job larger than its lane's token budget on its own is answered RESOURCE_EXHAUSTED (it
        could only run as an unbounded batch).
        """
        job, copy = admitted.job, admitted.shadow
        primary = self._lanes.get((job.model.name, job.model.version, False))
        if primary is None:
            gone = RequestError(
                ErrorCode.UNAVAILABLE,
                f"model {job.model.name} v{job.model.version} was unloaded while this request "
                "waited; send it again",
            )
            self._deliver([Answer(job.origin, error_response(job.request, gone))])
            return
        budget, need = primary.batcher.max_batch_tokens, job.prepared.rows * job.prepared.length
        if budget is not None and need > budget:
            big = RequestError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"request needs {need} padded tokens ({job.prepared.rows} rows x "
                f"{job.prepared.length}); model {job.model.name} takes at most {budget} in a "
                "batch (max_batch_tokens): send fewer or shorter strings per request",
            )
            response = replace(error_response(job.request, big), model_version=job.model.version)
            self._deliver([Answer(job.origin, response, served=True)])
            return
        if copy is not None:
            lane = self._lanes.get((copy.model.name, copy.model.version, True))
            if lane is not None and len(lane.batcher) < self._shadow_queue_limit:
                lane.batcher.put(copy)
            else:
                assert job.comparison is not None
                self._answers.count(job.comparison, Outcome.DROPPED)
                job.comparison = None
        primary.batcher.put(job)

    def withdraw(self, unwanted: Callable[[Job], bool]) -> list[Job]:
        """Take every waiting job that is ``unwanted`` out of every lane (shadow copies too)."""
        return [job for lane in self._lanes.values() for job in lane.batcher.withdraw(unwanted)]

    async def drain(self) -> None:
        """Close every lane and wait until each has answered all it holds; end the instances."""
        for lane in self._lanes.values():
            lane.batcher.close()
        await asyncio.gather(*(lane.task for lane in self._lanes.values()), *self._retired)
        self.close()

    def _shadow_queued(self) -> int:
        """Shadow copies waiting in their lanes (each holds its record's bytes)."""
        return sum(len(lane.batcher) for (_, _, shadow), lane in self._lanes.items() if shadow)

    def _max_batch_size(self, model: LoadedModel) -> int:
        return model.config.max_batch_size or self._batching.max_batch_size


def _priority(job: Job) -> int:
    return job.priority


def _measure(job: Job) -> tuple[int, int]:
    return job.prepared.rows, job.prepared.length


def _count(model: LoadedModel) -> int:
    return model.execution.instances


def _in(instances: Instances) -> Runner:
    async def runner(
        model: LoadedModel, batches: list[list[Prepared]], stop: threading.Event | None
    ) -> Run:
        return await instances.run(run_batches, model, batches, stop)

    return runner
