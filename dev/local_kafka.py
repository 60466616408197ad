"""Run a single-node Apache Kafka 4.x broker (KRaft) on loopback, from Maven-resolved jars.

Used by ``make kafka`` / ``make kafka-stop``, by ``.ci/run`` and by the test suite when
``WORKER_KAFKA__BOOTSTRAP_SERVERS`` is not set. Everything it creates lives in ``.kafka/``
(gitignored): the broker's runtime classpath, its data, its log and its PID file.

    python dev/local_kafka.py start [--port 9092]   # idempotent: a running broker is reused
    python dev/local_kafka.py stop
    python dev/local_kafka.py status

Steps of ``start``: resolve ``org.apache.kafka:kafka_2.13`` (version pinned in
``dev/kafka/pom.xml``) with ``mvn dependency:copy-dependencies``; write ``server.properties``;
format the KRaft storage once (``kafka.tools.StorageTool``); launch ``kafka.Kafka`` in its own
session; wait until a real client (aiokafka) fetches metadata. If the broker dies or does not
answer in time, the tail of its log is printed and the command fails.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

__all__ = ["BrokerError", "metadata_ok", "start", "status", "stop"]

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "dev" / "kafka"
STATE = ROOT / ".kafka"
LIB = STATE / "lib"
DATA = STATE / "data"
PID_FILE = STATE / "broker.pid"
LOG_FILE = STATE / "broker.log"
STDOUT_FILE = STATE / "broker.stdout"
CONFIG_FILE = STATE / "server.properties"
HOST = "127.0.0.1"


class BrokerError(RuntimeError):
    """The local broker could not be resolved, formatted or started."""


def _log(message: str) -> None:
    print(f"local-kafka: {message}", file=sys.stderr, flush=True)


def resolve_jars() -> Path:
    """Copy the broker's runtime classpath into ``.kafka/lib`` unless the pom is unchanged."""
    pom = TEMPLATES / "pom.xml"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    stamp = LIB / ".pom-sha256"
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return LIB
    _log("resolving Apache Kafka with Maven (first run downloads ~70 MB from Maven Central)")
    if LIB.exists():
        for jar in LIB.glob("*.jar"):
            jar.unlink()
    LIB.mkdir(parents=True, exist_ok=True)
    cmd = [
        "mvn",
        "-q",
        "-B",
        "-f",
        str(pom),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={LIB}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BrokerError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    if not any(LIB.glob("kafka_2.13-*.jar")):
        raise BrokerError(f"Maven finished but no kafka_2.13 jar is in {LIB}")
    stamp.write_text(digest + "\n")
    return LIB


def _java(main: str, *args: str, log_dir: Path = STATE) -> list[str]:
    return [
        "java",
        "-Xms256m",
        "-Xmx512m",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={TEMPLATES / 'log4j2.properties'}",
        f"-Dkafka.logs.dir={log_dir}",
        "-cp",
        f"{LIB}/*",
        main,
        *args,
    ]


def _write_config(port: int, controller_port: int) -> None:
    lines = [
        TEMPLATES.joinpath("server.properties").read_text(),
        f"controller.quorum.voters=1@{HOST}:{controller_port}",
        f"listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
        f"advertised.listeners=PLAINTEXT://{HOST}:{port}",
        f"log.dirs={DATA}",
    ]
    CONFIG_FILE.write_text("\n".join(lines) + "\n")


def _format_storage() -> None:
    if (DATA / "meta.properties").is_file():
        return
    DATA.mkdir(parents=True, exist_ok=True)
    # A cluster id is 16 random bytes in unpadded base64url (what `StorageTool random-uuid` prints).
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    cmd = _java(
        "kafka.tools.StorageTool",
        "format",
        "-t",
        cluster_id,
        "-c",
        str(CONFIG_FILE),
        "--ignore-formatted",
    )
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BrokerError(f"formatting KRaft storage failed:\n{done.stdout}{done.stderr}")


def _read_pid() -> int | None:
    try:
        pid = int(PID_FILE.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"kafka.Kafka" in cmdline else None


def metadata_ok(bootstrap: str, timeout: float = 5.0) -> bool:
    """True when a real Kafka client fetches cluster metadata from ``bootstrap``."""
    import logging

    from aiokafka import AIOKafkaClient  # imported late: `stop` works without the venv

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # "connect failed" is expected here

    async def probe() -> bool:
        client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
        try:
            await asyncio.wait_for(client.bootstrap(), timeout)
        except Exception:  # noqa: BLE001 - any failure means "not answering yet"
            return False
        finally:
            with contextlib.suppress(Exception):
                await client.close()
        return True

    return asyncio.run(probe())


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path.name})"


def start(port: int = 9092, controller_port: int = 9093, timeout: float = 120.0) -> str:
    """Start the broker, or reuse a running one; return its bootstrap address."""
    bootstrap = f"{HOST}:{port}"
    STATE.mkdir(exist_ok=True)
    pid = _read_pid()
    if pid is not None and metadata_ok(bootstrap):
        _log(f"reusing running broker (pid {pid}) at {bootstrap}")
        return bootstrap
    if pid is None and metadata_ok(bootstrap, timeout=2.0):
        _log(f"a broker not started by this script answers at {bootstrap}; reusing it")
        return bootstrap
    proc: subprocess.Popen[bytes] | None = None
    if pid is not None:
        _log(f"broker pid {pid} runs but does not answer; waiting for it")
    else:
        resolve_jars()
        _write_config(port, controller_port)
        _format_storage()
        with STDOUT_FILE.open("wb") as out:
            proc = subprocess.Popen(
                _java("kafka.Kafka", str(CONFIG_FILE)),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=STATE,
            )
        pid = proc.pid
        PID_FILE.write_text(f"{pid}\n")
        _log(f"started broker pid {pid}; waiting for {bootstrap} to answer metadata requests")

    def alive() -> bool:
        return proc.poll() is None if proc is not None else _read_pid() is not None

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            break
        if metadata_ok(bootstrap, timeout=3.0):
            _log(f"broker ready at {bootstrap}")
            return bootstrap
        time.sleep(0.5)
    running = alive()
    if running:
        stop()
    raise BrokerError(
        f"broker {f'did not answer within {timeout:.0f}s' if running else 'exited'}; "
        f"last lines of {LOG_FILE}:\n{_tail(LOG_FILE)}\n--- {STDOUT_FILE}:\n{_tail(STDOUT_FILE)}"
    )


def stop(timeout: float = 30.0) -> bool:
    """Stop the broker started by :func:`start`; return whether one was running."""
    pid = _read_pid()
    if pid is None:
        PID_FILE.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _read_pid() is not None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    if _read_pid() is not None:
        _log(f"broker pid {pid} ignored SIGTERM for {timeout:.0f}s; killing it")
        os.kill(pid, signal.SIGKILL)
    PID_FILE.unlink(missing_ok=True)
    _log(f"stopped broker pid {pid}")
    return True


def status(port: int = 9092) -> bool:
    """Print whether the broker runs and answers; return True if it answers."""
    pid = _read_pid()
    answers = metadata_ok(f"{HOST}:{port}", timeout=3.0)
    print(f"pid={pid or '-'} answering={answers}")
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--port", type=int, default=9092)
    parser.add_argument("--controller-port", type=int, default=9093)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            print(start(args.port, args.controller_port, args.timeout))
        elif args.command == "stop":
            stop()
        else:
            return 0 if status(args.port) else 1
    except BrokerError as exc:
        _log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
