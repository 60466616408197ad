"""A version's instances: the threads that run its batches, several at once.

Each served version has its own :class:`Instances` (``instances = N`` in its config, default
``WORKER_MODELS__INSTANCES``): N threads, so N batches of the version run concurrently and
lanes of different models never wait behind each other in one thread. The instances share the
loaded program (its weights are only read). Per thread:

- on the CPU, torch's intra-op threads are split between the instances (``threads // N``, at
  least one), so concurrent batches do not fight over the cores; the process default that
  threads started later take is left as it was;
- on a GPU, the thread has its own CUDA stream and copy stream (:mod:`worker.staging`), leased
  so that no other live instance holds them (:mod:`worker.streams`), so one instance's copies
  and kernels overlap another's.

Given a ``warm_up`` call (a GPU version's :meth:`~worker.model.LoadedModel.warm_up`), every
instance thread runs it once, before anything else, so the streams, cuBLAS handle and
allocator pool that serve are the warm ones; calls wait for it.

Busy time per instance is counted (``inference_instance_busy_seconds_total``: its rate is the
instance's utilisation).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import structlog
import torch
from prometheus_client import Counter

from worker.device import is_device_lost, mark_lost
from worker.staging import use_copy_stream
from worker.streams import LEASES

__all__ = ["Instances", "split_threads"]

log = structlog.get_logger(__name__)

WARM_UP_MEETING_S = 60.0
"""How long each instance thread's warm-up waits for the others to have started."""

_torch_threads = threading.Lock()
"""Held while an instance thread sets its torch threads (and puts the default back)."""

P = ParamSpec("P")
R = TypeVar("R")


def split_threads(threads: int, instances: int) -> int:
    """Intra-op threads for each of ``instances`` sharing ``threads``: at least one."""
    return max(1, threads // instances)


class Instances:
    """``count`` threads running calls for one version on ``device``."""

    def __init__(
        self,
        name: str,
        version: str,
        count: int,
        *,
        device: torch.device,
        threads: int,
        busy: Counter,
        warm_up: Callable[[], object] | None = None,
    ) -> None:
        self.count = count
        self.device = device
        self.threads_each = split_threads(threads, count)
        """Intra-op threads of each instance (CPU)."""
        self._busy = busy
        self._labels = (name, version)
        self._numbers = itertools.count()
        self._local = threading.local()
        self._leased: list[torch.cuda.Stream] = []
        """CUDA: every instance thread's compute and copy streams, given back at close."""
        self._pool = ThreadPoolExecutor(
            max_workers=count, thread_name_prefix="inference", initializer=self._start
        )
        if warm_up is not None:
            self._warm_up(warm_up)

    def _warm_up(self, warm_up: Callable[[], object]) -> None:
        """Run ``warm_up`` once in each instance thread, ahead of any call (not waited for).

        ``count`` calls that first meet at a barrier: each holds its own thread until all
        have started, so every thread gets exactly one. A failure is logged (the thread then
        serves cold); a device that failed for good is marked lost, so the next batch stops
        the worker.
        """
        meeting = threading.Barrier(self.count, timeout=WARM_UP_MEETING_S)
        name, version = self._labels

        def once() -> None:
            with contextlib.suppress(threading.BrokenBarrierError):  # warm up all the same
                meeting.wait()
            try:
                warm_up()
            except Exception as exc:  # noqa: BLE001 - serving goes on, cold
                if is_device_lost(exc, self.device):
                    mark_lost(self.device, exc)
                log.warning("warm-up failed", model=name, version=version, error=repr(exc))

        for _ in range(self.count):
            self._pool.submit(once)

    def _start(self) -> None:
        """In each new instance thread: its number, its torch threads, its CUDA streams."""
        self._local.number = next(self._numbers)
        with _torch_threads:
            # torch sets a new thread's count on first use, from the process default: do it
            # now, so that this thread's own setting stays. Setting it also changes that
            # default (what threads started later take): put it back from a thread of its own.
            default = torch.get_num_threads()
            torch.set_num_threads(self.threads_each)
            _set_default_threads(default)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            compute, copy = LEASES.take(self.device), LEASES.take(self.device)
            self._leased += [compute, copy]
            torch.cuda.set_stream(compute)
            use_copy_stream(self.device, copy)

    async def run(self, call: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """``call(*args)`` in a free instance (waits for one), its busy time counted."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: self._timed(call, *args, **kwargs))

    def _timed(self, call: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        began = time.monotonic()
        try:
            return call(*args, **kwargs)
        finally:
            number = str(self._local.number)
            self._busy.labels(*self._labels, number).inc(time.monotonic() - began)

    def close(self) -> None:
        """Take no more calls; a call still running is not waited for (it may be stuck).

        The threads' CUDA streams are given back (a call still running finishes on them).
        """
        self._pool.shutdown(wait=False, cancel_futures=True)
        leased, self._leased = self._leased, []
        for stream in leased:
            LEASES.give_back(stream, self.device)


def _set_default_threads(count: int) -> None:
    """Set torch's process default of intra-op threads without changing the calling thread's.

    ``torch.set_num_threads`` sets both the calling thread's count and the default that
    threads take on their first torch call; called from a short-lived thread, only the
    default is left changed.
    """
    helper = threading.Thread(target=torch.set_num_threads, args=(count,), name="torch-threads")
    helper.start()
    helper.join()
