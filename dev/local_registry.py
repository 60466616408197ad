"""Run a Confluent-compatible schema registry on loopback: Conduit's, built from source with Go.

Used by ``make registry`` / ``make registry-stop``, by ``.ci/run`` and by the test suite when
``WORKER_SCHEMA_REGISTRY__URL`` is not set for the tests. ``dev/schema-registry/`` holds a
30-line ``main.go`` around github.com/conduitio/conduit-schema-registry v0.2.6 (pinned, with
its ``go.sum``); the binary, its log and PID file live in ``.registry/`` (gitignored).

    python dev/local_registry.py start [--port 8081]   # idempotent: a running one is reused
    python dev/local_registry.py stop
    python dev/local_registry.py status

It keeps schemas in memory: a restart forgets them (the tests rely on that only within a run).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["DEFAULT_URL", "RegistryError", "healthy", "start", "status", "stop"]

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "dev" / "schema-registry"
STATE = ROOT / ".registry"
BINARY = STATE / "registry"
PID = STATE / "registry.pid"
LOG = STATE / "registry.log"
HOST = "127.0.0.1"
PORT = 8081
DEFAULT_URL = f"http://{HOST}:{PORT}"


class RegistryError(RuntimeError):
    """The registry could not be built or started."""


def _log(message: str) -> None:
    print(f"local-registry: {message}", file=sys.stderr, flush=True)


def build() -> Path:
    """Build the registry binary (Go fetches the pinned modules on the first build)."""
    sources = [*SOURCE.glob("*.go"), SOURCE / "go.mod", SOURCE / "go.sum"]
    if BINARY.is_file() and BINARY.stat().st_mtime >= max(p.stat().st_mtime for p in sources):
        return BINARY
    STATE.mkdir(exist_ok=True)
    _log("building dev/schema-registry (go build)")
    try:
        subprocess.run(
            ["go", "build", "-o", str(BINARY), "."],
            cwd=SOURCE,
            check=True,
            env={**os.environ, "GOFLAGS": "-mod=readonly"},
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RegistryError(f"go build failed in {SOURCE}: {exc}") from exc
    return BINARY


def healthy(url: str = DEFAULT_URL, timeout: float = 2.0) -> bool:
    """True if a registry answers at ``url``."""
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=timeout) as response:  # noqa: S310
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _pid() -> int | None:
    try:
        pid = int(PID.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def start(port: int = PORT, timeout: float = 30.0) -> str:
    """Start the registry (or reuse a running one); its URL."""
    url = f"http://{HOST}:{port}"
    if healthy(url):
        return url
    binary = build()
    with LOG.open("ab") as out:
        proc = subprocess.Popen(
            [str(binary), "-addr", f"{HOST}:{port}"],
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    PID.write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = LOG.read_text(errors="replace")[-2000:]
            raise RegistryError(f"registry did not start at {url}; log:\n{tail}")
        time.sleep(0.1)
    _log(f"registry ready at {url}")
    return url


def stop() -> bool:
    """Stop the registry this script started; True if one was running."""
    pid = _pid()
    if pid is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _pid() is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    PID.unlink(missing_ok=True)
    return True


def status() -> bool:
    """True if the registry answers on the default port."""
    return healthy()


def main(argv: list[str] | None = None) -> int:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--port", type=int, default=PORT)
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            print(start(args.port))
        elif args.command == "stop":
            _log("stopped" if stop() else "not running")
        else:
            running = status()
            print(DEFAULT_URL if running else "not running")
            return 0 if running else 1
    except RegistryError as exc:
        _log(str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
