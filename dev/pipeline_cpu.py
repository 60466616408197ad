"""CPU time per request of the worker's own request path, without Kafka (no broker needed).

    python dev/pipeline_cpu.py [--requests 20000] [--chunk 500] [--repeat 3] [--worker-src DIR]

Opens the worker's :class:`~worker.pipeline.Pipeline` (admission, the batcher, the lanes, the
model's thread, answering, reply encoding) over the bench's ``mlp`` model at batch 64 with a
scripted ``publish`` that only counts, as tests/test_pipeline.py does; dispatches ``--requests``
encoded request records in chunks of ``--chunk`` (a fetch's worth each, the event loop let go
in between, at most ``max_in_flight``'s default of 2,000 unanswered as in the worker), and waits
until every request is answered. The collector is set as the worker sets it while serving
(``worker.heap.serving``: the heap frozen, young collections deferred; a source tree from
before that module only freezes the heap). Prints the event-loop thread's CPU time
(``time.thread_time``) and the whole process's (``time.process_time``) per request, after a
warm-up of 3,000 requests. Set against ``dev/request_cpu.py`` (the same worker under a real
load through a broker), the difference is what the Kafka client and the sockets cost, the
parts of the worker this leaves out (the intake's offset tracking, the replier's producer
calls, acknowledgements and commits), and what the same code costs more under load.
``--worker-src``: measure another source tree (a checkout of an earlier commit), to compare
before and after in one sitting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WARM_UP = 3_000
DEADLINE_S = 120


async def measure(source: Path, tmp: Path, requests: int, chunk: int) -> tuple[float, float]:
    """Microseconds of CPU per request: (event-loop thread, all threads)."""
    sys.path.insert(0, str(source))  # before the worker's modules are imported
    from worker.bench.targets import bench_repository
    from worker.formats import Codecs
    from worker.inflight import InFlight
    from worker.metrics import Metrics
    from worker.outgoing import Destinations
    from worker.pipeline import Pipeline
    from worker.repository import ModelRepository
    from worker.settings import ModelSettings, RuntimeSettings, Settings

    backlog = RuntimeSettings.model_fields["max_in_flight"].default  # unanswered, at most
    total = WARM_UP + requests
    chunk = min(chunk, backlog)  # a larger fetch would wait for room that never comes
    root = bench_repository(tmp, max_batch_size=64, delay_ms=5, only="mlp")
    repository = ModelRepository.load(root)
    records = _records(total)
    settings = Settings(
        models=ModelSettings(repository=root, torch_threads=1),
        runtime=RuntimeSettings(max_in_flight=total),
    )
    published = 0  # requests answered: a record's messages (reply, dead letter) come in one call
    answered = asyncio.Event()  # set on every publish: the dispatcher waits on it, no polling

    def publish(items: Sequence[Any]) -> None:
        nonlocal published
        published += len({id(item.origin) for item in items})
        answered.set()

    async def published_at_least(count: int) -> None:
        try:
            async with asyncio.timeout(DEADLINE_S):
                while published < count:
                    answered.clear()
                    await answered.wait()
        except TimeoutError:
            failed = f"only {published} of {count} requests answered within {DEADLINE_S} s"
            raise SystemExit(failed) from None

    async def dispatched(batch: Sequence[Any], sent: int) -> None:
        for start in range(0, len(batch), chunk):
            part = batch[start : start + chunk]
            await published_at_least(sent + len(part) - backlog)
            for record in part:
                pipeline.dispatch(record)
            sent += len(part)
            await asyncio.sleep(0)
        await published_at_least(sent)

    with collector():  # as Worker.run: set before the pipeline opens, undone after it closed
        async with asyncio.TaskGroup() as group:
            pipeline = Pipeline(
                group, settings, repository=lambda: repository,
                destinations=Destinations("replies", "dlq", "g"), codecs=Codecs(),
                in_flight=InFlight(total), metrics=Metrics(), publish=publish,
                acknowledged=lambda _items: None,
            )  # fmt: skip
            async with pipeline:
                await dispatched(records[:WARM_UP], 0)
                thread, process = time.thread_time(), time.process_time()
                await dispatched(records[WARM_UP:], WARM_UP)
                thread, process = time.thread_time() - thread, time.process_time() - process
                async with asyncio.timeout(DEADLINE_S):
                    await pipeline.drain()
    return thread / requests * 1e6, process / requests * 1e6


def _records(count: int) -> list[Any]:
    """``count`` records of the bench's mlp requests, as the intake hands them on."""
    from aiokafka import TopicPartition

    from worker.bench.load import request_stream
    from worker.origins import Record

    tp = TopicPartition("requests", 0)
    stream = request_stream("mlp", 1, "cpu")
    return [
        Record(tp, i, None, value, [], 1_000)
        for i, (_, value) in zip(range(count), stream, strict=False)
    ]


def collector() -> contextlib.AbstractContextManager[None]:
    """The collector as the worker sets it while serving (the tree's own ``worker.heap``)."""
    try:
        from worker.heap import serving  # from the tree under measurement
    except ImportError:  # a tree from before worker.heap: it froze the heap, nothing more
        return _frozen()
    return serving()


@contextlib.contextmanager
def _frozen() -> Iterator[None]:
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def main() -> int:
    """Measure ``--repeat`` times in fresh processes; print each and the median."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=_positive, default=20_000)
    parser.add_argument("--chunk", type=_positive, default=500)
    parser.add_argument("--repeat", type=_positive, default=3)
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
        out = subprocess.run(  # stderr passes through: a failing run shows why
            [sys.executable, __file__, "--once", *sys.argv[1:]],
            check=True, stdout=subprocess.PIPE, text=True, timeout=4 * DEADLINE_S,
        ).stdout.split()  # fmt: skip
        runs.append((float(out[-2]), float(out[-1])))
        print(f"event-loop thread {runs[-1][0]:6.1f} us, all threads {runs[-1][1]:6.1f} us")
    loop = statistics.median(r[0] for r in runs)
    every = statistics.median(r[1] for r in runs)
    print(f"median: event-loop thread {loop:.1f} us, all threads {every:.1f} us per request")
    return 0


def _positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
