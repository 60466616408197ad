"""The bench's CPU shares: who used the machine while the clock ran (no broker needed)."""

from __future__ import annotations

import subprocess
import sys
import time

from hypothesis import given
from hypothesis import strategies as st

from worker.bench import cpu


def test_this_process_is_the_client_and_its_cpu_is_counted() -> None:
    """CPU this process burns between two snapshots shows as the client's."""
    before = cpu.snapshot()
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    after = cpu.snapshot()
    assert set(before) == set(cpu.PARTIES)
    assert after["client"] - before["client"] >= 0.1


def test_a_worker_module_process_is_the_target() -> None:
    """A ``python -m worker`` child's CPU is the target's, not the client's."""
    child = subprocess.Popen(  # the CLI's help: imports the package, then exits
        [sys.executable, "-m", "worker", "--help"], stdout=subprocess.PIPE
    )
    try:
        seen = 0.0
        deadline = time.monotonic() + 30
        while child.poll() is None and time.monotonic() < deadline:
            seen = max(seen, cpu.snapshot()["target"])
        assert child.wait(30) == 0
    finally:
        child.kill()
    assert seen > 0, "the child's CPU was seen while it ran"


@given(
    st.dictionaries(st.sampled_from(cpu.PARTIES), st.floats(0, 1e6), min_size=4),
    st.dictionaries(st.sampled_from(cpu.PARTIES), st.floats(0, 1e6), min_size=4),
    st.integers(1, 10**7),
)
def test_per_request_is_the_difference_over_the_requests(
    before: dict[str, float], after: dict[str, float], requests: int
) -> None:
    """Microseconds per request per party, never negative (a process that ended is dropped)."""
    shares = cpu.per_request(before, after, requests)
    assert set(shares) == set(cpu.PARTIES)
    for party, value in shares.items():
        expected = max(0.0, after[party] - before[party]) * 1e6 / requests
        assert abs(value - expected) <= 0.05 + 1e-9 * expected


def test_no_snapshot_or_no_requests_gives_no_shares() -> None:
    """Without /proc (an empty snapshot) or without requests, nothing is claimed."""
    full = dict.fromkeys(cpu.PARTIES, 1.0)
    assert cpu.per_request({}, full, 10) == {}
    assert cpu.per_request(full, {}, 10) == {}
    assert cpu.per_request(full, full, 0) == {}
