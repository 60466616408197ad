"""Who used the machine's CPU during a bench run: the load client, the broker, the target.

On a machine where the broker, the load and the target share the cores, a closed loop's
throughput is bounded by their CPU together, not by the target's alone: a ratio against the
echo loop moves with what the client and the broker cost per request too. :func:`snapshot`
reads, from ``/proc`` (Linux; elsewhere it is empty), the CPU seconds used so far by this
process (the client), by every Kafka broker process (``kafka.Kafka``), by every other
``python -m worker`` process (the target: a worker, its children, the echo or plain loop),
and the machine's idle time; :func:`per_request` turns two snapshots into microseconds per
request.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PARTIES", "per_request", "snapshot"]

PARTIES = ("client", "broker", "target", "idle")
"""What a snapshot counts: this process, brokers, other ``-m worker`` processes, idle cores."""

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PROC = Path("/proc")


def snapshot() -> dict[str, float]:
    """CPU seconds used so far by each party (:data:`PARTIES`); empty without ``/proc``."""
    try:
        idle = _idle_seconds()
    except (OSError, ValueError, IndexError):
        return {}
    out = dict.fromkeys(PARTIES, 0.0)
    out["idle"] = idle
    me = os.getpid()
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            used = (int(fields[11]) + int(fields[12])) / _TICK
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile, or not ours to read
        if int(entry.name) == me:
            out["client"] += used
        elif b"kafka.Kafka\0" in command:
            out["broker"] += used
        elif b"-m\0worker\0" in command:
            out["target"] += used
    return out


def per_request(
    before: dict[str, float], after: dict[str, float], requests: int
) -> dict[str, float]:
    """Microseconds of CPU per request of each party between two snapshots (empty if unknown).

    A process that ended between them (a restarted child) is not counted after its end.
    """
    if not before or not after or requests <= 0:
        return {}
    return {
        party: round(max(0.0, after[party] - before[party]) * 1e6 / requests, 1)
        for party in PARTIES
    }


def _idle_seconds() -> float:
    """Idle and I/O-wait time of all cores together, from ``/proc/stat``."""
    with (_PROC / "stat").open() as stat:
        values = stat.readline().split()[1:]
    return (int(values[3]) + int(values[4])) / _TICK
