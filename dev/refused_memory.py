"""A worker's memory under a flood of records it refuses (undecodable bytes), before and after.

    python dev/refused_memory.py [--records 3000] [--size 100000] [--worker-src DIR]

Starts ``python -m worker serve`` (from ``--worker-src``, default this checkout) on fresh topics
of the broker named by ``WORKER_KAFKA__BOOTSTRAP_SERVERS``, serving the bench's mlp model;
waits until it answers; reads its resident memory (``VmRSS``, Linux); publishes ``--records``
records, each the same ``--size`` + 1 random bytes that no format decodes; waits until all are
in the dead-letter topic; and prints the resident memory then and its peak (``VmHWM``). A refused
record's leftovers (a garbage cycle holding its bytes, say) show as a higher peak than a
tree without it, measured in the same sitting (the allocator keeps freed memory, so compare
peaks, not the memory after).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 300


def memory_mib(pid: int) -> tuple[int, int]:
    """Resident memory of ``pid`` now and at its peak, in MiB."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


async def flood(env: dict[str, str], records: int, size: int) -> int:
    """Publish the refused records; wait until the dead-letter topic holds them all."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    servers = env["WORKER_KAFKA__BOOTSTRAP_SERVERS"]
    producer = AIOKafkaProducer(bootstrap_servers=servers, max_request_size=size + (1 << 20))
    await producer.start()
    try:
        body = b"\x01" + os.urandom(size)  # a bare Avro request cannot start like this
        for i in range(records):
            await producer.send(env["WORKER_KAFKA__REQUESTS_TOPIC"], body, key=str(i).encode())
        await producer.flush()
    finally:
        await producer.stop()
    topic = env["WORKER_KAFKA__DEAD_LETTER_TOPIC"]
    consumer = AIOKafkaConsumer(bootstrap_servers=servers)
    await consumer.start()
    try:
        deadline, held = time.monotonic() + DEADLINE_S, 0
        while held < records and time.monotonic() < deadline:
            metadata = await consumer._client.fetch_all_metadata()  # no public call for it
            partitions = metadata.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in partitions]
            held = sum((await consumer.end_offsets(tps)).values()) if tps else 0
            await asyncio.sleep(0.5)  # the topic's size is polled: nothing to wait on instead
        return held
    finally:
        await consumer.stop()


def repository(tmp: Path) -> Path:
    """The bench's mlp model at batch 64 (what ``dev/request_cpu.py`` serves)."""
    from worker.bench.targets import bench_repository  # after main() set sys.path

    return bench_repository(tmp, max_batch_size=64, delay_ms=5.0, only="mlp")


def stop(served: subprocess.Popen[bytes]) -> None:
    """SIGTERM, SIGKILL after 60 s (:func:`worker.bench.targets.stop`)."""
    from worker.bench.targets import stop as stop_child  # after main() set sys.path

    stop_child(served)


def main() -> int:
    """Measure one tree; print the memory before, after and at the peak."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=3_000)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--worker-src", type=Path, default=ROOT)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    uid = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "PYTHONPATH": str(args.worker_src.resolve()),
            "WORKER_MODELS__REPOSITORY": str(repository(Path(tmp))),
            "WORKER_KAFKA__REQUESTS_TOPIC": f"refused.{uid}.requests",
            "WORKER_KAFKA__REPLIES_TOPIC": f"refused.{uid}.replies",
            "WORKER_KAFKA__DEAD_LETTER_TOPIC": f"refused.{uid}.dlq",
            "WORKER_KAFKA__GROUP_ID": f"refused-{uid}",
            "WORKER_LOG__LEVEL": "ERROR",
            "WORKER_AUDIT__LOG": "false",
            "WORKER_HTTP__PORT": "0",
        }
        served = subprocess.Popen(
            [sys.executable, "-m", "worker", "serve"], env=env, cwd=args.worker_src,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            bench = [sys.executable, "-m", "worker", "bench", "--target", "none", "-n", "200"]
            load = {**env, "PYTHONPATH": str(ROOT)}  # waits out start-up: it answers
            subprocess.run([*bench, "--model", "mlp"], env=load, cwd=ROOT, check=True,
                           capture_output=True)  # fmt: skip
            before = memory_mib(served.pid)
            held = asyncio.run(flood(env, args.records, args.size))
            after, peak = memory_mib(served.pid)
        finally:
            stop(served)
    print(
        f"{args.worker_src}: {held} of {args.records} records of {args.size} bytes dead-lettered;"
        f" resident {before[0]} MiB before (peak {before[1]}), {after} MiB after, peak {peak} MiB"
    )
    return 0 if held >= args.records else 1  # at least once: a copy may be written twice


if __name__ == "__main__":
    sys.exit(main())
