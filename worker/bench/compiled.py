"""The in-process benchmark's ``compile`` stage: eager against ``compile = "aot"``.

``python -m worker.bench.compiled --out FILE`` (``dev/gpu_check.sh``'s last stage): the same
program loaded twice as the worker loads it, once eager and once compiled with AOTInductor
(:mod:`worker.compiling`; the package comes from the compile cache when it is there), then
measured in turns (eager, aot, eager, aot ...) in one process:

- ``mlp`` (and ``heavy`` on a GPU): rows per second of the worker's
  :class:`~worker.instances.Instances` running :func:`~worker.forward.run_batches` at each
  batch size (:func:`~worker.bench.inprocess.worker_throughput`);
- ``minilm``: sentences per second through the worker's path on the bench corpus
  (:func:`~worker.bench.inprocess.through_worker`: validation, batch tokenisation,
  length-sorted batches), and the lowest cosine between the compiled embeddings and fp32
  eager's over the whole corpus (the issue's bar: >= 0.9999).

Each measurement is one JSON line, with the compile's outcome (compiled, cached, seconds).
``--dry-run``: the CPU, the MLP alone, tiny sizes (as :mod:`worker.bench.inprocess`'s).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from worker.bench.inprocess import emit, instances, load, through_worker, worker_throughput
from worker.bench.load import bench_texts
from worker.bench.targets import bench_repository
from worker.model import LoadedModel

__all__ = ["compile_stage", "main", "outcome"]

MODES = ("none", "aot")


def outcome(model: LoadedModel) -> dict[str, Any]:
    """How the version runs: eager, or compiled (from the cache or not, in how long)."""
    done = model.compilation
    if done is None:
        return {"compiled": False}
    return {
        "compiled": done.compiled, "cached": done.cached,
        "compile_seconds": round(done.seconds, 1), "compile_error": done.error,
    }  # fmt: skip


async def _mlp_legs(
    out: Path, tmp: Path, *, model: str, device: str, precision: str, batches: Sequence[int],
    threads: int, seconds: float, rounds: int,
) -> None:  # fmt: skip
    for batch in batches:
        loaded = {}
        for mode in MODES:
            repo = bench_repository(tmp / f"{model}-{mode}-{batch}", max_batch_size=batch,
                                    delay_ms=2.0, only=model, compile_mode=mode)  # fmt: skip
            loaded[mode] = load(repo, model, device, precision, batch)
        spec = loaded["none"].config.inputs[0]
        rows = {spec.name: np.random.default_rng(1).random((batch, spec.shape[1]), np.float32)}
        eager, aot = (loaded[mode].predict(rows) for mode in MODES)
        differs = max(float(np.abs(eager[k] - aot[k]).max()) for k in eager)
        for turn in range(rounds):
            for mode, version in loaded.items():
                rate = await worker_throughput(
                    version, 1, threads=threads, batch=batch, seconds=seconds
                )
                emit(out, {
                    "stage": "compile", "model": model, "device": str(version.device),
                    "precision": precision, "batch": batch, "compile": mode, "round": turn,
                    "worker_rows_per_s": round(rate, 1), "max_abs_diff_vs_eager": differs,
                    **outcome(version),
                })  # fmt: skip


async def _minilm_legs(
    out: Path, tmp: Path, *, device: str, precision: str, count: int, batch: int,
    threads: int, rounds: int,
) -> None:  # fmt: skip
    texts = bench_texts(count)
    loaded: dict[str, LoadedModel] = {}
    for mode in MODES:
        repo = bench_repository(tmp / f"minilm-{mode}", max_batch_size=batch, delay_ms=5.0,
                                only="minilm", compile_mode=mode)  # fmt: skip
        if not (repo / "minilm").is_dir():
            raise SystemExit("models/minilm is not exported (make minilm, or the GPU pack)")
        loaded[mode] = load(repo, "minilm", device, precision, batch)
    reference = loaded["none"]
    if precision != "fp32":
        reference = load(tmp / "minilm-none" / "models", "minilm", device, "fp32", batch)
    pools = {mode: instances(version, 1, threads, batch) for mode, version in loaded.items()}
    try:
        exact = await pools["none"].run(through_worker, reference, texts, batch)
        for turn in range(rounds):
            for mode, version in loaded.items():
                await pools[mode].run(through_worker, version, texts[:batch], batch)  # warm
                started = time.perf_counter()
                ours = await pools[mode].run(through_worker, version, texts, batch)
                rate = len(texts) / (time.perf_counter() - started)
                emit(out, {
                    "stage": "compile", "model": "minilm", "device": str(version.device),
                    "precision": precision, "batch": batch, "compile": mode, "round": turn,
                    "texts": len(texts), "worker_sentences_per_s": round(rate, 1),
                    "min_cosine_vs_fp32_eager": _min_cosine(ours, exact),
                    **outcome(version),
                })  # fmt: skip
    finally:
        for pool in pools.values():
            pool.close()


def _min_cosine(ours: npt.NDArray[Any], theirs: npt.NDArray[Any]) -> float:
    """The lowest cosine between matching rows."""
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1)
    return float((cosine / np.linalg.norm(theirs, axis=1)).min())


async def compile_stage(
    out: Path, *, models: Sequence[str], device: str, precision: str, batches: Sequence[int],
    threads: int, seconds: float, texts: int, text_batch: int, rounds: int,
) -> None:  # fmt: skip
    """Eager vs ``compile = "aot"`` for each of ``models`` (``minilm`` or an MLP of the bench)."""
    with tempfile.TemporaryDirectory(prefix="compiled-") as tmp:
        for model in models:
            if model == "minilm":
                await _minilm_legs(
                    out, Path(tmp), device=device, precision=precision, count=texts,
                    batch=text_batch, threads=threads, rounds=rounds,
                )  # fmt: skip
            else:
                await _mlp_legs(
                    out, Path(tmp), model=model, device=device, precision=precision,
                    batches=batches, threads=threads, seconds=seconds, rounds=rounds,
                )  # fmt: skip


def main() -> None:
    """``python -m worker.bench.compiled --out FILE [--dry-run] [--models mlp,minilm] ...``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON lines appended here")
    parser.add_argument("--dry-run", action="store_true", help="the CPU, the MLP, tiny sizes")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models", default="", help="default mlp,minilm,heavy")
    parser.add_argument("--batches", default="", help="rows per batch, default 1,64")
    parser.add_argument("--rounds", type=int, default=1, help="eager/aot turns")
    parser.add_argument("--precision", default="fp16", help="on a GPU (the CPU: fp32)")
    parser.add_argument("--seconds", type=float, default=2.0, help="per MLP leg")
    parser.add_argument("--texts", type=int, default=2000, help="MiniLM: corpus paragraphs")
    args = parser.parse_args()
    dry = args.dry_run
    device = "cpu" if dry else args.device
    models = [m for m in args.models.split(",") if m] or (
        ["mlp"] if dry else ["mlp", "minilm", "heavy"]
    )
    batches = [int(b) for b in args.batches.split(",") if b] or ([16] if dry else [1, 64])
    work = compile_stage(
        args.out, models=models, device=device,
        precision="fp32" if device == "cpu" else args.precision, batches=batches,
        threads=args.threads, seconds=0.3 if dry else args.seconds,
        texts=24 if dry else args.texts, text_batch=8 if dry else 64, rounds=args.rounds,
    )  # fmt: skip
    asyncio.run(work)


if __name__ == "__main__":
    main()
