"""REST and gRPC (Open Inference Protocol) endpoints, fed into the same lanes as Kafka.

Triton's own clients (tritonclient http and grpc) run in a child process
(tests/clients/triton.py: their Protobuf messages and the worker's share a package name);
the rest use aiohttp and a gRPC stub generated from the protocol's proto, in process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import numpy.typing as npt
import pytest

from worker.answering import RunAnswers
from worker.app import Worker
from worker.client import InferenceClient
from worker.errors import ConfigError
from worker.model import LoadedModel
from worker.oip import pb, pb_grpc
from worker.repository import ModelRepository
from worker.settings import Settings

from .conftest import ROOT, changed, running_worker, wait_for
from .pki import make_pki

pytestmark = pytest.mark.kafka

TestSet = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]
TOKEN = "token-for-tests"  # noqa: S105 - a test's own credential


def with_endpoints(settings: Settings, **extra: Any) -> Settings:
    """REST and gRPC on free loopback ports (and more endpoint settings)."""
    settings = changed(settings, "rest", enabled=True, host="127.0.0.1", port=0, **extra)
    return changed(settings, "grpc", enabled=True, host="127.0.0.1", port=0, **extra)


@contextlib.asynccontextmanager
async def serving(settings: Settings, repository: ModelRepository) -> AsyncIterator[Worker]:
    """A worker with its endpoints listening."""
    async with running_worker(settings, repository) as worker:
        await wait_for(
            lambda: worker.rest_port is not None and worker.grpc_port is not None,
            timeout=30, what="the endpoints",
        )  # fmt: skip
        yield worker


async def triton(kind: str, port: int, steps: list[dict[str, Any]], tmp: Path) -> list[Any]:
    """Run tritonclient (``http`` or ``grpc``) steps in a child process; their results."""
    script = tmp / f"{kind}.json"
    script.write_text(json.dumps({"steps": steps}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "tests" / "clients" / "triton.py"), kind,
        f"127.0.0.1:{port}", str(script), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    return list(json.loads(out))


def digits_steps(pixels: npt.NDArray[np.float32], *, binary: bool) -> list[dict[str, Any]]:
    """Health, metadata and one inference of ``pixels`` on digits v2."""
    infer = {"op": "infer", "model": "digits", "version": "2", "input": "pixels",
             "datatype": "FP32", "data": pixels.tolist(), "read": ["label", "probabilities"],
             "binary": binary, "outputs": ["label", "probabilities"]}  # fmt: skip
    return [
        {"op": "live"}, {"op": "ready"}, {"op": "model_ready", "model": "digits"},
        {"op": "server_metadata"}, {"op": "model_metadata", "model": "digits"}, infer,
        {"op": "model_ready", "model": "nope"},
    ]  # fmt: skip


async def test_tritonclient_http_and_grpc_get_metadata_readiness_and_kafka_s_predictions(
    settings: Settings, repository: ModelRepository, testset: TestSet, tmp_path: Path
) -> None:
    """Triton's clients (JSON and binary tensors, gRPC) predict what Kafka replies say."""
    pixels = testset[0][:8]
    async with (
        serving(with_endpoints(settings), repository) as worker,
        InferenceClient(settings.kafka) as client,
    ):
        assert worker.rest_port is not None
        assert worker.grpc_port is not None
        kafka = await client.infer("digits", {"pixels": pixels}, version="2", timeout=60)
        runs = {
            "http-json": await triton("http", worker.rest_port,
                                      digits_steps(pixels, binary=False), tmp_path),
            "http-binary": await triton("http", worker.rest_port,
                                        digits_steps(pixels, binary=True), tmp_path),
            "grpc": await triton("grpc", worker.grpc_port,
                                 digits_steps(pixels, binary=True), tmp_path),
        }  # fmt: skip
        answered = {
            kind: worker.metrics.value("inference_transport_requests_total",
                                       transport=kind, outcome="ok")
            for kind in ("kafka", "rest", "grpc")
        }  # fmt: skip
    labels = kafka.output("label").tolist()
    for name, steps in runs.items():
        assert all(step["ok"] for step in steps), (name, steps)
        live, ready, model_ready, server, meta, infer, unknown_ready = (s["result"] for s in steps)
        assert (live, ready, model_ready, unknown_ready) == (True, True, True, False), name
        assert server["name"] == "kafka-inference-worker"
        assert "binary_tensor_data" in server["extensions"]
        assert meta["name"] == "digits"
        assert meta["versions"] == ["1", "2"]
        assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
        assert [o["name"] for o in meta["outputs"]] == ["probabilities", "label"]
        assert infer["label"] == labels, name
        np.testing.assert_allclose(infer["probabilities"], kafka.output("probabilities"),
                                   rtol=1e-6)  # fmt: skip
    assert answered == {"kafka": 1, "rest": 2, "grpc": 1}


@contextlib.asynccontextmanager
async def stub(port: int, **options: Any) -> AsyncIterator[Any]:
    """A gRPC stub of the service, generated from the protocol's proto."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", **options) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def infer_message(pixels: npt.NDArray[np.float32], request_id: str, model: str = "digits") -> Any:
    """A ModelInferRequest for digits v1 (raw contents)."""
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="pixels", datatype="FP32", shape=list(pixels.shape)
    )
    return pb.ModelInferRequest(model_name=model, model_version="1", id=request_id,
                                inputs=[tensor], raw_input_contents=[pixels.tobytes()])  # fmt: skip


def patient(repo_dir: Path) -> ModelRepository:
    """The models, digits waiting 1.5 s for a batch to fill (so a burst makes one batch)."""
    config = repo_dir / "digits" / "config.toml"
    config.write_text(config.read_text().replace("max_batch_delay_ms = 5.0",
                                                 "max_batch_delay_ms = 1500.0"))  # fmt: skip
    return ModelRepository.load(repo_dir)


async def test_a_mixed_burst_of_kafka_and_grpc_requests_batches_together(
    settings: Settings, repository: ModelRepository, repo_dir: Path, testset: TestSet
) -> None:
    """Six Kafka and six gRPC requests at once: one batch of twelve, each answered rightly."""
    settings = changed(with_endpoints(settings), "batching", start_when_idle=False)
    pixels = testset[0][:12]
    want = repository.route("digits", "1", "").primary.predict({"pixels": pixels})["label"]
    async with (
        serving(settings, patient(repo_dir)) as worker,
        InferenceClient(settings.kafka) as client,
    ):
        assert worker.grpc_port is not None
        async with stub(worker.grpc_port) as service:
            kafka, grpc_replies = await asyncio.gather(
                asyncio.gather(*(client.infer("digits", {"pixels": pixels[i : i + 1]},
                                              version="1", timeout=60) for i in range(6))),
                asyncio.gather(*(service.ModelInfer(infer_message(pixels[i : i + 1], f"g{i}"))
                                 for i in range(6, 12))),
            )  # fmt: skip
    for i, reply in enumerate(kafka):
        assert reply.output("label")[0] == want[i]
        assert reply.timing is not None
        assert reply.timing.batch_size == 12
    for i, message in enumerate(grpc_replies, start=6):
        assert message.id == f"g{i}"
        assert np.frombuffer(message.raw_output_contents[1], np.int64)[0] == want[i]
        assert message.parameters["batch_size"].int64_param == 12


async def rest(
    port: int, path: str, body: Any = None, headers: dict[str, str] | None = None, *,
    ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1",
) -> tuple[int, Any]:  # fmt: skip
    """One REST call: status and JSON body."""
    scheme = "https" if ssl_context else "http"
    async with aiohttp.ClientSession() as session:
        method = session.post if body is not None else session.get
        kwargs: dict[str, Any] = {"headers": headers or {}}
        if body is not None:
            kwargs["data"] = body if isinstance(body, bytes) else json.dumps(body)
        if ssl_context is not None:
            kwargs["ssl"] = ssl_context
        async with method(f"{scheme}://{host}:{port}{path}", **kwargs) as response:
            return response.status, await response.json(content_type=None)


def v2_body(pixels: npt.NDArray[np.float32]) -> dict[str, Any]:
    """A REST infer body."""
    return {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(pixels.shape),
                        "data": pixels.ravel().tolist()}]}  # fmt: skip


async def test_errors_map_to_http_statuses_and_grpc_codes_and_deadlines_hold(
    settings: Settings, repo_dir: Path, testset: TestSet
) -> None:
    """404/NOT_FOUND, 400/INVALID_ARGUMENT, 504/DEADLINE_EXCEEDED; the message says why."""
    settings = changed(with_endpoints(settings), "batching", start_when_idle=False)
    pixels = testset[0][:1]
    async with serving(settings, patient(repo_dir)) as worker:
        port, grpc_port = worker.rest_port, worker.grpc_port
        assert port is not None
        assert grpc_port is not None
        unknown = await rest(port, "/v2/models/nope/infer", v2_body(pixels))
        shape = await rest(port, "/v2/models/digits/infer", v2_body(pixels[:, :10]))
        garbage = await rest(port, "/v2/models/digits/infer", b"{not json")
        late = await rest(port, "/v2/models/digits/infer", v2_body(pixels),
                          {"Request-Timeout-Ms": "100"})  # fmt: skip
        missing_meta = await rest(port, "/v2/models/nope")
        split = [
            (await rest(port, "/v2/models/digits/infer", b"{}",
                        {"Inference-Header-Content-Length": length}))[0]
            for length in ("abc", "-5", "999999")
        ]  # fmt: skip
        async with stub(grpc_port) as service:
            codes = []
            for message in (infer_message(pixels, "a", model="nope"),
                            infer_message(pixels[:, :10], "b")):  # fmt: skip
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await service.ModelInfer(message)
                codes.append((caught.value.code(), caught.value.details()))
    assert unknown[0] == 404
    assert "no model named 'nope'" in unknown[1]["error"]
    assert shape[0] == 400
    assert "has shape [1, 10]" in shape[1]["error"]
    assert garbage[0] == 400
    assert "not JSON" in garbage[1]["error"]
    assert late[0] == 504
    assert "deadline" in late[1]["error"]
    assert missing_meta[0] == 404
    assert split == [400, 400, 400], "a header length outside the body is refused"
    assert codes[0][0] == grpc.StatusCode.NOT_FOUND
    assert codes[1][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "has shape [1, 10]" in codes[1][1]


async def test_over_the_in_flight_bound_requests_are_refused_not_queued(
    settings: Settings, repository: ModelRepository, testset: TestSet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """max_in_flight=2, the model stuck: a third request is 429 / RESOURCE_EXHAUSTED at once."""
    settings = changed(with_endpoints(settings), "runtime", max_in_flight=2)
    stuck = threading.Event()
    real = LoadedModel.upload

    def upload(self: LoadedModel, inputs: Any) -> Any:
        stuck.wait(60)
        return real(self, inputs)

    monkeypatch.setattr(LoadedModel, "upload", upload)
    pixels = testset[0][:1]
    try:
        async with serving(settings, repository) as worker:
            port, grpc_port = worker.rest_port, worker.grpc_port
            assert port is not None
            assert grpc_port is not None
            held = [asyncio.create_task(rest(port, "/v2/models/digits/infer", v2_body(pixels)))
                    for _ in range(2)]  # fmt: skip
            await wait_for(lambda: worker.direct_in_flight == 2, timeout=30, what="two held")
            refused = await asyncio.wait_for(
                rest(port, "/v2/models/digits/infer", v2_body(pixels)), 5
            )
            async with stub(grpc_port) as service:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await asyncio.wait_for(service.ModelInfer(infer_message(pixels, "x")), 5)
            stuck.set()
            done = await asyncio.gather(*held)
    finally:
        stuck.set()
    assert refused[0] == 429
    assert "WORKER_RUNTIME__MAX_IN_FLIGHT" in refused[1]["error"]
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [status for status, _ in done] == [200, 200]


async def test_tls_client_certificates_and_bearer_tokens_guard_both_endpoints(
    settings: Settings, repository: ModelRepository, testset: TestSet, tmp_path: Path
) -> None:
    """TLS with client certificates and a token: callers without them are refused."""
    pki = make_pki(tmp_path / "pki")
    settings = with_endpoints(
        settings, cert_file=pki.broker_cert, key_file=pki.broker_key, client_ca_file=pki.ca,
        token=TOKEN,
    )  # fmt: skip
    trusted = ssl.create_default_context(cafile=str(pki.ca))
    trusted.load_cert_chain(pki.client_cert, pki.client_key)
    anonymous = ssl.create_default_context(cafile=str(pki.ca))
    pixels = testset[0][:1]
    good = {"Authorization": f"Bearer {TOKEN}"}
    async with serving(settings, repository) as worker:
        port, grpc_port = worker.rest_port, worker.grpc_port
        assert port is not None
        assert grpc_port is not None
        path = "/v2/models/digits/infer"
        tls = {"ssl_context": trusted, "host": "localhost"}
        ok = await rest(port, path, v2_body(pixels), good, **tls)  # type: ignore[arg-type]
        no_token = await rest(port, path, v2_body(pixels), None, **tls)  # type: ignore[arg-type]
        health = await rest(port, "/v2/health/live", None, None, **tls)  # type: ignore[arg-type]
        with pytest.raises(aiohttp.ClientError):
            await rest(port, path, v2_body(pixels), good, ssl_context=anonymous, host="localhost")
        credentials = grpc.ssl_channel_credentials(
            pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
        )
        async with grpc.aio.secure_channel(f"localhost:{grpc_port}", credentials) as channel:
            service = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            bearer = (("authorization", f"Bearer {TOKEN}"),)
            answer = await service.ModelInfer(infer_message(pixels, "t"), metadata=bearer)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await service.ModelInfer(infer_message(pixels, "u"))
            live = await service.ServerLive(pb.ServerLiveRequest())
    assert ok[0] == 200
    assert no_token[0] == 401
    assert health == (200, {"live": True})
    assert answer.id == "t"
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert live.live


async def test_a_worker_without_kafka_serves_rest_and_grpc(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """WORKER_KAFKA__ENABLED=false: no topics, no group; REST and gRPC answer; ready."""
    settings = changed(with_endpoints(settings), "kafka", enabled=False,
                       bootstrap_servers="127.0.0.1:1")  # fmt: skip
    pixels = testset[0][:2]
    want = repository.route("digits", "1", "").primary.predict({"pixels": pixels})["label"]
    worker = Worker(settings, repository)
    async with asyncio.TaskGroup() as group:
        task = group.create_task(worker.run())
        await wait_for(lambda: worker.rest_port is not None or task.done(), timeout=30,
                       what="the REST endpoint")  # fmt: skip
        port, grpc_port = worker.rest_port, worker.grpc_port
        assert port is not None
        assert grpc_port is not None
        status, body = await rest(port, "/v2/models/digits/versions/1/infer", v2_body(pixels))
        async with stub(grpc_port) as service:
            answer = await service.ModelInfer(infer_message(pixels, "k"))
        ready = worker.ready()
        worker.stop()
    assert status == 200
    assert body["outputs"][1]["data"] == want.tolist()
    assert np.frombuffer(answer.raw_output_contents[1], np.int64).tolist() == want.tolist()
    assert ready[0]
    assert ready[1].startswith("ok: REST/gRPC only")


async def test_two_workers_share_the_rest_and_grpc_ports_only_with_reuse_port(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """reuse_port (process mode's children): a second worker serves on the first's ports."""
    base = changed(with_endpoints(settings, reuse_port=True), "kafka", enabled=False,
                   bootstrap_servers="127.0.0.1:1")  # fmt: skip
    base = changed(base, "http", enabled=False)
    first = Worker(base, repository)
    async with asyncio.TaskGroup() as group:
        group.create_task(first.run())
        await wait_for(lambda: first.rest_port is not None and first.grpc_port is not None,
                       timeout=30, what="the first worker's endpoints")  # fmt: skip
        shared = changed(changed(base, "rest", port=first.rest_port), "grpc", port=first.grpc_port)
        second = Worker(shared, repository)
        running = group.create_task(second.run())
        await wait_for(lambda: second.grpc_port is not None or running.done(), timeout=30,
                       what="the second worker's endpoints")  # fmt: skip
        assert (second.rest_port, second.grpc_port) == (first.rest_port, first.grpc_port)
        assert first.rest_port is not None
        path, body = "/v2/models/digits/versions/1/infer", v2_body(testset[0][:1])
        # A new connection each: the kernel spreads them (1 in 2**23 that one worker gets all).
        statuses = [(await rest(first.rest_port, path, body))[0] for _ in range(24)]
        refusals = []
        for endpoint in ("rest", "grpc"):  # either alone on a shared port: a clear error
            alone = changed(shared, endpoint, reuse_port=False)
            with pytest.raises(ExceptionGroup) as refused:
                await Worker(alone, repository).run()
            refusals.append(refused.value.exceptions)
        first.stop()
        second.stop()
    assert statuses == [200] * 24
    served = [w.metrics.value("inference_transport_requests_total", transport="rest",
                              outcome="ok") for w in (first, second)]  # fmt: skip
    assert sum(served) == 24
    assert min(served) > 0, f"both workers answer on the shared port: {served}"
    for (error,), name in zip(refusals, ("REST", "gRPC"), strict=True):
        assert isinstance(error, ConfigError)
        assert f"the {name} endpoint cannot listen on 127.0.0.1:" in str(error)


async def test_trace_context_continues_over_rest_and_grpc(
    settings: Settings, repository: ModelRepository, testset: TestSet
) -> None:
    """A caller's traceparent comes back with its trace id and the worker's own span id."""
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = f"00-{trace_id}-00f067aa0ba902b7-01"
    pixels = testset[0][:1]
    async with serving(with_endpoints(settings), repository) as worker:
        assert worker.rest_port is not None
        assert worker.grpc_port is not None
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://127.0.0.1:{worker.rest_port}/v2/models/digits/infer",
                         data=json.dumps(v2_body(pixels)),
                         headers={"traceparent": parent}) as response,
        ):  # fmt: skip
            rest_trace = response.headers.get("traceparent", "")
            assert response.status == 200
        async with stub(worker.grpc_port) as service:
            call = service.ModelInfer(infer_message(pixels, "tr"),
                                      metadata=(("traceparent", parent),))  # fmt: skip
            await call
            trailing = dict(await call.trailing_metadata())
    for returned in (rest_trace, trailing.get("traceparent", "")):
        assert returned.split("-")[1] == trace_id
        assert returned.split("-")[2] != "00f067aa0ba902b7", "the worker's own span"


async def test_a_grpc_deadline_becomes_the_request_s_deadline(
    settings: Settings, repo_dir: Path, testset: TestSet
) -> None:
    """A call with 0.3 s left, its batch due in 1.5 s: answered DEADLINE_EXCEEDED, not run."""
    settings = changed(with_endpoints(settings), "batching", start_when_idle=False)
    async with serving(settings, patient(repo_dir)) as worker:
        assert worker.grpc_port is not None
        async with stub(worker.grpc_port) as service:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await service.ModelInfer(infer_message(testset[0][:1], "late"), timeout=0.3)

        def expired() -> bool:
            value = worker.metrics.value("inference_transport_requests_total",
                                         transport="grpc", outcome="DEADLINE_EXCEEDED")  # fmt: skip
            return value == 1

        await wait_for(expired, timeout=30, what="the worker's own deadline answer")
        computed = worker.metrics.value("inference_batch_size_count", model="digits", version="1")
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert computed == 0, "the model never ran for it"


async def test_a_direct_request_whose_batch_cannot_be_answered_gets_an_internal_error(
    settings: Settings, repository: ModelRepository, testset: TestSet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A bug building a batch's replies: the REST caller gets 500 at once, not a timeout."""

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug while answering")

    monkeypatch.setattr(RunAnswers, "_answer", broken)
    async with serving(with_endpoints(settings), repository) as worker:
        assert worker.rest_port is not None
        status, body = await asyncio.wait_for(
            rest(worker.rest_port, "/v2/models/digits/infer", v2_body(testset[0][:1])), 20
        )
    assert status == 500
    assert "failed at stage BATCH" in body["error"]
