"""Measure a worker's memory while it drains a large backlog (default 200,000 requests).

    python dev/backlog_memory.py [--requests 200000] [--bootstrap 127.0.0.1:9092]
                                 [--set WORKER_AUDIT__LOG=false ...]

Publishes the backlog to fresh topics first, then starts ``python -m worker serve`` (with any
extra ``--set`` settings; its log goes to ``.kafka/drain-worker.log``) and samples its resident
set size (``/proc/<pid>/status`` VmRSS) until every request is answered. Prints the RSS before
the first reply, the peak, and the drain rate. Needs a running broker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from aiokafka import TopicPartition

from worker.codec import encode_request
from worker.domain import InferenceRequest, Tensor
from worker.kafka import ensure_topics, make_consumer, make_producer
from worker.settings import KafkaSettings

ROOT = Path(__file__).resolve().parent.parent


def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def topic_size(kafka: KafkaSettings, topic: str) -> int:
    """Records in a topic (sum of end offsets)."""
    producer = make_producer(kafka)
    consumer = make_consumer(kafka, group_id=None)
    await producer.start()
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await producer.partitions_for(topic)]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()
        await producer.stop()


async def main() -> None:
    """Publish the backlog, run a worker over it, report memory."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--set", action="append", default=[], metavar="WORKER_X__Y=VALUE")
    args = parser.parse_args()
    uid = uuid.uuid4().hex[:8]
    kafka = KafkaSettings(
        bootstrap_servers=args.bootstrap,
        requests_topic=f"backlog.{uid}.requests",
        replies_topic=f"backlog.{uid}.replies",
        dead_letter_topic=f"backlog.{uid}.dlq",
        group_id=f"backlog-{uid}",
    )
    await ensure_topics(kafka, [kafka.requests_topic, kafka.replies_topic, kafka.dead_letter_topic])
    pixels = np.load(ROOT / "models" / "digits" / "testset.npz")["pixels"].astype(np.float32)
    values = [
        encode_request(
            InferenceRequest(f"r{i}", "digits", [Tensor.from_numpy("pixels", pixels[i][None])])
        )
        for i in range(len(pixels))
    ]
    producer = make_producer(kafka, linger_ms=20)
    await producer.start()
    started = time.perf_counter()
    futures = [
        await producer.send(kafka.requests_topic, values[i % len(values)])
        for i in range(args.requests)
    ]
    await asyncio.gather(*futures)
    await producer.stop()
    print(f"published {args.requests} requests in {time.perf_counter() - started:.1f}s")

    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env |= {
        "WORKER_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "WORKER_KAFKA__REQUESTS_TOPIC": kafka.requests_topic,
        "WORKER_KAFKA__REPLIES_TOPIC": kafka.replies_topic,
        "WORKER_KAFKA__DEAD_LETTER_TOPIC": kafka.dead_letter_topic,
        "WORKER_KAFKA__GROUP_ID": kafka.group_id,
        "WORKER_LOG__LEVEL": "WARNING",
        "WORKER_LOG__FORMAT": "json",
        "WORKER_HTTP__PORT": "0",
    }
    env |= dict(item.split("=", 1) for item in args.set)
    log_path = ROOT / ".kafka" / "drain-worker.log"
    # Popen returns at once; the worker runs beside this event loop, which only samples it.
    with log_path.open("wb") as worker_log:
        proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "worker", "serve"], env=env, cwd=ROOT, stderr=worker_log
        )
    peak = 0.0
    first_reply_rss = None
    began = time.perf_counter()
    answered = 0
    while answered < args.requests:
        await asyncio.sleep(0.5)
        rss = rss_mib(proc.pid)
        peak = max(peak, rss)
        answered = await topic_size(kafka, kafka.replies_topic)
        if answered and first_reply_rss is None:
            first_reply_rss = rss
            began = time.perf_counter()
        if proc.poll() is not None:
            raise SystemExit(f"worker exited with {proc.returncode}")
    elapsed = time.perf_counter() - began
    proc.terminate()
    proc.wait(60)
    print(
        f"{' '.join(args.set) or 'defaults'}: backlog {args.requests}: RSS at first reply "
        f"{first_reply_rss:.0f} MiB, peak {peak:.0f} MiB; "
        f"drained at {args.requests / elapsed:.0f} requests/s"
    )


if __name__ == "__main__":
    asyncio.run(main())
