"""Command line: ``python -m worker serve | predict | demo | bench | echo | plain``.

All commands take their Kafka and model settings from the environment (``WORKER_*``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from aiokafka.errors import KafkaConnectionError, KafkaError

from worker.client import InferenceClient
from worker.domain import BYTES, InferenceResponse, Tensor
from worker.errors import ConfigError, ConnectError, DecodeError, WorkerError
from worker.logs import configure_logging
from worker.settings import Settings, load_settings
from worker.v2json import parse_json_body, request_from_body

if TYPE_CHECKING:
    from worker.app import Worker

__all__ = ["MAX_PROCESSES", "main", "response_to_json", "summary", "tensors_from_json"]

MAX_PROCESSES = 256
"""The most worker processes ``serve --processes`` starts."""


def tensors_from_json(body: bytes) -> list[Tensor]:
    """KServe V2 JSON inputs (``{"inputs": [{name, datatype, shape, data}]}``) -> tensors.

    Read by the worker's own V2 JSON decoder, with its checks; DecodeError says what is wrong.
    """
    return request_from_body(parse_json_body(body), [("model_name", b"-")], None).inputs


def response_to_json(response: InferenceResponse) -> dict[str, Any]:
    """A reply as KServe V2-style JSON (outputs' data as flat lists)."""
    return {
        "id": response.id,
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": [
            {
                "name": t.name,
                "datatype": t.datatype,
                "shape": list(t.shape),
                "data": _json_data(t),
            }
            for t in response.outputs
        ],
        "error": None
        if response.error is None
        else {"code": response.error.code, "message": response.error.message},
        "timing": None
        if response.timing is None
        else {
            "queue_us": response.timing.queue_us,
            "compute_us": response.timing.compute_us,
            "batch_size": response.timing.batch_size,
        },
    }


def _json_data(tensor: Tensor) -> list[Any]:
    """A tensor's elements as a flat JSON list (BYTES as text, undecodable bytes replaced)."""
    values = tensor.to_numpy().ravel().tolist()
    if tensor.datatype == BYTES:
        return [v.decode(errors="replace") for v in values]
    return values


def summary(response: InferenceResponse, *, first: int = 5) -> list[str]:
    """One line per output row: its size, its L2 norm (numbers) and its first values."""
    if response.error is not None:
        return [f"error {response.error.code}: {response.error.message}"]
    lines = []
    for tensor in response.outputs:
        array = tensor.to_numpy()
        rows = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(-1, 1)
        for i, row in enumerate(rows):
            norm = ""
            if row.dtype.kind in "fiu":
                norm = f", norm {float(np.linalg.norm(row.astype(np.float64))):.4f}"
            values = ", ".join(f"{v:.4f}" if isinstance(v, float) else repr(v)
                               for v in row[:first].tolist())  # fmt: skip
            lines.append(f"{tensor.name}[{i}]: {row.size} values{norm}, first [{values}]")
    if response.parameters:
        lines.append(f"parameters: {json.dumps(response.parameters)}")
    return lines


def _build_worker(settings: Settings) -> Worker:
    """Import torch and load every model (slow: run in a thread while signals are watched)."""
    from worker.app import Worker  # noqa: PLC0415 - keeps `predict` free of torch start-up
    from worker.repository import LoadOptions, ModelRepository  # noqa: PLC0415

    models = settings.models
    options = LoadOptions(
        models.allow_code, models.execution, settings.batching.max_batch_size,
        compile_cache=models.compile_cache,
    )  # fmt: skip
    return Worker(settings, ModelRepository.load(models.repository, options=options))


async def _serve(settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    stop_early = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_early.set)
    # Start-up loads the repository as it is now, so a reload asked for meanwhile is moot.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    worker = await asyncio.to_thread(_build_worker, settings)
    if stop_early.is_set():
        print("stopped during start-up; nothing was fetched", file=sys.stderr)
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    loop.add_signal_handler(signal.SIGHUP, worker.request_reload)
    await worker.run()


async def _serve_processes(settings: Settings, processes: int) -> int:
    """Process mode (:mod:`worker.processes`): ``processes`` workers under this one."""
    from worker.processes import Parent  # noqa: PLC0415 - aiohttp client only when asked

    loop = asyncio.get_running_loop()
    async with Parent.running(settings, processes, environ=os.environ) as parent:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, parent.stop)
        loop.add_signal_handler(signal.SIGHUP, parent.reload)
        return await parent.run()


def _processes(text: str) -> int:
    """An argparse type: a count of processes, or ``auto`` (cores this process may use)."""
    from worker.processes import available_cores  # noqa: PLC0415 - only for serve

    if text == "auto":
        return min(available_cores(), MAX_PROCESSES)
    value = int(text) if re.fullmatch(r"[0-9]{1,4}", text) else 0
    if not 1 <= value <= MAX_PROCESSES:
        raise argparse.ArgumentTypeError(
            f"{text[:20]!r} is neither 'auto' nor a whole number from 1 to {MAX_PROCESSES}"
        )
    return value


async def _reference(settings: Settings, name: str) -> None:
    from worker.bench.references import run_echo, run_plain  # noqa: PLC0415

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await (run_echo if name == "echo" else run_plain)(settings, stop)


async def _bench(settings: Settings, args: argparse.Namespace) -> int:
    from worker.bench import run  # noqa: PLC0415 - needs the bench extra (rich, matplotlib)

    report = await run(settings, args)
    return 1 if any(r["errors"] for r in report["results"]) else 0


async def _predict(settings: Settings, args: argparse.Namespace) -> int:
    if args.text:  # as the shell gave them: bytes that are not UTF-8 stay those bytes
        tensors = [Tensor.from_strings(args.text_input, [os.fsencode(t) for t in args.text])]
    else:
        try:
            tensors = tensors_from_json(await asyncio.to_thread(Path(args.input).read_bytes))
        except OSError as exc:
            raise ConfigError(f"--input {args.input}: {exc.strerror or exc}") from None
        except DecodeError as exc:
            raise ConfigError(f"--input {args.input}: {exc.message}") from None
    client = InferenceClient(settings.kafka, timeout=args.timeout, wait_for_topics=args.timeout)
    async with client:
        reply = await client.infer(args.model, tensors, version=args.version)
    if args.text and not args.json:
        print("\n".join(summary(reply)))
    else:
        print(json.dumps(response_to_json(reply), indent=2))
    return 0 if reply.error is None else 1


async def _demo(settings: Settings, args: argparse.Namespace) -> int:
    path = settings.models.repository / "digits" / "testset.npz"
    try:
        testset = np.load(path)
    except OSError as exc:
        raise ConfigError(
            f"the digits test split {path} cannot be read ({exc.strerror or exc}); run from "
            "the checkout or set WORKER_MODELS__REPOSITORY to its models folder"
        ) from None
    pixels = testset["pixels"].astype(np.float32)[: args.limit]
    labels = testset["labels"][: args.limit]
    client = InferenceClient(settings.kafka, timeout=args.timeout, wait_for_topics=args.timeout)
    async with client:
        # One request first: waits out a worker that is still starting, so the rate is fair.
        await client.infer("digits", {"pixels": pixels[:1]})
        started = time.perf_counter()
        replies = await asyncio.gather(
            *(client.infer("digits", {"pixels": row[None, :]}) for row in pixels)
        )
        elapsed = time.perf_counter() - started
    predicted = np.array([r.output("label")[0] for r in replies])
    accuracy = float((predicted == labels).mean())
    batch_sizes = [r.timing.batch_size for r in replies if r.timing is not None]
    print(
        f"digits demo: {len(replies)} requests, accuracy {accuracy:.4f}, "
        f"{len(replies) / elapsed:.0f} requests/s, mean batch size "
        f"{np.mean(batch_sizes):.1f} (max {max(batch_sizes)})"
    )
    return 0 if accuracy >= args.min_accuracy else 1


async def _until_signal(command: Coroutine[Any, Any, int]) -> int:
    """Run a client command; SIGTERM or SIGINT stops it at once (exit code 128 + signal).

    In a container the command may be PID 1, which the kernel never stops for a signal it has
    no handler for: without this, ``docker stop`` waits out its grace period and kills it.
    Ctrl-C gets a one-line message instead of a traceback.
    """
    task = asyncio.ensure_future(command)
    received: list[signal.Signals] = []

    def stop(sig: signal.Signals) -> None:
        received.append(sig)
        task.cancel()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if not received or (current is not None and current.cancelling()):
            raise
        print(f"stopped by {received[0].name}", file=sys.stderr)
        return 128 + received[0]


def _positive(kind: Callable[[str], int | float]) -> Callable[[str], Any]:
    """An argparse type: a finite number above 0."""

    def parse(text: str) -> int | float:
        value = kind(text)
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number above 0")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker",
        description="Kafka inference worker. Settings come from WORKER_* environment variables.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="serve requests from the requests topic until SIGTERM/SIGINT"
    )
    serve.add_argument(
        "--processes", type=_processes, default=1,
        help="worker processes in one group under this one (auto: one per core; default 1)",
    )  # fmt: skip
    predict = sub.add_parser("predict", help="send one request and print its reply as JSON")
    predict.add_argument("--model", required=True)
    predict.add_argument("--version", default=None)
    given = predict.add_mutually_exclusive_group(required=True)
    given.add_argument("--input", help="KServe V2 JSON file with 'inputs'")
    given.add_argument(
        "--text", action="append", help="a string for a text model (repeat for several rows)"
    )
    predict.add_argument(
        "--text-input", default="text", help="the text model's input name (default: text)"
    )
    predict.add_argument(
        "--json", action="store_true", help="with --text: print the whole reply as JSON"
    )
    predict.add_argument("--timeout", type=_positive(float), default=30.0)
    demo = sub.add_parser("demo", help="send the digits test split; print accuracy and requests/s")
    demo.add_argument(
        "--limit", type=_positive(int), default=None, help="send only the first N images"
    )
    demo.add_argument("--timeout", type=_positive(float), default=60.0)
    demo.add_argument(
        "--min-accuracy", type=float, default=0.95, help="exit 1 if accuracy is below this"
    )
    sub.add_parser(
        "echo", help="copy requests to replies unchanged (the benchmark's transport limit)"
    )
    sub.add_parser(
        "plain", help="serve at batch size 1 in a plain aiokafka loop (a benchmark reference)"
    )
    from worker.bench import add_arguments  # noqa: PLC0415 - argparse only, no heavy imports

    add_arguments(sub.add_parser("bench", help="measure throughput and latency through Kafka"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except WorkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log)
    commands: dict[str, Callable[[], Coroutine[Any, Any, int | None]]] = {
        "serve": lambda: (
            _serve(settings) if args.processes == 1 else _serve_processes(settings, args.processes)
        ),
        "echo": lambda: _reference(settings, "echo"),
        "plain": lambda: _reference(settings, "plain"),
        "predict": lambda: _until_signal(_predict(settings, args)),
        "demo": lambda: _until_signal(_demo(settings, args)),
        "bench": lambda: _bench(settings, args),
    }
    try:
        return asyncio.run(commands[args.command]()) or 0
    except (WorkerError, KafkaError, BaseExceptionGroup) as exc:
        errors = _leaves(exc)
        if not all(isinstance(e, WorkerError | KafkaError) for e in errors):
            raise
        for error in errors:
            hint = ""
            if isinstance(error, KafkaConnectionError) or (
                isinstance(error, ConnectError) and error.retriable
            ):
                hint = (
                    f" (is a broker running at {settings.kafka.bootstrap_servers}? "
                    "WORKER_KAFKA__BOOTSTRAP_SERVERS names it; `make kafka` starts a local one)"
                )
            print(f"error: {error}{hint}", file=sys.stderr)
        hard = [e for e in errors if isinstance(e, WorkerError) and e.hard_exit]
        if hard:
            sys.stderr.flush()
            # A model call may be stuck in a thread; an orderly exit would wait on it forever.
            os._exit(max(e.exit_code for e in hard))
        if args.command == "serve":  # its supervisor reads the status (ConfigError: 2)
            return max(e.exit_code if isinstance(e, WorkerError) else 1 for e in errors)
        return 1


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups raised by task groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
