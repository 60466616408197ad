"""CPU time per request of the worker's own request path, without Kafka (no broker needed).

    python dev/pipeline_cpu.py [--requests 20000] [--chunk 500] [--repeat 3] [--worker-src DIR]

Opens the worker's :class:`~worker.pipeline.Pipeline` (admission, the batcher, the lanes, the
model's thread, answering, reply encoding) over the bench's ``mlp`` model at batch 64 with a
scripted ``publish`` that only counts, as tests/test_pipeline.py does; dispatches ``--requests``
encoded request records in chunks of ``--chunk`` (a fetch's worth each, the event loop let go
in between), and waits until every reply is published. Prints the event-loop thread's CPU time
(``time.thread_time``) and the whole process's (``time.process_time``) per request, after a
warm-up of 3,000 requests. Set against ``dev/request_cpu.py`` (the same worker under a real
load through a broker), the difference is what the Kafka client and the sockets cost.
``--worker-src``: measure another source tree (a checkout of an earlier commit), to compare
before and after in one sitting.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WARM_UP = 3_000


async def measure(source: Path, tmp: Path, requests: int, chunk: int) -> tuple[float, float]:
    """Microseconds of CPU per request: (event-loop thread, all threads)."""
    sys.path.insert(0, str(source))  # before the worker's modules are imported
    from aiokafka import TopicPartition

    from worker.bench.load import request_stream
    from worker.bench.targets import bench_repository
    from worker.formats import Codecs
    from worker.inflight import InFlight
    from worker.metrics import Metrics
    from worker.origins import Record
    from worker.outgoing import Destinations
    from worker.pipeline import Pipeline
    from worker.repository import ModelRepository
    from worker.settings import ModelSettings, RuntimeSettings, Settings

    total = WARM_UP + requests
    root = bench_repository(tmp, max_batch_size=64, delay_ms=5, only="mlp")
    repository = ModelRepository.load(root)
    tp = TopicPartition("requests", 0)
    records = [
        Record(tp, i, None, value, [], 1_000)
        for i, (_, value) in zip(range(total), request_stream("mlp", 1, "cpu"), strict=False)
    ]
    settings = Settings(
        models=ModelSettings(repository=root, torch_threads=1),
        runtime=RuntimeSettings(max_in_flight=total),
    )
    published = 0

    def publish(items: Sequence[Any]) -> None:
        nonlocal published
        published += len(items)

    async def dispatched(batch: Sequence[Any], until: int) -> None:
        for start in range(0, len(batch), chunk):
            for record in batch[start : start + chunk]:
                pipeline.dispatch(record)
            await asyncio.sleep(0)
        deadline = time.monotonic() + 120
        while published < until:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {published} of {until} replies within 120 s")
            await asyncio.sleep(0.001)

    async with asyncio.TaskGroup() as group:
        pipeline = Pipeline(
            group, settings, repository=lambda: repository,
            destinations=Destinations("replies", "dlq", "g"), codecs=Codecs(),
            in_flight=InFlight(total), metrics=Metrics(), publish=publish,
            acknowledged=lambda _items: None,
        )  # fmt: skip
        async with pipeline:
            await dispatched(records[:WARM_UP], WARM_UP)
            thread, process = time.thread_time(), time.process_time()
            await dispatched(records[WARM_UP:], total)
            thread, process = time.thread_time() - thread, time.process_time() - process
            await pipeline.drain()
    return thread / requests * 1e6, process / requests * 1e6


def main() -> int:
    """Measure ``--repeat`` times in fresh processes; print each and the median."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--chunk", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--worker-src", type=Path, default=ROOT)
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.once:
        with tempfile.TemporaryDirectory() as tmp:
            measured = measure(args.worker_src, Path(tmp), args.requests, args.chunk)
            thread, process = asyncio.run(measured)
        print(f"{thread:.1f} {process:.1f}")
        return 0
    runs = []
    for _ in range(args.repeat):  # a fresh process each: no warm caches carried over
        out = subprocess.run(
            [sys.executable, __file__, "--once", *sys.argv[1:]],
            check=True, capture_output=True, text=True,
        ).stdout.split()  # fmt: skip
        runs.append((float(out[-2]), float(out[-1])))
        print(f"event-loop thread {runs[-1][0]:6.1f} us, all threads {runs[-1][1]:6.1f} us")
    loop = sorted(r[0] for r in runs)[len(runs) // 2]
    every = sorted(r[1] for r in runs)[len(runs) // 2]
    print(f"median: event-loop thread {loop:.1f} us, all threads {every:.1f} us per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
