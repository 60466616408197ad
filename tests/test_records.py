"""``@record`` (worker.records): field equality and hashing, and frozen to the type checker."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from worker.domain import Tensor, Timing


def test_records_compare_and_hash_by_their_fields() -> None:
    """Equal fields make equal records with equal hashes; replace() makes a changed copy."""
    a, b = Timing(1, 2, 3), Timing(1, 2, 3)
    assert a == b
    assert hash(a) == hash(b)
    assert {a: "x"}[b] == "x"
    assert replace(a, batch_size=4) == Timing(1, 2, 4) != a
    assert hash(Tensor("x", "FP32", (1,), b"")) == hash(Tensor("x", "FP32", (1,), b""))
    assert not hasattr(a, "__dict__")  # slotted


def test_assigning_a_field_is_refused_by_mypy() -> None:
    """mypy, the project's gate, refuses an assignment to a record's field."""
    snippet = "from worker.domain import Timing\nt = Timing(1, 2, 3)\nt.queue_us = 5\n"
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "", "--no-incremental",
         "--follow-imports=silent", "-c", snippet],
        capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert out.returncode == 1, out.stdout
    assert 'Property "queue_us" defined in "Timing" is read-only' in out.stdout
