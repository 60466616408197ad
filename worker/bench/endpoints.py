"""Load over the worker's REST and gRPC endpoints (``bench --target http|grpc``).

Closed loop (at most ``concurrency`` calls waiting) or open loop (``rate`` calls per second),
the same request payloads as the Kafka load; latency is each call's round trip. Batch sizes
and compute times come from the responses' parameters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from worker.bench.load import BenchResult, numeric_rows
from worker.bench.targets import input_of
from worker.errors import WorkerError

__all__ = ["Call", "drive_endpoint", "open_call"]

Call = Callable[[int], Awaitable[dict[str, Any]]]
"""Send request ``i``; its response parameters (``batch_size``, ``compute_us``, errors)."""


@contextlib.asynccontextmanager
async def _grpc(port: int, model: str, rows: int, count: int) -> AsyncIterator[Call]:
    import grpc  # noqa: PLC0415

    from worker.oip import pb, pb_grpc  # noqa: PLC0415

    name, _ = input_of(model)
    arrays = numeric_rows(model, count, rows)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]

        async def call(i: int) -> dict[str, Any]:
            array = arrays[i % count]
            tensor = pb.ModelInferRequest.InferInputTensor(
                name=name, datatype="FP32", shape=list(array.shape)
            )
            message = pb.ModelInferRequest(model_name=model, inputs=[tensor],
                                           raw_input_contents=[array.tobytes()])  # fmt: skip
            try:
                reply = await stub.ModelInfer(message)
            except grpc.aio.AioRpcError as exc:
                return {"error_code": exc.code().name}
            return {k: v.int64_param for k, v in reply.parameters.items()}

        await _until_ready(lambda: call(0))
        yield call


@contextlib.asynccontextmanager
async def _http(port: int, model: str, rows: int, count: int) -> AsyncIterator[Call]:
    import aiohttp  # noqa: PLC0415

    name, _ = input_of(model)
    tensors = [
        {"name": name, "datatype": "FP32", "shape": list(a.shape), "data": a.ravel().tolist()}
        for a in numeric_rows(model, count, rows)
    ]
    bodies = [json.dumps({"inputs": [t]}).encode() for t in tensors]
    url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call(i: int) -> dict[str, Any]:
            async with session.post(url, data=bodies[i % count]) as response:
                body = await response.json(content_type=None)
            params: dict[str, Any] = body.get("parameters", {})
            if response.status != 200:  # noqa: PLR2004
                params["error_code"] = str(response.status)
            return params

        await _until_ready(lambda: call(0))
        yield call


def open_call(
    kind: str, port: int, model: str, rows: int, count: int
) -> contextlib.AbstractAsyncContextManager[Call]:
    """A ``call(i)`` over ``kind`` (``grpc`` or ``http``), ``count`` distinct inputs cycled."""
    return (_grpc if kind == "grpc" else _http)(port, model, rows, count)


async def _until_ready(call: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """One request first, retried while the worker starts (off the clock)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            if "error_code" not in await call():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise WorkerError("the endpoint did not answer within 120 s")
        await asyncio.sleep(0.2)


async def drive_endpoint(
    kind: str, port: int, *, label: str, mode: str, model: str, requests: int, rows: int,
    concurrency: int, rate: float, progress: Any = None,
) -> BenchResult:  # fmt: skip
    """Send the load over ``kind`` (``grpc`` or ``http``) and time every call."""
    latencies: list[float] = []
    params: list[dict[str, Any]] = []
    async with open_call(kind, port, model, rows, requests) as call:
        gate = asyncio.Semaphore(min(concurrency, 512))

        async def one(i: int) -> None:
            async with gate:
                sent = time.perf_counter()
                answer = await call(i)
                latencies.append((time.perf_counter() - sent) * 1000)
                params.append(answer)
                if progress:
                    progress(len(latencies))

        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for i in range(requests):
                if mode == "open":
                    due = started + i / rate
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
                group.create_task(one(i))
        seconds = time.perf_counter() - started
    result = BenchResult(label, mode, requests, seconds, 0, latencies, [], [])
    for answer in params:
        result.responses += 1
        if "error_code" in answer:
            result.errors += 1
        if "batch_size" in answer:
            result.batch_sizes.append(int(answer["batch_size"]))
            result.compute_ms.append(int(answer["compute_us"]) / 1000)
            result.queue_ms.append(int(answer["queue_us"]) / 1000)
    return result
