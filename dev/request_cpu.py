"""CPU time per request of a worker (or the echo loop), by thread, under a closed-loop load.

    python dev/request_cpu.py [--target worker|echo] [--model mlp|digits] [--requests 10000]
        [--worker-src DIR] [--profile FILE]

Starts ``python -m worker serve`` (or ``echo``) on fresh topics of the broker named by
``WORKER_KAFKA__BOOTSTRAP_SERVERS``, serving the bench's repository (:mod:`worker.bench.targets`,
``--model`` alone), waits until it answers, sends the load with ``python -m worker bench
--target none``, and reads each of the worker's threads' CPU time from ``/proc`` (Linux)
before and after. ``--worker-src``: run the worker from another source tree (a checkout of an
earlier commit), to measure before and after in one sitting. ``--profile``: also sample the
worker with py-spy (``pip install py-spy``) during the load and write its collapsed stacks
there (``--format raw``: one line per stack and its sample count). Unlike a wall-clock
profile of the event loop, the CPU times show whether the loop's thread is busy, and how
much the model's thread and the Kafka client cost per request.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of ``pid``, by name and thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        label = "main thread (event loop)" if task.name == str(pid) else f"{name}[{task.name}]"
        out[label] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def py_spy() -> str | None:
    """The py-spy program: beside this Python (its virtual environment), else on the PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def main() -> int:
    """Measure; print microseconds of CPU per request for each thread and in all."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=["worker", "echo"], default="worker")
    parser.add_argument("--model", choices=["mlp", "digits"], default="mlp")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--worker-src", type=Path, default=ROOT)
    parser.add_argument("--profile", type=Path, default=None)
    args = parser.parse_args()
    if args.profile is not None and py_spy() is None:
        parser.error(
            "--profile needs py-spy on the PATH or beside this Python (pip install py-spy)"
        )
    sys.path.insert(0, str(ROOT))
    from worker.bench.targets import bench_repository

    size = int(os.environ.get("WORKER_BATCHING__MAX_BATCH_SIZE", "64"))
    with tempfile.TemporaryDirectory() as tmp:
        repo = bench_repository(Path(tmp), max_batch_size=size, delay_ms=5.0, only=args.model)
        return measure(args, repo)


def measure(args: argparse.Namespace, repo: Path) -> int:
    """Serve ``repo``, load it, print the CPU per request by thread."""
    uid = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "PYTHONPATH": str(args.worker_src.resolve()),
        "WORKER_MODELS__REPOSITORY": str(repo),
        "WORKER_KAFKA__REQUESTS_TOPIC": f"cpu.{uid}.requests",
        "WORKER_KAFKA__REPLIES_TOPIC": f"cpu.{uid}.replies",
        "WORKER_KAFKA__DEAD_LETTER_TOPIC": f"cpu.{uid}.dlq",
        "WORKER_KAFKA__GROUP_ID": f"cpu-{uid}",
        "WORKER_LOG__LEVEL": "WARNING",
        "WORKER_AUDIT__LOG": "false",
        "WORKER_HTTP__PORT": "0",
    }
    command = "serve" if args.target == "worker" else "echo"
    served = subprocess.Popen(
        [sys.executable, "-m", "worker", command], env=env, cwd=args.worker_src,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        bench = [sys.executable, "-m", "worker", "bench", "--target", "none", "--model", args.model]
        load = {**env, "PYTHONPATH": str(ROOT)}
        # A first small run waits out start-up (models, group join) off the measurement.
        subprocess.run([*bench, "-n", "50"], env=load, cwd=ROOT, check=True, capture_output=True)
        spy = None
        if args.profile is not None:
            spy = subprocess.Popen(
                [str(py_spy()), "record", "--format", "raw", "--threads", "--rate", "500",
                 "--nonblocking", "--gil", "--pid", str(served.pid), "--output", str(args.profile)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        before = thread_cpu(served.pid)
        subprocess.run([*bench, "-n", str(args.requests)], env=load, cwd=ROOT, check=True)
        after = thread_cpu(served.pid)
        if spy is not None:
            spy.send_signal(2)
            spy.wait(60)
    finally:
        served.terminate()
        served.wait(60)
    print(f"\n{args.target} ({args.model}): CPU per request, by thread ({args.requests} requests)")
    total = 0.0
    for thread, seconds in sorted(after.items(), key=lambda kv: -kv[1]):
        used = seconds - before.get(thread, 0.0)
        total += used
        if used > 0:
            print(f"  {thread:30s} {used * 1e6 / args.requests:8.1f} us")
    print(f"  {'all threads':30s} {total * 1e6 / args.requests:8.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
