"""The response cache's benchmark (issue #27): a hit against a miss, and its cost on misses.

``python -m worker.bench.cache [--requests N] [--rounds R] [--out FILE]``: an in-process
worker, REST only (no broker), serving MiniLM (``models/minilm``, ``make minilm``) from a
temporary repository whose version folder links the exported one; with ``[cache] max_bytes``
or without it.

- **hit vs miss** (cache on): sequential REST calls, one at a time; misses are distinct
  sentences, hits one sentence asked again and again; p50 of each and their ratio (the
  issue's target: a hit at least 20x faster), with the 384 floats of the embedding as JSON
  numbers, then as binary data (``binary_data_output``, as Triton's clients ask).
- **unique stream** (cache on vs off): ``--requests`` distinct sentences, 32 calls in flight,
  sentences per second; legs alternate (on, off, on, off, ...) ``--rounds`` times and the
  medians are compared (target: on within 5% of off). Every one of them is a miss, hashed,
  looked up and stored: the cache's whole cost, at its bound (a small ``max_bytes``, so
  entries are evicted all along).

Each result is one JSON line (and appended to ``--out``). Not a test: figures vary with the
machine; docs/performance.md has one sitting's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from worker.app import Worker
from worker.bench.load import bench_texts
from worker.endpoint_settings import HttpSettings, RestSettings
from worker.errors import WorkerError
from worker.kafka_settings import KafkaSettings
from worker.repository import ModelRepository
from worker.settings import AuditSettings, ModelSettings, Settings

__all__ = ["main", "sentences", "serving"]

MODELS = Path(__file__).resolve().parents[2] / "models"
CACHE_BYTES = 256 * 1024
"""The cache of the unique stream: about 150 MiniLM answers, so it evicts all along."""


def sentences(count: int, label: str) -> list[str]:
    """``count`` distinct short sentences (corpus text, at most 40 words: never truncated)."""
    return [f"{label} {i}: " + " ".join(t.split()[:40]) for i, t in enumerate(bench_texts(count))]


def _repository(root: Path, max_bytes: int) -> Path:
    source = MODELS / "minilm"
    if not (source / "1" / "model.pt2").is_file():
        raise WorkerError("models/minilm is not exported: run `make minilm` first")
    folder = root / f"cache-{max_bytes}" / "minilm"
    folder.mkdir(parents=True)
    config = (source / "config.toml").read_text()
    if max_bytes:
        config += f"\n[cache]\nmax_bytes = {max_bytes}\n"
    (folder / "config.toml").write_text(config)
    (folder / "1").symlink_to(source / "1")
    return folder.parent


@contextlib.asynccontextmanager
async def serving(root: Path, max_bytes: int) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """A REST-only worker serving MiniLM (``max_bytes`` 0: no cache); ``call(text)``."""
    import aiohttp  # noqa: PLC0415

    path = _repository(root, max_bytes)
    settings = Settings(
        kafka=KafkaSettings(enabled=False),
        rest=RestSettings(enabled=True, host="127.0.0.1", port=0),
        http=HttpSettings(enabled=False),
        models=ModelSettings(repository=path),
        audit=AuditSettings(log=False),  # a JSON line per request: the same cost hit or miss
    )
    worker = Worker(settings, ModelRepository.load(path))
    async with asyncio.TaskGroup() as group:
        task = group.create_task(worker.run())
        deadline = time.monotonic() + 120
        while worker.rest_port is None:
            if task.done() or time.monotonic() > deadline:
                raise WorkerError("the worker's REST endpoint did not open")
            await asyncio.sleep(0.05)
        url = f"http://127.0.0.1:{worker.rest_port}/v2/models/minilm/infer"
        async with aiohttp.ClientSession() as session:

            async def call(text: str, *, binary: bool = False) -> dict[str, Any]:
                body: dict[str, Any] = {"inputs": [{"name": "text", "datatype": "BYTES",
                                                    "shape": [1], "data": [text]}]}  # fmt: skip
                if binary:  # the outputs as raw bytes after the JSON header (Triton's way)
                    body["parameters"] = {"binary_data_output": True}
                async with session.post(url, json=body) as response:
                    raw = await response.read()
                    length = response.headers.get("Inference-Header-Content-Length")
                if response.status != 200:  # noqa: PLR2004
                    raise WorkerError(f"REST call failed: {response.status} {raw[:200]!r}")
                answer: dict[str, Any] = json.loads(raw[: int(length)] if length else raw)
                return answer

            yield call
        worker.stop()


async def _p50(call: Callable[..., Awaitable[Any]], texts: list[str], **kw: Any) -> float:
    """Median milliseconds of ``texts`` sent one at a time."""
    times = []
    for text in texts:
        sent = time.perf_counter()
        await call(text, **kw)
        times.append((time.perf_counter() - sent) * 1000)
    return statistics.median(times)


async def hit_vs_miss(root: Path, count: int) -> list[dict[str, Any]]:
    """p50 of a hit and of a miss over REST, cache on: outputs as JSON, then as binary data."""
    results = []
    async with serving(root, 64 * 1024 * 1024) as call:
        await _p50(call, sentences(20, "warm"))
        for binary in (False, True):
            label = "binary" if binary else "json"
            miss = await _p50(call, sentences(count, f"miss-{label}"), binary=binary)
            repeated = f"the same sentence, asked again and again by many callers ({label})"
            first = await call(repeated, binary=binary)
            if first.get("parameters", {}).get("cached"):
                raise WorkerError("the first call of a sentence came from the cache")
            hit = await _p50(call, [repeated] * count, binary=binary)
            last = await call(repeated, binary=binary)
            if not last.get("parameters", {}).get("cached"):
                raise WorkerError("a repeated sentence was not answered from the cache")
            results.append({"leg": "hit_vs_miss", "outputs": label, "requests": count,
                            "miss_p50_ms": round(miss, 3), "hit_p50_ms": round(hit, 3),
                            "speedup": round(miss / hit, 1)})  # fmt: skip
    return results


async def _rate(root: Path, max_bytes: int, texts: list[str]) -> float:
    """Sentences per second of ``texts``, 32 calls in flight."""
    async with serving(root, max_bytes) as call:
        await _p50(call, sentences(20, f"warm-{max_bytes}"))
        gate = asyncio.Semaphore(32)

        async def one(text: str) -> None:
            async with gate:
                answer = await call(text)
                if answer.get("parameters", {}).get("cached"):
                    raise WorkerError("a unique sentence came from the cache")

        started = time.perf_counter()
        await asyncio.gather(*(one(t) for t in texts))
        return len(texts) / (time.perf_counter() - started)


async def unique_stream(root: Path, count: int, rounds: int) -> dict[str, Any]:
    """Throughput of distinct sentences, cache on vs off, in alternating legs."""
    on: list[float] = []
    off: list[float] = []
    for r in range(rounds):
        on.append(await _rate(root / f"on{r}", CACHE_BYTES, sentences(count, f"u{r}")))
        off.append(await _rate(root / f"off{r}", 0, sentences(count, f"u{r}")))
    ratio = statistics.median(on) / statistics.median(off)
    return {"leg": "unique_stream", "requests": count, "rounds": rounds,
            "on_per_s": [round(x, 1) for x in on], "off_per_s": [round(x, 1) for x in off],
            "on_over_off": round(ratio, 3)}  # fmt: skip


async def run(requests: int, rounds: int, out: Path | None) -> None:
    """Both legs; one JSON line each."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results = await hit_vs_miss(root / "latency", 200)
        results.append(await unique_stream(root / "stream", requests, rounds))
    for result in results:
        line = json.dumps(result)
        print(line, flush=True)  # noqa: T201 - the benchmark's report
        if out is not None:
            with out.open("a") as f:
                f.write(line + "\n")


def main(argv: list[str] | None = None) -> None:
    """``python -m worker.bench.cache``."""
    parser = argparse.ArgumentParser(prog="python -m worker.bench.cache", description=__doc__)
    parser.add_argument("--requests", type=int, default=1500, help="unique sentences per leg")
    parser.add_argument("--rounds", type=int, default=3, help="on/off legs of the stream")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines here")
    args = parser.parse_args(argv)
    asyncio.run(run(args.requests, args.rounds, args.out))


if __name__ == "__main__":
    main()
