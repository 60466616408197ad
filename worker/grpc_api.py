"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService``.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer, served by
grpcio's asyncio server in the worker's event loop (``WORKER_GRPC__PORT``, default 8001,
Triton's). The servicer is the one generated from the protocol's proto (:mod:`worker.oip`).
ModelInfer takes typed contents or ``raw_input_contents`` and answers with
``raw_output_contents``, as Triton does; it goes through :mod:`worker.direct` (the same lanes,
batches, routing and errors as Kafka), with the call's deadline as the request's. Errors end
the call with the gRPC status of the same name as the error code. Trace context comes from
the ``traceparent`` metadata. Optional TLS (mutual with a client CA) and a bearer token in the
``authorization`` metadata (health calls excepted).

Bounds: at most ``max_concurrent_rpcs`` calls at once (grpcio refuses one more with
RESOURCE_EXHAUSTED before reading it); a ModelInfer that finds no place in flight is refused
RESOURCE_EXHAUSTED before its message is read or parsed; a message over ``max_request_bytes``
(by default the runtime's) is refused RESOURCE_EXHAUSTED by grpcio from its length prefix. A
message with more than :data:`DECODE_ON_LOOP_VALUES` typed values is turned into tensors in
the endpoint's codec thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from worker.direct import Direct
from worker.domain import InferenceRequest
from worker.endpoint_settings import EndpointSettings, GrpcSettings
from worker.endpoints import (
    EXTENSIONS,
    SERVER_NAME,
    V2Api,
    model_metadata,
    request_bytes,
    warn_if_open,
)
from worker.errors import ConfigError, DecodeError, detached, shown
from worker.headers import Headers
from worker.oip import pb, pb_grpc
from worker.v2proto import request_from_message, response_message

__all__ = ["decode_message", "serve_grpc"]

PASSED_METADATA = ("traceparent", "tracestate", "correlation_id")
OPEN_METHODS = ("ServerLive", "ServerReady")
"""Health calls, answered without a token."""
INFER_METHOD = "ModelInfer"
DECODE_ON_LOOP_VALUES = 8192
"""Requests with up to this many typed values become tensors on the event loop (a few
milliseconds at most); larger ones in the endpoint's codec thread. Raw contents are bytes,
cheap to take at any size."""


class _Service(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, api: V2Api, wait_s: float, codec: ThreadPoolExecutor) -> None:
        self._api = api
        self._wait_s = wait_s
        self._codec = codec

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self._api.ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:
        served = self._api.repository().serves(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=served and self._api.ready())

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self._api.version, extensions=EXTENSIONS
        )

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        try:
            meta = model_metadata(self._api.repository(), request.name, request.version or None)
        except KeyError:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"model {shown(request.name)} is not served"
            )
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )  # fmt: skip

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if k in PASSED_METADATA}
        headers = [(k, v.encode() if isinstance(v, str) else v) for k, v in metadata.items()]
        if _typed_values(request) <= DECODE_ON_LOOP_VALUES:
            decoded = decode_message(request, headers)
        else:
            decoded = await asyncio.get_running_loop().run_in_executor(
                self._codec, decode_message, request, headers
            )
        if isinstance(decoded, str):
            return await context.abort(grpc.StatusCode.INVALID_ARGUMENT, decoded)  # it raises
        remaining = context.time_remaining()
        answer = await self._api.direct.infer(
            "grpc", decoded, headers, timeout_s=remaining, wait_s=self._wait_s
        )
        response = answer.response
        trace = answer.header("traceparent")
        if trace is not None:  # the worker's span in the caller's trace
            context.set_trailing_metadata((("traceparent", trace),))
        if response.error is not None:
            code = getattr(grpc.StatusCode, response.error.code, grpc.StatusCode.UNKNOWN)
            await context.abort(code, response.error.message[:MAX_STATUS_CHARS])
        return response_message(response)


def decode_message(request: Any, headers: Headers) -> InferenceRequest | str:
    """A ModelInfer message as a request, or why it is not one (INVALID_ARGUMENT's message).

    Only the decode error's message is kept: no traceback, so no cycle through the frames that
    read the message is left for the collector.
    """
    try:
        return request_from_message(request, headers, None)
    except DecodeError as exc:
        return detached(exc).message


MAX_STATUS_CHARS = 4096
"""Longest status message of a failed call: gRPC carries it in trailing metadata, whose size
the client bounds (16 KiB by default); a longer one would turn into the client's own error."""


def _typed_values(request: Any) -> int:
    """How many typed values (``contents``) a ModelInferRequest carries; raw ones are bytes."""
    return sum(len(values) for t in request.inputs for _, values in t.contents.ListFields())


class _Room(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses ModelInfer while the in-flight bound is full, before its message is read."""

    def __init__(self, direct: Direct) -> None:
        self._direct = direct

        async def refuse(_: Any, context: Any) -> Any:
            if self._direct.closing:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the worker is stopping")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._direct.full_message)

        # A request-streaming handler: grpcio reads nothing before it runs, and it reads nothing.
        self._refuse = grpc.stream_unary_rpc_method_handler(refuse)

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        direct = self._direct
        full = direct.closing or direct.room() <= 0
        if full and details.method.rsplit("/", 1)[-1] == INFER_METHOD:
            return self._refuse
        return await continuation(details)


class _Token(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without ``authorization: Bearer <token>`` (health calls excepted)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def refuse(_: Any, context: Any) -> Any:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "a bearer token is required (metadata authorization: Bearer ...)",
            )

        self._refuse = grpc.unary_unary_rpc_method_handler(refuse)

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        if details.method.rsplit("/", 1)[-1] in OPEN_METHODS:
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given_bytes, self._expected):
            return await continuation(details)
        return self._refuse


def _credentials(settings: EndpointSettings) -> Any:
    """Server TLS credentials (client certificates required with a client CA), or None."""
    if settings.cert_file is None or settings.key_file is None:
        return None
    pair = (settings.key_file.read_bytes(), settings.cert_file.read_bytes())
    ca = settings.client_ca_file.read_bytes() if settings.client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                       require_client_auth=ca is not None)  # fmt: skip


@contextlib.asynccontextmanager
async def serve_grpc(api: V2Api, settings: GrpcSettings) -> AsyncIterator[int]:
    """Serve the gRPC service while open; yields the bound port (``port=0``: any)."""
    warn_if_open("gRPC", settings)
    token = settings.token.get_secret_value() if settings.token else None
    interceptors: list[Any] = [_Token(token)] if token else []
    interceptors.append(_Room(api.direct))  # after the token: strangers learn nothing
    max_bytes = request_bytes(settings)
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.so_reuseport", int(settings.reuse_port)),  # grpc's own default shares it
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    with ThreadPoolExecutor(1, thread_name_prefix="grpc-codec") as codec:
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            _Service(api, settings.request_timeout_s, codec), server
        )  # type: ignore[no-untyped-call]
        address = f"{settings.host}:{settings.port}"
        credentials = _credentials(settings)
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:  # grpc says only "Failed to bind"
            raise ConfigError.cannot_listen(
                "gRPC endpoint", address, "WORKER_GRPC__PORT", None
            ) from exc
        await server.start()
        try:
            yield port
        finally:
            await server.stop(grace=1.0)
