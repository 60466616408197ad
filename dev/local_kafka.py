"""Run a single-node Apache Kafka 4.x broker (KRaft) on loopback, from Maven-resolved jars.

Used by ``make kafka`` / ``make kafka-stop``, by ``.ci/run`` and by the test suite when
``WORKER_KAFKA__BOOTSTRAP_SERVERS`` is not set. Everything it creates lives in ``.kafka/``
(gitignored): the broker's runtime classpath, its data, its log and its PID file.

    python dev/local_kafka.py start [--port 9092]   # idempotent: a running broker is reused
    python dev/local_kafka.py stop
    python dev/local_kafka.py fresh                 # stop, delete its data, start empty
    python dev/local_kafka.py status

Steps of ``start``: resolve ``org.apache.kafka:kafka_2.13`` (version pinned in
``dev/kafka/pom.xml``) with ``mvn dependency:copy-dependencies``; write ``server.properties``;
format the KRaft storage once (``kafka.tools.StorageTool``); launch ``kafka.Kafka`` in its own
session; wait until a real client (aiokafka) fetches metadata. If the broker dies or does not
answer in time, the tail of its log is printed and the command fails. ``fresh`` is for
benchmarks: a broker that has served the test suite holds thousands of partitions and
gigabytes of their records, and its cost per request drifts upwards over a sitting
(docs/performance.md, "Ninth pass").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT",
    "BrokerError",
    "LocalBroker",
    "metadata_ok",
    "new_cluster_id",
    "start",
    "status",
    "stop",
]

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "dev" / "kafka"
STATE = ROOT / ".kafka"
LIB = STATE / "lib"
HOST = "127.0.0.1"


class BrokerError(RuntimeError):
    """The local broker could not be resolved, formatted or started."""


def _log(message: str) -> None:
    print(f"local-kafka: {message}", file=sys.stderr, flush=True)


def resolve_jars(
    pom: Path = TEMPLATES / "pom.xml",
    lib: Path = LIB,
    *,
    expect: str = "kafka_2.13-*.jar",
    what: str = "Apache Kafka (first run downloads ~70 MB from Maven Central)",
) -> Path:
    """Copy ``pom``'s runtime classpath into ``lib`` unless the pom is unchanged; return ``lib``.

    Maven resolves the pinned versions (``mvn dependency:copy-dependencies``); ``lib`` is
    stamped with the pom's sha256, so a changed pom is resolved again from scratch. A jar
    matching ``expect`` must be among those copied. Defaults: the broker's (``dev/kafka``).
    """
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    stamp = lib / ".pom-sha256"
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return lib
    _log(f"resolving {what} with Maven")
    if lib.exists():
        for jar in lib.glob("*.jar"):
            jar.unlink()
    lib.mkdir(parents=True, exist_ok=True)
    cmd = [
        "mvn",
        "-q",
        "-B",
        "-f",
        str(pom),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={lib}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BrokerError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    if not any(lib.glob(expect)):
        raise BrokerError(f"Maven finished but no {expect} is in {lib}")
    stamp.write_text(digest + "\n")
    return lib


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


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, unpadded base64url, as `StorageTool random-uuid` prints.

    Like Kafka's `Uuid.randomUuid`, an id starting with "-" is drawn again: one in 64 does, and
    a command line reads it as an option (`format -t -xyz` failed CI once).
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


@dataclass(frozen=True)
class LocalBroker:
    """One single-node broker: its ports and its folder (``.kafka`` or ``.kafka/brokers/NAME``)."""

    port: int = 9092
    controller_port: int = 9093
    state: Path = STATE
    listeners: tuple[tuple[str, str, str, int], ...] = ()
    """Extra listeners as (name, security protocol, advertised host, port), bound on loopback."""
    config: tuple[str, ...] = ()
    """Extra ``server.properties`` lines (they override the template's)."""
    scram: tuple[str, ...] = ()
    """SCRAM credentials created at format time, as ``StorageTool format --add-scram`` takes."""

    @classmethod
    def named(cls, name: str, port: int, controller_port: int, **extra: Any) -> LocalBroker:
        """A broker of its own (e.g. one that tests stop and start), beside the default one."""
        return cls(port, controller_port, STATE / "brokers" / name, **extra)

    @property
    def bootstrap(self) -> str:
        """``host:port`` clients connect to."""
        return f"{HOST}:{self.port}"

    @property
    def _pid_file(self) -> Path:
        return self.state / "broker.pid"

    @property
    def _config(self) -> Path:
        return self.state / "server.properties"

    def _java(self, main: str, *args: str) -> list[str]:
        return [
            "java",
            "-Xms256m",
            "-Xmx512m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={TEMPLATES / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.state}",
            "-cp",
            f"{LIB}/*",
            main,
            *args,
        ]

    def _write_config(self) -> None:
        bound = [f"PLAINTEXT://{HOST}:{self.port}", f"CONTROLLER://{HOST}:{self.controller_port}"]
        advertised = [f"PLAINTEXT://{HOST}:{self.port}"]
        protocols = ["CONTROLLER:PLAINTEXT", "PLAINTEXT:PLAINTEXT"]
        for name, protocol, host, port in self.listeners:
            bound.append(f"{name}://{HOST}:{port}")
            advertised.append(f"{name}://{host}:{port}")
            protocols.append(f"{name}:{protocol}")
        lines = [
            TEMPLATES.joinpath("server.properties").read_text(),
            f"controller.quorum.voters=1@{HOST}:{self.controller_port}",
            f"listeners={','.join(bound)}",
            f"advertised.listeners={','.join(advertised)}",
            f"listener.security.protocol.map={','.join(protocols)}",
            f"log.dirs={self.state / 'data'}",
            *self.config,
        ]
        self._config.write_text("\n".join(lines) + "\n")

    def _format_storage(self) -> None:
        data = self.state / "data"
        if (data / "meta.properties").is_file():
            return
        data.mkdir(parents=True, exist_ok=True)
        cmd = self._java(
            "kafka.tools.StorageTool",
            "format",
            f"--cluster-id={new_cluster_id()}",
            "-c",
            str(self._config),
            "--ignore-formatted",
            *(arg for user in self.scram for arg in ("--add-scram", user)),
        )
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BrokerError(f"formatting KRaft storage failed:\n{done.stdout}{done.stderr}")

    def pid(self) -> int | None:
        """PID of this broker's running process, if any."""
        try:
            pid = int(self._pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        mine = f"-Dkafka.logs.dir={self.state}".encode() + b"\0"
        return pid if b"kafka.Kafka" in cmdline and mine in cmdline else None

    def start(self, timeout: float = 120.0) -> str:
        """Start the broker, or reuse a running one; return its bootstrap address."""
        self.state.mkdir(parents=True, exist_ok=True)
        pid = self.pid()
        if pid is not None and metadata_ok(self.bootstrap):
            _log(f"reusing running broker (pid {pid}) at {self.bootstrap}")
            return self.bootstrap
        if pid is None and metadata_ok(self.bootstrap, timeout=2.0):
            _log(f"a broker not started by this script answers at {self.bootstrap}; reusing it")
            return self.bootstrap
        proc: subprocess.Popen[bytes] | None = None
        if pid is not None:
            _log(f"broker pid {pid} runs but does not answer; waiting for it")
        else:
            resolve_jars()
            self._write_config()
            self._format_storage()
            with (self.state / "broker.stdout").open("wb") as out:
                proc = subprocess.Popen(
                    self._java("kafka.Kafka", str(self._config)),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    cwd=self.state,
                )
            pid = proc.pid
            self._pid_file.write_text(f"{pid}\n")
            _log(f"started broker pid {pid}; waiting for {self.bootstrap} to answer metadata")

        def alive() -> bool:
            return proc.poll() is None if proc is not None else self.pid() is not None

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not alive():
                break
            if metadata_ok(self.bootstrap, timeout=3.0):
                _log(f"broker ready at {self.bootstrap}")
                return self.bootstrap
            time.sleep(0.5)
        running = alive()
        if running:
            self.stop()
        log_file, stdout_file = self.state / "broker.log", self.state / "broker.stdout"
        raise BrokerError(
            f"broker {f'did not answer within {timeout:.0f}s' if running else 'exited'}; "
            f"last lines of {log_file}:\n{_tail(log_file)}\n--- {stdout_file}:\n"
            f"{_tail(stdout_file)}"
        )

    def fresh(self, timeout: float = 120.0) -> str:
        """Stop the broker, delete its data (every topic), start it empty; its address.

        Refuses (:class:`BrokerError`) before stopping anything when this folder's broker runs
        on another port, or its data folder is a symbolic link; and before deleting anything
        when a broker still answers at this port once this folder's is stopped (not ours).
        """
        pid = self.pid()
        running_on = self._configured_port()
        if pid is not None and running_on not in (None, self.port):
            raise BrokerError(
                f"this checkout's broker (pid {pid}) runs on port {running_on}, not {self.port}; "
                f"give fresh --port {running_on}, or stop it first"
            )
        data = self.state / "data"
        if data.is_symlink():
            raise BrokerError(f"{data} is a symbolic link; delete what it points to yourself")
        self.stop()
        if metadata_ok(self.bootstrap, timeout=2.0):
            raise BrokerError(
                f"a broker not started by this script answers at {self.bootstrap}; it cannot "
                "be emptied from here (stop it first)"
            )
        if data.exists():
            try:
                shutil.rmtree(data)
            except OSError as exc:
                raise BrokerError(f"could not delete {data}: {exc}") from exc
        return self.start(timeout)

    def _configured_port(self) -> int | None:
        """The PLAINTEXT port in this folder's ``server.properties`` (None: none written yet)."""
        try:
            lines = self._config.read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            if line.startswith("listeners=PLAINTEXT://"):
                return int(line.split(",")[0].rsplit(":", 1)[1])
        return None

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the broker (SIGTERM, then SIGKILL); return whether one was running."""
        pid = self.pid()
        if pid is None:
            self._pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid() is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.2)
        if self.pid() is not None:
            _log(f"broker pid {pid} ignored SIGTERM for {timeout:.0f}s; killing it")
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10  # gone (or a zombie: its files closed) soon after
            while time.monotonic() < deadline and self.pid() is not None:
                time.sleep(0.2)
            if self.pid() is not None:
                raise BrokerError(f"broker pid {pid} still runs after SIGKILL")
        self._pid_file.unlink(missing_ok=True)
        _log(f"stopped broker pid {pid}")
        return True

    def tool(self, main: str, *args: str) -> str:
        """Run a Kafka tool class against this broker's PLAINTEXT listener; return its output.

        For example ``org.apache.kafka.tools.AclCommand``; raises :class:`BrokerError` if the
        tool fails.
        """
        cmd = self._java(main, "--bootstrap-server", self.bootstrap, *args)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
        if done.returncode != 0:
            raise BrokerError(f"{main} {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def status(self) -> bool:
        """Print whether the broker runs and answers; return True if it answers."""
        answers = metadata_ok(self.bootstrap, timeout=3.0)
        print(f"pid={self.pid() or '-'} answering={answers}")
        return answers


DEFAULT = LocalBroker()


def start(timeout: float = 120.0) -> str:
    """Start (or reuse) the default broker on 127.0.0.1:9092."""
    return DEFAULT.start(timeout)


def stop() -> bool:
    """Stop the default broker."""
    return DEFAULT.stop()


def status() -> bool:
    """Whether the default broker answers."""
    return DEFAULT.status()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "fresh", "status"])
    parser.add_argument("--port", type=int, default=9092)
    parser.add_argument("--controller-port", type=int, default=9093)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    broker = LocalBroker(args.port, args.controller_port)
    try:
        if args.command == "start":
            print(broker.start(args.timeout))
        elif args.command == "fresh":
            print(broker.fresh(args.timeout))
        elif args.command == "stop":
            broker.stop()
        else:
            return 0 if broker.status() else 1
    except BrokerError as exc:
        _log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
