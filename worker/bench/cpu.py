"""Who used the machine's CPU during a bench run: the load client, the broker, the target.

On a machine where the broker, the load and the target share the cores, a closed loop's
throughput is bounded by their CPU together, not by the target's alone: a ratio against the
echo loop moves with what the client and the broker cost per request too. :func:`snapshot`
reads, from ``/proc`` (Linux; elsewhere it is empty), the CPU seconds used so far by each
process of three parties, and the machine's idle time:

- ``client``: this process (the bench's load);
- ``broker``: every Kafka broker process (``kafka.Kafka``);
- ``target``: every process this one started, and their children (the worker the bench
  launched, its ``--processes`` children, the echo or plain loop), and every ``python -m
  worker serve|echo|plain`` process with its children (a worker started by hand, for
  ``--target none``). Other processes (another bench, say) are no party.

:func:`per_request` turns two snapshots into microseconds per request, process by process: a
process started between them counts from zero; one that ended between them is not counted at
all (its time cannot be read once it is gone), so a run in which a worker child was killed
under-reports the target.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PARTIES", "Snapshot", "per_request", "snapshot"]

PARTIES = ("client", "broker", "target", "idle")
"""What is counted: this process, brokers, the target's processes, idle cores."""

Snapshot = dict[tuple[str, int], float]
"""CPU seconds by (party, pid); ``("idle", 0)`` for the idle cores. Empty: not measured."""

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PROC = Path("/proc")
_SERVED = (b"serve", b"echo", b"plain")
"""``python -m worker`` commands that are a target when started by hand."""


def snapshot() -> Snapshot:
    """CPU seconds used so far by each process of each party; empty without ``/proc``."""
    try:
        idle = _idle_seconds()
    except (OSError, ValueError, IndexError):
        return {}
    table: dict[int, tuple[int, bytes, float]] = {}  # pid -> (parent, command line, seconds)
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            table[int(entry.name)] = (int(fields[1]), command, _seconds(fields))
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile, or not ours to read
    me = os.getpid()
    out: Snapshot = {("idle", 0): idle}
    targets = _targets(table, me)
    for pid, (_, command, seconds) in table.items():
        if pid == me:
            out["client", pid] = seconds
        elif b"kafka.Kafka\0" in command:
            out["broker", pid] = seconds
        elif pid in targets:
            out["target", pid] = seconds
    return out


def per_request(before: Snapshot, after: Snapshot, requests: int) -> dict[str, float]:
    """Microseconds of CPU per request of each party between two snapshots (empty if unknown)."""
    if not before or not after or requests <= 0:
        return {}
    used = dict.fromkeys(PARTIES, 0.0)
    for key, seconds in after.items():
        used[key[0]] += max(0.0, seconds - before.get(key, 0.0))
    return {party: round(used[party] * 1e6 / requests, 1) for party in PARTIES}


def _targets(table: dict[int, tuple[int, bytes, float]], me: int) -> set[int]:
    """Pids of the target: this process's descendants, and served workers with theirs."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    roots = [pid for pid, (_, command, _) in table.items() if _served(command)]
    found: set[int] = set()
    stack = [*children.get(me, []), *roots]
    while stack:
        pid = stack.pop()
        if pid in found or pid == me:
            continue
        found.add(pid)
        stack += children.get(pid, [])
    return found


def _served(command: bytes) -> bool:
    """``python -m worker serve|echo|plain ...``: a worker or a reference loop."""
    args = command.split(b"\0")
    for i in range(len(args) - 2):
        if args[i] == b"-m" and args[i + 1] == b"worker":
            return args[i + 2] in _SERVED
    return False


def _seconds(fields: list[str]) -> float:
    """User and system time of a ``/proc/PID/stat`` line (the fields after the name)."""
    return (int(fields[11]) + int(fields[12])) / _TICK


def _idle_seconds() -> float:
    """Idle and I/O-wait time of all cores together, from ``/proc/stat``."""
    with (_PROC / "stat").open() as stat:
        values = stat.readline().split()[1:]
    return (int(values[3]) + int(values[4])) / _TICK
