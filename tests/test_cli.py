"""The command line's error paths (no broker needed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from .conftest import MODELS, ROOT


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], env=clean | env, cwd=ROOT,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_unreachable_broker_is_a_clear_error_not_a_traceback() -> None:
    """`predict` against a port nobody listens on exits 1 and says what to check."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the CLI runs: nothing listens
    done = run_cli(
        "predict", "--model", "digits", "--input", str(MODELS / "digits" / "example_request.json"),
        WORKER_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{port}",
    )  # fmt: skip
    assert done.returncode == 1
    assert f"is a broker running at 127.0.0.1:{port}?" in done.stderr
    assert "Traceback" not in done.stderr
    assert "Unclosed" not in done.stderr


def test_misspelt_setting_stops_start_up_with_exit_2() -> None:
    """An unknown WORKER_* variable is refused before anything starts."""
    done = run_cli("serve", WORKER_BATCHING__MAX_BACH_SIZE="8")
    assert done.returncode == 2
    assert "WORKER_BATCHING__MAX_BACH_SIZE" in done.stderr
