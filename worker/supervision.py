"""Supervision: progress, the watchdog, liveness and readiness, and the consumer-lag gauge.

- :class:`Progress` is noted each time a group of replies is acknowledged.
- :meth:`Supervisor.watchdog` raises :class:`~worker.errors.WatchdogError` when there is work
  (requests in flight, or records waiting in an assigned partition) and no progress for
  ``WORKER_RUNTIME__WATCHDOG_TIMEOUT_S``: the process exits and its supervisor restarts it.
- :meth:`Supervisor.healthy` (``/healthz``) turns false in the same condition, and once a
  model's device failed for good (:func:`worker.device.lost_devices`; the worker is exiting);
  :meth:`Supervisor.ready` (``/readyz``) is true once partitions are assigned, until stopping.
- :meth:`Supervisor.lag_loop` keeps ``inference_consumer_lag`` current.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from worker.device import lost_devices
from worker.errors import WatchdogError
from worker.intake import Intake
from worker.metrics import Metrics
from worker.progress import Progress

__all__ = ["Supervisor"]

log = structlog.get_logger(__name__)


class Supervisor:
    """Watches an intake's progress; answers the health and readiness probes."""

    def __init__(
        self,
        intake: Intake,
        progress: Progress,
        stopping: asyncio.Event,
        *,
        metrics: Metrics,
        watchdog_timeout_s: float,
    ) -> None:
        self._intake = intake
        self._progress = progress
        self._stopping = stopping
        self._metrics = metrics
        self._timeout = watchdog_timeout_s

    def healthy(self) -> tuple[bool, str]:
        """Liveness: False once there was work and no progress for the watchdog timeout.

        False too once a device failed for good (a sticky CUDA error): nothing runs on it again.
        """
        lost = lost_devices()
        if lost:
            return False, "device failed: " + ", ".join(f"{d} ({w})" for d, w in lost.items())
        pending = self._intake.tracker.pending
        stalled = time.monotonic() - self._progress.last
        if self._timeout and pending and stalled > self._timeout:
            return False, f"no progress for {stalled:.0f}s with {pending} in flight"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """Readiness: the group joined (an assignment received) and not stopping."""
        if self._stopping.is_set():
            return False, "stopping"
        if not self._intake.joined:
            return False, "waiting for the consumer group assignment"
        return True, f"ok: {len(self._intake.assigned)} partition(s)"

    async def watchdog(self) -> None:
        """Raise :class:`WatchdogError` when there is work but no progress for too long."""
        timeout = self._timeout
        if not timeout:
            return
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            if not await self._has_work():
                self._progress.last = time.monotonic()
                continue
            stalled = time.monotonic() - self._progress.last
            if stalled > timeout:
                pending = self._intake.tracker.pending
                log.critical(
                    "watchdog: no progress while there is work; exiting so that a supervisor "
                    "restarts the worker",
                    stalled_s=round(stalled, 1),
                    in_flight=pending,
                )
                raise WatchdogError(
                    f"no reply published for {stalled:.0f}s with {pending} request(s) in "
                    f"flight (WORKER_RUNTIME__WATCHDOG_TIMEOUT_S={timeout:g})"
                )

    async def _has_work(self) -> bool:
        if self._intake.tracker.pending:
            return True
        consumer = self._intake.consumer
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            position = await _position(consumer, tp)
            if highwater is not None and position is not None and highwater > position:
                return True
        return False

    async def lag_loop(self) -> None:
        """Keep the consumer-lag gauge current: high watermark minus committed position."""
        consumer = self._intake.consumer
        tracker = self._intake.tracker
        shown: set[TopicPartition] = set()
        while True:
            await asyncio.sleep(1.0)
            assigned = consumer.assignment()
            for tp in shown - assigned:
                self._metrics.lag.remove(tp.topic, str(tp.partition))
            for tp in assigned:
                highwater = consumer.highwater(tp)
                if highwater is None:
                    continue
                committed = tracker.committed(tp)
                if committed is None:
                    committed = await _position(consumer, tp)
                if committed is None:
                    continue
                self._metrics.lag.labels(tp.topic, str(tp.partition)).set(
                    max(0, highwater - committed)
                )
            shown = set(assigned)


async def _position(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The consumer's position in ``tp``, or None if it has none now.

    A partition revoked while this waits raises ``IllegalStateError``; a position being reset
    raises other Kafka errors. Both are transient: the loops asking simply skip the partition.
    """
    try:
        return int(await consumer.position(tp))
    except KafkaError as exc:
        log.debug("no position for partition now", partition=tp.partition, error=repr(exc))
        return None
