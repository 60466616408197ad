"""CUDA streams for instance threads: none shared by two live instances while the pool allows.

``torch.cuda.Stream()`` never creates a stream: it hands out the next of a fixed pool of 32 per
device (and priority), round robin (``getStreamFromPool``). Every instance thread takes two
(compute and copy), and so do the loader and shadow threads; after 32 draws, reloads and
versions with many instances get streams another live thread already uses, and their work is
serialised on it (a wait on one then waits for the other's batches too). torch offers no call
that creates a non-blocking stream of one's own (its binding of ``cudaStreamCreate`` makes a
blocking one, which synchronises with the legacy default stream that loading and the shadow
thread use), so :class:`StreamLeases` draws from the pool and skips the streams live instances
hold: up to 32 instance streams per device are distinct. Beyond that, a lease shares the
stream the fewest others share (logged once per device).

No Kafka, no asyncio.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import structlog
import torch

__all__ = ["LEASES", "POOL_SIZE", "StreamLeases"]

log = structlog.get_logger(__name__)

POOL_SIZE = 32
"""Streams in torch's pool per device and priority (``kStreamsPerPool``)."""


def _from_pool(device: torch.device) -> Any:
    return torch.cuda.Stream(device)  # type: ignore[no-untyped-call]


class StreamLeases:
    """Streams drawn from the pool (``draw``), skipping those a live lease holds."""

    def __init__(
        self, draw: Callable[[torch.device], Any] = _from_pool, pool_size: int = POOL_SIZE
    ) -> None:
        self._draw = draw
        self._pool_size = pool_size
        self._held: dict[tuple[str, int], int] = {}
        """Leases per stream: (device, stream handle) -> how many hold it."""
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def take(self, device: torch.device) -> Any:
        """A stream of ``device`` that no live lease holds, if the pool has one left."""
        with self._lock:
            drawn: dict[tuple[str, int], Any] = {}
            for _ in range(self._pool_size):
                stream = self._draw(device)
                key = (str(device), int(stream.cuda_stream))
                if key not in self._held:
                    self._held[key] = 1
                    return stream
                drawn.setdefault(key, stream)
            key = min(drawn, key=lambda k: self._held[k])
            self._held[key] += 1
            if str(device) not in self._warned:
                self._warned.add(str(device))
                log.warning(
                    "more instance streams than torch's stream pool holds; some are shared",
                    device=str(device),
                    pool=self._pool_size,
                )
            return drawn[key]

    def give_back(self, stream: Any, device: torch.device) -> None:
        """End one lease of ``stream`` (its instance thread is done)."""
        key = (str(device), int(stream.cuda_stream))
        with self._lock:
            left = self._held.get(key, 0) - 1
            if left > 0:
                self._held[key] = left
            else:
                self._held.pop(key, None)


LEASES = StreamLeases()
"""The process's leases (one stream pool per device per process)."""
