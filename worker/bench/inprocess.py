"""The in-process benchmark of ``dev/gpu_check.sh``: the worker's execution path, no broker.

A lent GPU machine has no Java (so no Kafka broker) and 15 minutes in all, so the figures
that matter on a GPU are taken in one process, each stage its own command
(``python -m worker.bench.inprocess STAGE --out FILE``), each measurement appended to
``FILE`` as one JSON line the moment it is taken:

- ``heavy``: rows per second of the real :class:`~worker.instances.Instances` (1, 2, 4 instance
  threads, each with its CUDA streams and warm-up) running
  :func:`~worker.forward.run_batches` (pinned staging, copy stream, overlap), against the
  model's plain ``predict`` in a loop (:func:`plain_predict`) at the same batch and
  precision; int8 legs on the CPU only (``model.py`` refuses int8
  elsewhere);
- ``minilm``: sentences per second of MiniLM through the worker's path (validation, batch
  tokenisation, length-sorted batches, ``run_batches`` in an instance thread) against
  ``SentenceTransformer.encode`` on the same device, batch and precision, and the two
  embeddings' lowest cosine;
- ``grpc``: a worker process (``python -m worker serve``) with Kafka disabled
  (``WORKER_KAFKA__ENABLED=false``), driven over gRPC (:mod:`worker.bench.endpoints`).

Eager against ``compile = "aot"`` on the same path is :mod:`worker.bench.compiled`
(``python -m worker.bench.compiled``), built on these stages' helpers.

``--dry-run`` runs the same code on the CPU with tiny sizes (the MLP instead of the heavy
model, a few texts), so that the script is known to work before a GPU is lent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from worker.bench.endpoints import drive_endpoint
from worker.bench.load import bench_texts
from worker.bench.targets import (
    bench_repository,
    free_port,
    reference_folder,
    spawned,
)
from worker.domain import InferenceRequest, Tensor
from worker.forward import run_batches
from worker.instances import Instances
from worker.kafka_settings import KafkaSettings
from worker.metrics import Metrics
from worker.model import LoadedModel, Prepared
from worker.model_config import Execution
from worker.repository import LoadOptions, ModelRepository

__all__ = [
    "emit", "grpc_stage", "heavy_stage", "instances", "load", "main", "minilm_stage",
    "plain_predict", "through_worker", "worker_throughput",
]  # fmt: skip

RUN = 4
"""Batches per call of ``run_batches`` in this bench (a worker sizes its runs by
``max_batches_per_run`` and ``max_run_ms``, :mod:`worker.pacing`)."""


def emit(out: Path, record: dict[str, Any]) -> None:
    """Append ``record`` to ``out`` as one JSON line (and say it on stdout)."""
    line = json.dumps(record)
    with out.open("a") as file:
        file.write(line + "\n")
    print(line, flush=True)  # noqa: T201 - the stage's log


def load(repo: Path, model: str, device: str, precision: str, batch: int) -> LoadedModel:
    """A version as the worker loads it (warm-up per instance thread on a GPU, at ``batch``)."""
    options = LoadOptions(execution=Execution(device, precision, 1), warm_up=batch)
    return ModelRepository.load(repo, options=options).route(model, None, "").primary


def instances(model: LoadedModel, count: int, threads: int, batch: int) -> Instances:
    """``count`` instance threads for ``model``, warmed up as the worker's lanes do."""
    warm = partial(model.warm_up, batch) if model.warms_up else None
    return Instances(
        model.name, model.version, count, device=model.device, threads=threads,
        busy=Metrics().busy, warm_up=warm,
    )  # fmt: skip


async def worker_throughput(
    model: LoadedModel, count: int, *, threads: int, batch: int, seconds: float
) -> float:
    """Rows/s of ``count`` instances, each kept busy with runs of :data:`RUN` batches.

    Requests are one row each, as over Kafka; every run's results are checked for errors.
    """
    spec = model.config.inputs[0]
    rows = np.random.default_rng(0).random((batch, spec.shape[1]), np.float32)
    requests = [Prepared([rows[i : i + 1]], rows=1) for i in range(batch)]
    batches = [requests] * RUN
    pool = instances(model, count, threads, batch)
    done = 0

    async def caller(until: float) -> None:
        nonlocal done
        while time.perf_counter() < until:
            run = await pool.run(run_batches, model, batches)
            failed = [r for _, _, results in run for r in results if isinstance(r, Exception)]
            if failed:
                raise failed[0]
            done += batch * len(run)

    try:  # warm (first calls of an exported program are slow), then timed
        await asyncio.gather(*(caller(time.perf_counter() + seconds / 2) for _ in range(count)))
        done = 0
        started = time.perf_counter()
        await asyncio.gather(*(caller(started + seconds) for _ in range(count)))
        return done / (time.perf_counter() - started)
    finally:
        pool.close()


def plain_predict(model: LoadedModel, batch: int, *, threads: int, seconds: float) -> float:
    """Rows/s of ``model.predict`` at ``batch`` rows in a plain loop, after as long a warm-up.

    What :func:`~worker.bench.targets.plain_torch_throughput` measures (host inputs, outputs
    back to the host, ``threads`` intra-op threads), on the very program the worker runs.
    """
    torch.set_num_threads(threads)
    spec = model.config.inputs[0]
    inputs = {spec.name: np.random.default_rng(0).random((batch, spec.shape[1]), np.float32)}
    for timed in (False, True):
        rows, started = 0, time.perf_counter()
        while time.perf_counter() - started < (seconds if timed else seconds / 2):
            model.predict(inputs)
            rows += batch
    return rows / (time.perf_counter() - started)


async def heavy_stage(
    out: Path, *, model: str, device: str, precisions: Sequence[str], counts: Sequence[int],
    batches: Sequence[int], threads: int, seconds: float,
) -> None:  # fmt: skip
    """Worker path vs plain ``predict``, per precision, batch and instance count."""
    legs = [(p, "none") for p in precisions] + ([("fp32", "int8")] if device == "cpu" else [])
    with tempfile.TemporaryDirectory(prefix="inprocess-") as tmp:
        for precision, quantize in legs:
            for batch in batches:
                repo = bench_repository(
                    Path(tmp) / f"{precision}-{quantize}-{batch}", max_batch_size=batch,
                    delay_ms=2.0, quantize=quantize, only=model,
                )  # fmt: skip
                loaded = load(repo, model, device, precision, batch)
                plain = plain_predict(loaded, batch, threads=threads, seconds=seconds)
                for count in counts:
                    rate = await worker_throughput(
                        loaded, count, threads=threads, batch=batch, seconds=seconds
                    )
                    emit(out, {
                        "stage": "heavy", "model": model, "device": str(loaded.device),
                        "precision": precision, "quantize": quantize, "batch": batch,
                        "instances": count, "worker_rows_per_s": round(rate, 1),
                        "plain_predict_rows_per_s": round(plain, 1),
                        "worker_vs_plain": round(rate / plain, 3),
                    })  # fmt: skip


def through_worker(model: LoadedModel, texts: Sequence[str], batch: int) -> npt.NDArray[Any]:
    """Embeddings of ``texts`` by the worker's path, in their order (blocking).

    Each text one request: validated, tokenised in one call, sorted by length and cut into
    batches of ``batch`` (as ``encode`` does and the worker's sort window approximates).
    """
    requests = [
        InferenceRequest(f"t{i}", model.name, [Tensor.from_strings("text", [text])])
        for i, text in enumerate(texts)
    ]
    prepared = model.tokenize_many([model.validate(r, tokenize=False) for r in requests])
    ready = [p for p in prepared if isinstance(p, Prepared)]
    for failed in prepared:
        if not isinstance(failed, Prepared):
            raise failed
    order = sorted(range(len(ready)), key=lambda i: ready[i].length)
    cut = [order[k : k + batch] for k in range(0, len(order), batch)]
    out: list[npt.NDArray[Any]] = [np.empty(0)] * len(ready)
    for indices, (_, _, results) in zip(
        cut, run_batches(model, [[ready[i] for i in c] for c in cut]), strict=True
    ):
        for i, result in zip(indices, results, strict=True):
            if isinstance(result, Exception):
                raise result
            out[i] = result[0].to_numpy()[0]
    return np.stack(out)


def sentence_transformers(
    texts: Sequence[str], *, device: str, precision: str, batch: int, threads: int
) -> tuple[float, npt.NDArray[Any]]:
    """Sentences/s of ``SentenceTransformer.encode`` (as the bench's reference) and embeddings."""
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    from worker.device import resolve_device, torch_dtype  # noqa: PLC0415

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(reference_folder()), device=str(resolve_device(device)))
    model.to(torch_dtype(precision))
    model.encode(list(texts[:batch]), batch_size=batch)
    started = time.perf_counter()
    embeddings = model.encode(list(texts), batch_size=batch, normalize_embeddings=True)
    rate = len(texts) / (time.perf_counter() - started)
    return rate, np.asarray(embeddings, dtype=np.float32)


async def minilm_stage(
    out: Path, *, device: str, precisions: Sequence[str], count: int, batch: int, threads: int
) -> None:
    """MiniLM through the worker's path vs ``SentenceTransformer.encode``, per precision."""
    texts = bench_texts(count)
    with tempfile.TemporaryDirectory(prefix="inprocess-") as tmp:
        repo = bench_repository(Path(tmp), max_batch_size=batch, delay_ms=5.0, only="minilm")
        if not (repo / "minilm").is_dir():
            raise SystemExit("models/minilm is not exported (make minilm, or the GPU pack)")
        for precision in precisions:
            model = load(repo, "minilm", device, precision, batch)
            pool = instances(model, 1, threads, batch)
            try:
                await pool.run(through_worker, model, texts[:batch], batch)  # warm
                started = time.perf_counter()
                ours = await pool.run(through_worker, model, texts, batch)
                rate = len(texts) / (time.perf_counter() - started)
            finally:
                pool.close()
            reference, theirs = await asyncio.to_thread(
                partial(sentence_transformers, texts, device=device, precision=precision,
                        batch=batch, threads=threads)
            )  # fmt: skip
            cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1)
            cosine /= np.linalg.norm(theirs, axis=1)
            emit(out, {
                "stage": "minilm", "device": str(model.device), "precision": precision,
                "batch": batch, "texts": len(texts), "worker_sentences_per_s": round(rate, 1),
                "sentence_transformers_sentences_per_s": round(reference, 1),
                "worker_vs_sentence_transformers": round(rate / reference, 3),
                "min_cosine_worker_vs_sentence_transformers": round(float(cosine.min()), 5),
            })  # fmt: skip


async def grpc_stage(
    out: Path, *, model: str, device: str, precision: str, requests: int, log: Path
) -> None:
    """A worker process with Kafka disabled, closed-loop over gRPC."""
    with tempfile.TemporaryDirectory(prefix="inprocess-") as tmp:
        repo = bench_repository(Path(tmp), max_batch_size=64, delay_ms=2.0, only=model)
        port = free_port()
        env = {
            "WORKER_KAFKA__ENABLED": "false",
            "WORKER_GRPC__ENABLED": "true",
            "WORKER_GRPC__HOST": "127.0.0.1",
            "WORKER_GRPC__PORT": str(port),
            "WORKER_MODELS__DEVICE": device,
            "WORKER_MODELS__PRECISION": precision,
        }
        with spawned("worker", KafkaSettings(), repo, log, env_over=env):
            result = await drive_endpoint(
                "grpc", port, label=f"grpc-{model}-{precision}", mode="closed", model=model,
                requests=requests, rows=1, concurrency=requests, rate=0.0,
            )  # fmt: skip
    emit(out, {"stage": "grpc", "model": model, "device": device, "precision": precision,
               **result.summary(), "errors": result.errors})  # fmt: skip
    if result.errors:
        raise RuntimeError(f"{result.errors} of {requests} gRPC calls failed (log: {log})")


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(s) for s in text.split(",") if s]


def main() -> None:
    """``python -m worker.bench.inprocess {heavy,minilm,grpc} --out FILE [--dry-run]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["heavy", "minilm", "grpc"])
    parser.add_argument("--out", type=Path, required=True, help="JSON lines appended here")
    parser.add_argument("--dry-run", action="store_true", help="the CPU, tiny sizes")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--log", type=Path, default=Path("inprocess-worker.log"))
    args = parser.parse_args()
    dry = args.dry_run
    device = "cpu" if dry else args.device
    precisions = ["fp32", "bf16"] if dry else ["fp32", "fp16", "bf16"]
    if args.stage == "heavy":
        work = heavy_stage(
            args.out, model="mlp" if dry else "heavy", device=device, precisions=precisions,
            counts=[1, 2] if dry else [1, 2, 4], batches=[16] if dry else [64, 256],
            threads=args.threads, seconds=0.3 if dry else 2.0,
        )  # fmt: skip
    elif args.stage == "minilm":
        work = minilm_stage(
            args.out, device=device, precisions=["fp32"] if dry else precisions,
            count=24 if dry else 2000, batch=8 if dry else 64, threads=args.threads,
        )  # fmt: skip
    else:
        work = grpc_stage(
            args.out, model="mlp" if dry else "heavy", device=device,
            precision="fp32" if dry else "fp16", requests=200 if dry else 5000, log=args.log,
        )  # fmt: skip
    asyncio.run(work)


if __name__ == "__main__":
    main()
