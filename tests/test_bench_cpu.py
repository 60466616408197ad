"""The bench's CPU shares: who used the machine while the clock ran (no broker needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.bench import cpu

TICK = os.sysconf("SC_CLK_TCK")
ME = os.getpid()


class FakeProc:
    """A ``/proc`` of made-up processes: pid -> (parent, argv, CPU seconds)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()

    def idle(self, seconds: float) -> None:
        ticks = round(seconds * TICK)
        (self.root / "stat").write_text(f"cpu  1 0 1 {ticks} 0 0 0 0 0 0\ncpu0 1 0 1 1 0\n")

    def process(self, pid: int, parent: int, argv: list[str], seconds: float) -> None:
        folder = self.root / str(pid)
        folder.mkdir(exist_ok=True)
        (folder / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
        fields = ["S", str(parent), *["0"] * 9, str(round(seconds * TICK)), "0", *["0"] * 5]
        (folder / "stat").write_text(f"{pid} (a) name) " + " ".join(fields) + "\n")

    def end(self, pid: int) -> None:
        for name in ("cmdline", "stat"):
            (self.root / str(pid) / name).unlink()
        (self.root / str(pid)).rmdir()


PY = "/usr/bin/python3"


def test_each_process_counts_for_its_party_by_its_own_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Client, broker, the target's process tree, hand-started workers; others and the dead not."""
    proc = FakeProc(tmp_path / "proc")
    monkeypatch.setattr(cpu, "_PROC", proc.root)
    start = {
        ME: (1, [PY, "-m", "worker", "bench"], 10.0),
        900: (1, ["java", "-cp", "x", "kafka.Kafka", "server.properties"], 100.0),
        901: (ME, [PY, "-m", "worker", "serve", "--processes", "2"], 5.0),  # launched by us
        902: (901, [PY, "-c", "from multiprocessing.spawn import spawn_main"], 1.0),  # its child
        903: (1, [PY, "-m", "worker", "bench", "--target", "grpc"], 7.0),  # another bench: none
        904: (1, [PY, "-m", "worker", "echo"], 2.0),  # started by hand: a target
        905: (ME, [PY, "-m", "worker", "serve"], 50.0),  # killed before the second snapshot
    }
    proc.idle(1000.0)
    for pid, (parent, argv, seconds) in start.items():
        proc.process(pid, parent, argv, seconds)
    before = cpu.snapshot()
    proc.idle(1003.0)
    grown = {ME: 1.0, 900: 0.5, 901: 2.0, 902: 0.25, 903: 9.0, 904: 0.75}
    for pid, extra in grown.items():
        parent, argv, seconds = start[pid]
        proc.process(pid, parent, argv, seconds + extra)
    proc.end(905)
    proc.process(906, 901, [PY, "-c", "spawn_main"], 0.5)  # a restarted child: from zero
    shares = cpu.per_request(before, cpu.snapshot(), 1000)
    assert shares == {
        "client": 1000.0,
        "broker": 500.0,
        "target": (2.0 + 0.25 + 0.75 + 0.5) * 1000,
        "idle": 3000.0,
    }


def test_a_child_burning_cpu_is_the_target_in_real_proc() -> None:
    """On this machine's /proc: a child this process started counts for the target."""
    burn = "import sys,time\nt=time.process_time()+0.3\nwhile time.process_time()<t: pass\n"
    child = subprocess.Popen(  # burns 0.3 s of CPU, then waits for its stdin to close
        [
            sys.executable,
            "-c",
            burn + "sys.stdout.write('x'); sys.stdout.flush(); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        before = cpu.snapshot()
        assert child.stdout is not None
        assert child.stdout.read(1) == b"x"
        after = cpu.snapshot()
    finally:
        child.kill()
        child.wait(30)
    assert cpu.per_request(before, after, 1)["target"] >= 0.1e6


@given(
    st.dictionaries(
        st.tuples(st.sampled_from(cpu.PARTIES), st.integers(0, 5)), st.floats(0, 1e6), min_size=1
    ),
    st.dictionaries(
        st.tuples(st.sampled_from(cpu.PARTIES), st.integers(0, 5)), st.floats(0, 1e6), min_size=1
    ),
    st.integers(1, 10**7),
)
def test_per_request_sums_each_process_s_growth(
    before: cpu.Snapshot, after: cpu.Snapshot, requests: int
) -> None:
    """Per party: the sum of its processes' growth (never negative) over the requests."""
    shares = cpu.per_request(before, after, requests)
    assert set(shares) == set(cpu.PARTIES)
    for party in cpu.PARTIES:
        grown = sum(max(0.0, s - before.get(k, 0.0)) for k, s in after.items() if k[0] == party)
        expected = grown * 1e6 / requests
        assert abs(shares[party] - expected) <= 0.05 + 1e-9 * expected


def test_no_snapshot_or_no_requests_gives_no_shares() -> None:
    """Without /proc (an empty snapshot) or without requests, nothing is claimed."""
    full: cpu.Snapshot = {(party, 1): 1.0 for party in cpu.PARTIES}
    assert cpu.per_request({}, full, 10) == {}
    assert cpu.per_request(full, {}, 10) == {}
    assert cpu.per_request(full, full, 0) == {}


def test_without_proc_a_snapshot_is_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A system without /proc/stat measures nothing rather than failing the bench."""
    monkeypatch.setattr(cpu, "_PROC", tmp_path / "absent")
    assert cpu.snapshot() == {}
    assert cpu.per_request(cpu.snapshot(), cpu.snapshot(), 10) == {}
