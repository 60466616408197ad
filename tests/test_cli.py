"""The command line's error paths (no broker needed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

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


def test_a_bad_predict_input_is_one_error_line_not_a_traceback(tmp_path: Path) -> None:
    """A missing file, text that is not JSON, a shape its data do not fill: exit 1, one line."""
    broken = tmp_path / "broken.json"
    broken.write_text('{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 63], ')
    short = tmp_path / "short.json"
    short.write_text(
        '{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 63], "data": [1, 2]}]}'
    )
    cases = {
        str(tmp_path / "missing.json"): "No such file",
        str(broken): "not JSON",
        str(short): "needs 63 values; data has 2",
    }
    for path, says in cases.items():
        done = run_cli("predict", "--model", "digits", "--input", path,
                       WORKER_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:1")  # fmt: skip
        assert done.returncode == 1, done.stderr
        assert f"error: --input {path}: " in done.stderr
        assert says in done.stderr
        assert "Traceback" not in done.stderr


def test_timeouts_and_limits_are_numbers_above_zero() -> None:
    """nan, 0 and negative values are refused by the argument parser (exit 2), not looped on."""
    example = str(MODELS / "digits" / "example_request.json")
    for args in (
        ("predict", "--model", "digits", "--input", example, "--timeout", "nan"),
        ("predict", "--model", "digits", "--input", example, "--timeout", "0"),
        ("demo", "--limit", "0"),
        ("demo", "--limit", "-5"),
        ("demo", "--timeout", "inf"),
    ):
        done = run_cli(*args)
        assert done.returncode == 2, args
        assert "is not a number above 0" in done.stderr


def test_demo_outside_the_checkout_says_where_it_looked(tmp_path: Path) -> None:
    """Run from another folder, demo names the test split it cannot read and what to set."""
    done = subprocess.run(
        [sys.executable, "-m", "worker", "demo", "--limit", "1"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("WORKER_")},
             "PYTHONPATH": str(ROOT)},
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "testset.npz cannot be read" in done.stderr
    assert "WORKER_MODELS__REPOSITORY" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_on_a_port_in_use_is_a_config_error_exit_2() -> None:
    """The metrics port taken: one error line naming the setting, exit 2 (no restart helps)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        done = run_cli(
            "serve", WORKER_HTTP__HOST="127.0.0.1", WORKER_HTTP__PORT=str(port),
            WORKER_MODELS__REPOSITORY=str(MODELS), WORKER_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:1",
        )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "WORKER_HTTP__PORT" in done.stderr
    assert "Traceback" not in done.stderr
