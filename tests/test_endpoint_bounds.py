"""What a REST or gRPC caller can make the worker hold is bounded, and checked before it is read.

Issue #22, findings 5, 6 and 8: bodies and messages bounded by ``max_request_bytes`` and refused
before they are read; a place of the in-flight bound taken before the body is read and held
until the answer is produced (not until the caller leaves); connections and calls bounded;
large bodies decoded, and large replies written, without holding the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import grpc
import numpy as np
import numpy.typing as npt
import pytest

from worker import connections, rest_requests
from worker import direct as direct_module
from worker import rest as rest_module
from worker.model import LoadedModel
from worker.oip import pb
from worker.repository import ModelRepository
from worker.settings import GrpcSettings, RestSettings, RuntimeSettings, Settings, load_settings

from .conftest import changed, wait_for
from .test_endpoints import infer_message, rest, serving, stub, v2_body, with_endpoints

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]
INFER = "/v2/models/digits/infer"
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


def with_byte_bound(settings: Settings, max_bytes: int, **runtime: Any) -> Settings:
    """Endpoints on; the runtime's byte bound ``max_bytes``, the endpoints' derived from it."""
    settings = with_endpoints(settings, max_request_bytes=None)
    fields = {name: getattr(settings, name) for name in Settings.model_fields}
    fields["runtime"] = changed(settings, "runtime", max_request_bytes=max_bytes, **runtime).runtime
    return Settings(**fields)


@contextlib.contextmanager
def blocked_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Every batch waits for the event before it runs (set on exit, whatever happened)."""
    gate = threading.Event()
    real = LoadedModel.upload

    def upload(self: LoadedModel, inputs: Any) -> Any:
        gate.wait(60)
        return real(self, inputs)

    monkeypatch.setattr(LoadedModel, "upload", upload)
    try:
        yield gate
    finally:
        gate.set()


async def raw_http(
    port: int, head: str, body: bytes = b"", *, timeout: float = 5
) -> tuple[int, Any]:
    """Send ``head`` (and ``body``, maybe partial) on a new connection: status and JSON back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + body)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await read_answer(reader)
    finally:
        writer.close()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, Any]:
    """One HTTP/1.1 answer with a Content-Length: its status and JSON body."""
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, json.loads(await reader.readexactly(length)) if length else None


def post_head(length: int, *extra: str) -> str:
    """The head of an infer POST whose body is ``length`` bytes."""
    lines = [f"POST {INFER} HTTP/1.1", "Host: worker", "Content-Type: application/json",
             f"Content-Length: {length}", *extra]  # fmt: skip
    return "\n".join(lines) + "\n\n"


@contextlib.asynccontextmanager
async def loop_stalls() -> AsyncIterator[list[float]]:
    """How late each 5 ms tick of the event loop came while open (measured, not waited on)."""
    late: list[float] = []

    async def tick() -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            late.append(time.perf_counter() - before - 0.005)

    ticker = asyncio.create_task(tick())
    try:
        yield late
    finally:
        ticker.cancel()


def test_the_endpoints_byte_bound_is_the_runtime_s_unless_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """WORKER_RUNTIME__MAX_REQUEST_BYTES bounds REST bodies and gRPC messages; each may say more."""
    for name in ("WORKER_RUNTIME__MAX_REQUEST_BYTES", "WORKER_REST__MAX_REQUEST_BYTES",
                 "WORKER_GRPC__MAX_REQUEST_BYTES"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    default = load_settings()
    assert default.rest.max_request_bytes == RuntimeSettings().max_request_bytes
    assert default.grpc.max_request_bytes == RuntimeSettings().max_request_bytes
    monkeypatch.setenv("WORKER_RUNTIME__MAX_REQUEST_BYTES", "1000")
    derived = load_settings()
    assert (derived.rest.max_request_bytes, derived.grpc.max_request_bytes) == (1000, 1000)
    monkeypatch.setenv("WORKER_REST__MAX_REQUEST_BYTES", "5000")
    own = load_settings()
    assert (own.rest.max_request_bytes, own.grpc.max_request_bytes) == (5000, 1000)
    assert RestSettings(max_connections=1).max_connections == 1
    assert GrpcSettings(max_concurrent_rpcs=1).max_concurrent_rpcs == 1
    assert GrpcSettings(max_request_bytes=1).max_request_bytes == 1
    for refused in ({"max_connections": 0}, {"max_request_bytes": 0}):
        with pytest.raises(ValueError, match="greater than or equal to 1"):
            RestSettings.model_validate(refused)
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        GrpcSettings(max_concurrent_rpcs=0)


@pytest.mark.kafka
async def test_a_body_or_message_over_the_byte_bound_is_refused_before_it_is_read(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """Bound 64 KiB: 413 on the Content-Length alone, on a growing or inflating body; gRPC too."""
    bound = 64 << 10
    pixels = testset[0]
    async with serving(with_byte_bound(settings, bound), repository) as worker:
        port, grpc_port = worker.rest_port, worker.grpc_port
        assert port is not None
        assert grpc_port is not None
        # Only the head is sent: the answer must not wait for a body.
        declared = await raw_http(port, post_head(bound + 1))
        bomb = gzip.compress(b" " * (4 << 20))  # 4 KiB that inflate to 4 MiB
        inflated = await raw_http(port, post_head(len(bomb), "Content-Encoding: gzip"), bomb)
        chunked = await raw_http(
            port, f"POST {INFER} HTTP/1.1\nHost: w\nTransfer-Encoding: chunked\n\n",
            b"".join(b"4000\r\n" + b" " * 0x4000 + b"\r\n" for _ in range(5)),
        )  # fmt: skip
        fits = await rest(port, INFER, v2_body(pixels[:10]))
        async with stub(grpc_port) as service:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await service.ModelInfer(infer_message(pixels[:300].copy(), "big"))  # 76,800 B
            small = await service.ModelInfer(infer_message(pixels[:200].copy(), "small"))
    assert declared[0] == 413
    assert f"is {bound + 1} bytes; this endpoint reads at most {bound}" in declared[1]["error"]
    assert inflated[0] == 413, "the bound holds for the body as decompressed"
    assert "is larger (once decompressed)" in inflated[1]["error"], "not the compressed size"
    assert chunked[0] == 413, "a body without a length is cut off past the bound"
    assert fits[0] == 200
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (caught.value.details() or ""), "grpcio's own refusal"
    assert len(small.outputs) == 2
    assert worker.settings.rest.max_request_bytes == bound, "derived from the runtime's"


@pytest.mark.kafka
async def test_with_no_place_in_flight_a_request_is_refused_before_its_body_is_read(
    settings: Settings, repository: ModelRepository, testset: TestSet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """max_in_flight=1, held: 429 to a head whose body never comes; gRPC's message is not parsed."""
    settings = changed(with_endpoints(settings), "runtime", max_in_flight=1)
    pixels = testset[0][:1]
    with blocked_model(monkeypatch) as gate:
        async with serving(settings, repository) as worker:
            port, grpc_port = worker.rest_port, worker.grpc_port
            assert port is not None
            assert grpc_port is not None
            held = asyncio.create_task(rest(port, INFER, v2_body(pixels)))
            await wait_for(lambda: worker.direct_in_flight == 1, timeout=30, what="one held")
            refused = await raw_http(port, post_head(1000))  # and no body
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                garbage = channel.unary_unary(GRPC_INFER)  # bytes as they are: not a message
                with pytest.raises(grpc.aio.AioRpcError) as full:
                    await garbage(b"\xff\xff\xff", timeout=5)
                gate.set()
                assert (await held)[0] == 200
                await wait_for(lambda: worker.direct_in_flight == 0, timeout=30, what="answered")
                with pytest.raises(grpc.aio.AioRpcError) as room:
                    await garbage(b"\xff\xff\xff", timeout=5)
    assert refused[0] == 429
    assert "WORKER_RUNTIME__MAX_IN_FLIGHT" in refused[1]["error"]
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert room.value.code() != grpc.StatusCode.RESOURCE_EXHAUSTED, "with room it is parsed"


@pytest.mark.kafka
async def test_callers_that_give_up_leave_their_place_until_their_job_is_answered(
    settings: Settings, repository: ModelRepository, testset: TestSet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """max_in_flight=2, model blocked: a REST and a gRPC caller time out; a third is still 429."""
    monkeypatch.setattr(direct_module, "GRACE_S", 0.0)
    settings = changed(with_endpoints(settings), "runtime", max_in_flight=2)
    pixels = testset[0][:1]
    with blocked_model(monkeypatch) as gate:
        async with serving(settings, repository) as worker:
            port, grpc_port = worker.rest_port, worker.grpc_port
            assert port is not None
            assert grpc_port is not None
            async with stub(grpc_port) as service:
                with pytest.raises(grpc.aio.AioRpcError) as cancelled:
                    await service.ModelInfer(infer_message(pixels, "g"), timeout=0.5)
            late = await rest(port, INFER, v2_body(pixels), {"Request-Timeout-Ms": "300"})
            holding = worker.direct_in_flight
            third = await asyncio.wait_for(
                rest(port, INFER, v2_body(pixels), {"Request-Timeout-Ms": "300"}), 10
            )
            async with stub(grpc_port) as service:
                with pytest.raises(grpc.aio.AioRpcError) as third_grpc:
                    await service.ModelInfer(infer_message(pixels, "g3"), timeout=10)
            gate.set()
            await wait_for(lambda: worker.direct_in_flight == 0, timeout=30, what="places back")
            after = await rest(port, INFER, v2_body(pixels))
    assert cancelled.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert late[0] == 504
    assert holding == 2, "both jobs still wait in the lanes"
    assert third[0] == 429
    assert third_grpc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert after[0] == 200


@pytest.mark.kafka
async def test_rest_connections_and_grpc_calls_are_bounded(
    settings: Settings, repository: ModelRepository, testset: TestSet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """max_connections=2: a third connection gets 503 until one closes; max_concurrent_rpcs=1."""
    settings = changed(with_endpoints(settings), "rest", max_connections=2)
    settings = changed(settings, "grpc", max_concurrent_rpcs=1)
    live = "GET /v2/health/live HTTP/1.1\nHost: w\n\n"
    with blocked_model(monkeypatch) as gate:
        async with serving(settings, repository) as worker:
            port, grpc_port = worker.rest_port, worker.grpc_port
            assert port is not None
            assert grpc_port is not None
            first, second = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            for reader, writer in (first, second):  # both admitted, kept open
                writer.write(live.replace("\n", "\r\n").encode())
                assert (await asyncio.wait_for(read_answer(reader), 5))[0] == 200
            over = await raw_http(port, live)
            first[1].close()

            async def admitted() -> bool:
                return (await raw_http(port, live))[0] == 200

            await wait_for(admitted, timeout=10, what="a connection admitted again")
            second[1].close()
            async with stub(grpc_port) as service:
                held = service.ModelInfer(infer_message(testset[0][:1], "held"))
                await wait_for(lambda: worker.direct_in_flight == 1, timeout=30, what="one call")
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await service.ModelInfer(infer_message(testset[0][:1], "more"), timeout=10)
                gate.set()
                await held
    assert over[0] == 503
    assert "WORKER_REST__MAX_CONNECTIONS" in over[1]["error"]
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.kafka
async def test_large_bodies_are_decoded_without_holding_the_event_loop(
    settings: Settings,
    repository: ModelRepository,
    testset: TestSet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """4 MiB of empty strings (1.4 M values) are decoded off the loop; big inputs still work."""
    decodes: list[tuple[int, float]] = []  # (thread, seconds) of each body decoded

    def timed(*args: Any) -> Any:
        started = time.perf_counter()
        try:
            return rest_requests.decode_body(*args)
        finally:
            decodes.append((threading.get_ident(), time.perf_counter() - started))

    monkeypatch.setattr(rest_module, "decode_body", timed)
    pixels = testset[0][:300]
    want = repository.route("digits", "1", "").primary.predict({"pixels": pixels})["label"]
    count = (4 << 20) // 3 - 100
    strings = {"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [count],
                           "data": [""] * count}]}  # fmt: skip
    body = json.dumps(strings, separators=(",", ":")).encode()
    async with serving(with_endpoints(settings), repository) as worker:
        port, grpc_port = worker.rest_port, worker.grpc_port
        assert port is not None
        assert grpc_port is not None
        async with loop_stalls() as late:
            status, _ = await rest(port, INFER, body)
        numbers = await rest(port, "/v2/models/digits/versions/1/infer", v2_body(pixels))
        typed = pb.ModelInferRequest(model_name="digits", model_version="1", inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="pixels", datatype="FP32", shape=[200, 64],
                contents=pb.InferTensorContents(fp32_contents=pixels[:200].ravel().tolist()),
            )])  # fmt: skip
        async with stub(grpc_port) as service:
            reply = await service.ModelInfer(typed)
    assert status == 429, "decoded, then refused: 5.6 MB of length-prefixed strings"
    thread, decode_s = decodes[0]
    assert thread != threading.get_ident(), "a body over DECODE_ON_LOOP_BYTES is decoded off it"
    # The parse holds the GIL (json.loads, ~0.1 s of the ~0.8 s the decode takes here): a
    # busy machine stretches that stall with the rest, so the bound is relative beyond 0.5 s.
    bound = max(0.5, 0.75 * decode_s)
    assert max(late) < bound, f"the event loop stalled {max(late):.2f} s ({decode_s:.2f} s decode)"
    assert numbers[0] == 200
    assert numbers[1]["outputs"][1]["data"] == want.tolist()
    assert np.frombuffer(reply.raw_output_contents[1], np.int64).tolist() == want[:200].tolist()


@pytest.mark.kafka
async def test_a_large_json_reply_is_written_without_holding_the_event_loop(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """60,000 rows in binary, 660,000 values back as JSON: no long stall, the same bytes."""
    rows = np.resize(testset[0], (60_000, 64)).astype(np.float32)
    tensor = {"name": "pixels", "datatype": "FP32", "shape": [60_000, 64],
              "parameters": {"binary_data_size": rows.nbytes}}  # fmt: skip
    header = json.dumps({"inputs": [tensor]})
    settings = with_byte_bound(settings, 32 << 20, max_request_elements=8_000_000)
    path = "/v2/models/digits/versions/1/infer"
    async with serving(settings, repository) as worker:
        assert worker.rest_port is not None
        url = f"http://127.0.0.1:{worker.rest_port}{path}"
        split = {"Inference-Header-Content-Length": str(len(header))}
        async with (
            aiohttp.ClientSession() as session,
            loop_stalls() as late,
            session.post(url, data=header.encode() + rows.tobytes(), headers=split) as response,
        ):
            status, raw = response.status, await response.read()
    assert status == 200
    assert max(late) < 0.3, f"the event loop stalled {max(late):.2f} s"
    body = json.loads(raw)  # after the measurement: the test's own parse is not the worker's
    assert len(body["outputs"][0]["data"]) == 600_000
    assert len(body["outputs"][1]["data"]) == 60_000


async def test_silent_and_trickling_connections_do_not_hold_the_connection_bound(
    settings: Settings, repository: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients that send nothing, or a byte now and then, are closed after IDLE_S; others get in.

    (Before, aiohttp kept such a connection for an hour: 256 of them locked REST out.)
    """
    monkeypatch.setattr(connections, "IDLE_S", 0.5)
    monkeypatch.setattr(connections, "IDLE_CHECK_S", 0.1)
    settings = changed(with_endpoints(settings), "rest", max_connections=2)
    live = "GET /v2/health/live HTTP/1.1\nHost: w\n\n"
    async with serving(settings, repository) as worker:
        port = worker.rest_port
        assert port is not None
        silent = await asyncio.open_connection("127.0.0.1", port)
        trickle = await asyncio.open_connection("127.0.0.1", port)
        assert (await raw_http(port, live))[0] == 503, "both places are held"

        async def dripping() -> None:
            for byte in b"GET /v2/health/live HTTP/1.1\r\n":
                trickle[1].write(bytes([byte]))
                await asyncio.sleep(0.1)

        async with asyncio.TaskGroup() as group:
            group.create_task(dripping())
            async with asyncio.timeout(10):
                assert await silent[0].read() == b"", "the silent one is closed"
                assert await trickle[0].read() == b"", "the trickling one is closed"

        async def admitted() -> bool:
            return (await raw_http(port, live))[0] == 200

        await wait_for(admitted, timeout=10, what="a connection admitted again")
    silent[1].close()
    trickle[1].close()


async def test_a_body_that_never_arrives_gives_its_place_back_after_the_body_timeout(
    settings: Settings, repository: ModelRepository
) -> None:
    """Headers, a huge Request-Timeout-Ms and no body: 408 after body_timeout_s, place back."""
    settings = changed(with_endpoints(settings), "rest", body_timeout_s=0.5)
    settings = changed(settings, "runtime", max_in_flight=1)
    head = (
        "POST /v2/models/digits/infer HTTP/1.1\r\nHost: w\r\nContent-Length: 100000\r\n"
        "Content-Type: application/json\r\nRequest-Timeout-Ms: 999999999999\r\n\r\n{"
    )
    async with serving(settings, repository) as worker:
        port = worker.rest_port
        assert port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head.encode())
        await writer.drain()
        await wait_for(lambda: worker.direct_in_flight == 1, timeout=10, what="its place taken")
        async with asyncio.timeout(10):
            status_line = await reader.readline()
        assert b" 408 " in status_line, status_line
        await wait_for(lambda: worker.direct_in_flight == 0, timeout=10, what="its place back")
        writer.close()
