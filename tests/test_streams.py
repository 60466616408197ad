"""CUDA streams for instance threads and copies (worker.streams, worker.staging), without a GPU.

torch's ``torch.cuda.Stream()`` draws from a pool of 32 per device, round robin; here a fake
pool that behaves the same stands in for it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

from worker import staging
from worker.streams import StreamLeases

CUDA0 = torch.device("cuda", 0)
CUDA1 = torch.device("cuda", 1)


@dataclass(frozen=True)
class FakeStream:
    """What the leases read of a stream: its handle (and, here, its device)."""

    device: str
    cuda_stream: int


class FakePool:
    """torch's stream pool: 32 streams per device, handed out round robin, never created."""

    def __init__(self, size: int = 32) -> None:
        self._next: dict[str, itertools.cycle[int]] = {}
        self.size = size

    def draw(self, device: torch.device) -> FakeStream:
        """The next stream of ``device``'s pool."""
        cycle = self._next.setdefault(str(device), itertools.cycle(range(self.size)))
        return FakeStream(str(device), next(cycle))


def test_leased_streams_are_distinct_while_the_pool_has_free_ones() -> None:
    """16 leases, other draws in between, 16 more: 32 distinct streams (the pool's all)."""
    pool = FakePool()
    leases = StreamLeases(pool.draw)
    first = [leases.take(CUDA0) for _ in range(16)]
    for _ in range(7):
        pool.draw(CUDA0)  # streams taken from the pool by others (loader, shadow threads)
    second = [leases.take(CUDA0) for _ in range(16)]
    assert len({s.cuda_stream for s in first + second}) == 32


def test_a_stream_given_back_is_leased_again_and_devices_are_apart() -> None:
    """Leases are per device; a stream given back (instances closed) may be leased again."""
    pool = FakePool(size=4)
    leases = StreamLeases(pool.draw, pool_size=4)
    held = [leases.take(CUDA0) for _ in range(4)]
    other = leases.take(CUDA1)
    assert other.device == "cuda:1"
    leases.give_back(held[1], CUDA0)
    assert leases.take(CUDA0) == held[1], "the only free stream of cuda:0"


def test_more_leases_than_streams_share_the_least_shared() -> None:
    """Past the pool's size, a lease shares a stream with as few others as can be."""
    pool = FakePool(size=4)
    leases = StreamLeases(pool.draw, pool_size=4)
    taken = [leases.take(CUDA0) for _ in range(8)]
    counts = sorted(taken.count(s) for s in set(taken))
    assert counts == [2, 2, 2, 2]


def test_the_copy_stream_is_per_device_in_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread copying to cuda:0 and to cuda:1 gets a copy stream of each device."""
    pool = FakePool()
    monkeypatch.setattr(torch.cuda, "Stream", pool.draw)
    monkeypatch.setattr(staging, "_streams", type(staging._streams)())

    def copy_stream(device: torch.device) -> object:
        return staging._copy_stream(device)

    to_0, to_1 = copy_stream(CUDA0), copy_stream(CUDA1)
    assert to_0 == FakeStream("cuda:0", 0)
    assert to_1 == FakeStream("cuda:1", 0)
    assert copy_stream(CUDA0) is to_0, "kept for the thread"
    leased = FakeStream("cuda:0", 31)
    staging.use_copy_stream(CUDA0, leased)  # type: ignore[arg-type]
    assert copy_stream(CUDA0) is leased
    assert copy_stream(CUDA1) is to_1
