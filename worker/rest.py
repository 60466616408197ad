"""KServe V2 (Open Inference Protocol) REST: health, metadata and inference over HTTP.

Served on its own port (``WORKER_REST__PORT``, default 8000, Triton's), beside the metrics and
probes port. Routes, as Triton, KServe and MLServer serve them::

    GET  /v2/health/live                               {"live": true}
    GET  /v2/health/ready                              {"ready": true}  (503 while not)
    GET  /v2                                           server name, version, extensions
    GET  /v2/models/{name}[/versions/{v}]              inputs, outputs, datatypes, shapes
    GET  /v2/models/{name}[/versions/{v}]/ready        200 when served and ready
    POST /v2/models/{name}[/versions/{v}]/infer        V2 JSON, or the binary tensor extension

The binary tensor extension (``Inference-Header-Content-Length``: the JSON's length, then raw
tensor bytes; ``parameters.binary_data_size`` per tensor) is what Triton's clients send for
large tensors; outputs come back binary when asked (``parameters.binary_data`` on an output,
or ``binary_data_output`` on the request). Inference goes through :mod:`worker.direct`: the
same lanes, batches, routing and errors as Kafka. Errors are ``{"error": "..."}`` with the
status of their code (:data:`worker.direct.HTTP_STATUS`). Optional TLS (mutual with a client
CA) and a bearer token (:class:`worker.settings.EndpointSettings`).

Bounds, in the order a request meets them: at most ``max_connections`` open connections (one
more is answered 503 and closed); a place of the in-flight bound taken before the body is read
(none left: 429 at once); a body over ``max_request_bytes`` (by default the runtime's) refused
before more of it is read (413); the body's arrival bounded by the request's wait (408). A body
over :data:`DECODE_ON_LOOP_BYTES` is parsed in the endpoint's codec thread, one at a time, and
a reply with more than :data:`ENCODE_ON_LOOP_VALUES` JSON values is written there in slices,
so no request holds the event loop (which the Kafka consumer's heartbeats share) for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.metadata
import math
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

from worker.connections import ConnectionGate
from worker.direct import HTTP_STATUS, Direct, Place
from worker.domain import InferenceRequest, InferenceResponse
from worker.errors import DecodeError, ErrorCode
from worker.repository import ModelRepository
from worker.settings import EndpointSettings, RestSettings, RuntimeSettings
from worker.v2json import (
    encode_rest_response,
    encode_rest_response_in_slices,
    is_unicode,
    parse_json_body,
    request_from_body,
)

__all__ = [
    "DECODE_ON_LOOP_BYTES",
    "ENCODE_ON_LOOP_VALUES",
    "SERVER_NAME",
    "TIMEOUT_HEADER",
    "V2Api",
    "endpoint_ssl",
    "model_metadata",
    "request_bytes",
    "serve_rest",
    "server_version",
    "warn_if_open",
    "whole_number",
]

log = structlog.get_logger(__name__)

SERVER_NAME = "kafka-inference-worker"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "Inference-Header-Content-Length"
TIMEOUT_HEADER = "Request-Timeout-Ms"
"""A REST request's deadline, in milliseconds from now."""
PASSED_HEADERS = ("traceparent", "tracestate", "correlation_id")
"""HTTP request headers handed on with the request (trace context continues)."""
DECODE_ON_LOOP_BYTES = 16 << 10
"""Bodies up to this size are parsed on the event loop (at most a few milliseconds); larger
ones in the endpoint's codec thread."""
ENCODE_ON_LOOP_VALUES = 8192
"""Replies with up to this many JSON values are written on the event loop; larger ones in the
codec thread, a slice of this many values at a time (each slice a few milliseconds)."""


@dataclass(frozen=True)
class V2Api:
    """What the REST and gRPC endpoints ask the worker."""

    repository: Callable[[], ModelRepository]
    ready: Callable[[], bool]
    direct: Direct
    version: str


def server_version() -> str:
    """The package's version (``0+unknown`` when run from a tree that is not installed)."""
    try:
        return importlib.metadata.version("kafka-inference-worker")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def model_metadata(repository: ModelRepository, name: str, version: str | None) -> dict[str, Any]:
    """A model's V2 metadata; KeyError if the model (or version) is not served."""
    if not repository.serves(name, version):
        raise KeyError(name if version is None else f"{name} v{version}")
    served = repository.get(name)
    config = served.config
    return {
        "name": name,
        "versions": [version] if version else list(served.versions),
        "platform": "pytorch_torchexport",
        "inputs": [
            {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in config.inputs
        ],
        "outputs": [
            {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in config.outputs
        ],
    }


def endpoint_ssl(settings: EndpointSettings) -> ssl.SSLContext | None:
    """The server TLS context (mutual with ``client_ca_file``), or None for plain text."""
    if settings.cert_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.cert_file, settings.key_file)
    if settings.client_ca_file is not None:
        context.load_verify_locations(settings.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@dataclass(frozen=True)
class _Endpoint:
    """What an infer call needs besides the API: its bounds and the codec thread."""

    wait_s: float
    max_bytes: int
    codec: ThreadPoolExecutor


def request_bytes(settings: EndpointSettings) -> int:
    """The most bytes of one request an endpoint reads (its own bound, else the runtime's)."""
    if settings.max_request_bytes is not None:
        return settings.max_request_bytes
    return RuntimeSettings().max_request_bytes  # settings built outside Settings (tests)


def _routes(api: V2Api, endpoint: _Endpoint) -> list[web.RouteDef]:
    async def live(_: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(_: web.Request) -> web.Response:
        ok = api.ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def server(_: web.Request) -> web.Response:
        return web.json_response(
            {"name": SERVER_NAME, "version": api.version, "extensions": EXTENSIONS}
        )

    async def metadata(request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version")
        try:
            return web.json_response(model_metadata(api.repository(), name, version))
        except KeyError:
            return _error(404, f"model {name!r}{f' version {version!r}' if version else ''} "
                               "is not served")  # fmt: skip

    async def model_ready(request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version")
        if not api.repository().serves(name, version):
            return _error(404, f"model {name!r} is not served")
        ok = api.ready()
        return web.json_response({"name": name, "ready": ok}, status=200 if ok else 503)

    async def infer(request: web.Request) -> web.Response:
        return await _infer(api, request, endpoint)

    model = "/v2/models/{name}"
    version = "/v2/models/{name}/versions/{version}"
    return [
        web.get("/v2/health/live", live),
        web.get("/v2/health/ready", ready),
        web.get("/v2", server),
        web.get(model, metadata),
        web.get(version, metadata),
        web.get(model + "/ready", model_ready),
        web.get(version + "/ready", model_ready),
        web.post(model + "/infer", infer),
        web.post(version + "/infer", infer),
    ]


class _RefusedError(Exception):
    """An infer call answered with an error status before it reached the pipeline."""

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


async def _infer(api: V2Api, request: web.Request, endpoint: _Endpoint) -> web.Response:
    """Bounds first (a place in flight, the body's size), then read, decode, infer, reply."""
    direct = api.direct
    if direct.closing:
        return _error(503, "the worker is stopping")
    place = direct.take()  # before a byte of the body is read
    if place is None:
        return _error(429, direct.full_message)
    with place:  # given back here unless the request was dispatched (then by its answer)
        try:
            return await _infer_in_place(api, request, endpoint, place)
        except _RefusedError as refused:
            reply = _error(refused.status, refused.message)
            if refused.close:  # the rest of the body is not waited for
                reply.force_close()
            return reply


async def _infer_in_place(
    api: V2Api, request: web.Request, endpoint: _Endpoint, place: Place
) -> web.Response:
    name, version = request.match_info["name"], request.match_info.get("version")
    header_length, timeout_s = _headers(request, name + (version or ""))
    loop = asyncio.get_running_loop()
    started = loop.time()
    body = await _received(request, endpoint, timeout_s)
    length = len(body) if header_length is None else header_length
    if not length <= len(body):
        within = f"{HEADER_LENGTH} must be a length within the body ({len(body)} bytes)"
        raise _RefusedError(400, within)
    headers = [("model_name", name.encode())]
    if version:
        headers.append(("model_version", version.encode()))
    # aiohttp decodes header bytes with surrogateescape: this gives back exactly those bytes.
    passed = [
        (h, request.headers[h].encode(errors="surrogateescape"))
        for h in PASSED_HEADERS
        if h in request.headers
    ]
    try:
        if len(body) <= DECODE_ON_LOOP_BYTES:
            decoded, wanted, binary = _decode(body, length, headers + passed)
        else:
            decoded, wanted, binary = await loop.run_in_executor(
                endpoint.codec, _decode, body, length, headers + passed
            )
    except DecodeError as exc:
        raise _RefusedError(400, exc.message) from None
    del body  # the tensors hold their own bytes
    if decoded.model_name != name or (version and decoded.model_version != version):
        raise _RefusedError(400, "the body names another model than the URL")
    if timeout_s is not None:  # the deadline counts from the request's arrival
        timeout_s = max(0.0, timeout_s - (loop.time() - started))
    answer = await api.direct.infer(
        "rest", decoded, passed, timeout_s=timeout_s, wait_s=endpoint.wait_s, place=place
    )
    reply = await _respond(answer.response, wanted, binary, endpoint.codec)
    trace = answer.header("traceparent")
    if trace is not None:  # the worker's span in the caller's trace
        reply.headers["traceparent"] = trace
    return reply


def _headers(request: web.Request, model: str) -> tuple[int | None, float | None]:
    """The binary header's length and the timeout, read before the body; _RefusedError if bad."""
    split = request.headers.get(HEADER_LENGTH)
    header_length = None if split is None else whole_number(split)
    if split is not None and header_length is None:
        raise _RefusedError(400, f"{HEADER_LENGTH} must be a whole number of bytes within the body")
    try:
        timeout_s = _timeout(request)
    except DecodeError as exc:
        raise _RefusedError(400, exc.message) from None
    if not is_unicode(model):
        raise _RefusedError(400, "the model name or version in the URL is not UTF-8 text")
    return header_length, timeout_s


async def _received(request: web.Request, endpoint: _Endpoint, timeout_s: float | None) -> bytes:
    """The body, within the request's wait and the byte bound; _RefusedError (408, 413) if not."""
    wait_s = timeout_s if timeout_s is not None else endpoint.wait_s
    try:
        async with asyncio.timeout(wait_s):
            body = await _read_body(request, endpoint.max_bytes)
    except TimeoutError:
        raise _RefusedError(
            408, f"the request body did not arrive within {wait_s:.1f} s", close=True
        ) from None
    if body is None:
        raise _RefusedError(413, _too_large(request.content_length, endpoint.max_bytes))
    return body


async def _read_body(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None as soon as it is known to be over ``limit`` bytes.

    Over: a ``Content-Length`` above it (nothing is read), or more bytes arriving (after any
    ``Content-Encoding``) than it allows (at most one chunk more is held).
    """
    if (request.content_length or 0) > limit:
        return None
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _too_large(content_length: int | None, limit: int) -> str:
    over = content_length is not None and content_length > limit  # else: found as it arrived
    size = f"is {content_length} bytes" if over else "is larger (once decompressed)"
    return (
        f"the request body {size}; this endpoint reads at most {limit} "
        "(WORKER_REST__MAX_REQUEST_BYTES, by default WORKER_RUNTIME__MAX_REQUEST_BYTES); "
        "large tensors take the fewest bytes as binary data (Inference-Header-Content-Length)"
    )


def _decode(
    body: bytes, length: int, headers: list[tuple[str, bytes]]
) -> tuple[InferenceRequest, list[str], set[str]]:
    """The request, the outputs it asks for and those wanted binary; DecodeError if bad."""
    parsed = parse_json_body(memoryview(body)[:length])  # once, for inputs and outputs
    decoded = request_from_body(parsed, headers, None, binary=body[length:])
    wanted, binary = _outputs(parsed)
    return decoded, wanted, binary


def _timeout(request: web.Request) -> float | None:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    value = whole_number(raw)
    if value is None or value <= 0:
        raise DecodeError(
            f"{TIMEOUT_HEADER} must be a whole number of milliseconds, 1 to {_MAX_WHOLE_NUMBER}"
        )
    return value / 1000


_WHOLE_NUMBER = re.compile(r"[0-9]{1,15}")
_MAX_WHOLE_NUMBER = 10**15 - 1


def whole_number(raw: str) -> int | None:
    """A header's plain decimal number (ASCII digits only, at most 15), else None.

    ``int()`` would also take ``" 5 "``, ``"1_000"``, other scripts' digits and numbers too
    big for a float or a timer.
    """
    return int(raw) if _WHOLE_NUMBER.fullmatch(raw) else None


def _outputs(body: dict[str, Any]) -> tuple[list[str], set[str]]:
    """The outputs a request asks for (empty: all) and those it wants as binary data."""
    wanted: list[str] = []
    binary: set[str] = set()
    every = bool(_parameters(body).get("binary_data_output", False))
    outputs = body.get("outputs") or []
    if not isinstance(outputs, list):
        raise DecodeError("outputs must be a list")
    for output in outputs:
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise DecodeError("each of outputs needs a name")
        wanted.append(output["name"])
        if _parameters(output).get("binary_data", every):
            binary.add(output["name"])
    if every and not outputs:
        binary = {"*"}
    return wanted, binary


def _parameters(holder: dict[str, Any]) -> dict[str, Any]:
    """A request's or an output's ``parameters`` (an object), else none."""
    given = holder.get("parameters")
    return given if isinstance(given, dict) else {}


async def _respond(
    response: InferenceResponse, wanted: list[str], binary: set[str], codec: ThreadPoolExecutor
) -> web.Response:
    if response.error is not None:
        code = ErrorCode(response.error.code)
        return _error(HTTP_STATUS.get(code, 500), response.error.message)
    if "*" in binary:
        binary = {t.name for t in response.outputs}
    values = sum(
        math.prod(t.shape) for t in response.outputs
        if (not wanted or t.name in wanted) and t.name not in binary
    )  # fmt: skip
    if values <= ENCODE_ON_LOOP_VALUES:
        body, header_length = encode_rest_response(response, wanted=wanted, binary=binary)
    else:
        body, header_length = await asyncio.get_running_loop().run_in_executor(
            codec, _in_slices, response, wanted, binary
        )
    if header_length is None:
        return web.Response(body=body, content_type="application/json")
    return web.Response(
        body=body,
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(header_length)},
    )


def _in_slices(
    response: InferenceResponse, wanted: list[str], binary: set[str]
) -> tuple[bytes, int | None]:
    return encode_rest_response_in_slices(
        response, wanted=wanted, binary=binary, values_per_slice=ENCODE_ON_LOOP_VALUES
    )


def _auth(settings: EndpointSettings) -> Callable[..., Awaitable[web.StreamResponse]]:
    token = settings.token.get_secret_value().encode() if settings.token else None

    @web.middleware
    async def check(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if token is not None and not request.path.startswith("/v2/health/"):
            given = request.headers.get("Authorization", "").encode(errors="surrogateescape")
            if not hmac.compare_digest(given, b"Bearer " + token):
                return _error(401, "a bearer token is required (Authorization: Bearer ...)")
        return await handler(request)

    return check


def warn_if_open(kind: str, settings: EndpointSettings) -> None:
    """Log a warning for an endpoint on a non-loopback address without TLS and client auth."""
    if settings.host not in ("127.0.0.1", "::1", "localhost") and not settings.secured:
        log.warning(
            "endpoint serves a non-loopback address without TLS and client authentication; "
            "put it behind a TLS-terminating, authenticating proxy, or set its cert_file, "
            "key_file and token (or client_ca_file)",
            endpoint=kind,
            address=f"{settings.host}:{settings.port}",
        )


@contextlib.asynccontextmanager
async def serve_rest(api: V2Api, settings: RestSettings) -> AsyncIterator[int]:
    """Serve the V2 REST API while open; yields the bound port (``port=0``: any)."""
    warn_if_open("REST", settings)
    max_bytes = request_bytes(settings)
    app = web.Application(middlewares=[_auth(settings)], client_max_size=max_bytes)
    with ThreadPoolExecutor(1, thread_name_prefix="rest-codec") as codec:
        endpoint = _Endpoint(settings.request_timeout_s, max_bytes, codec)
        app.add_routes(_routes(api, endpoint))
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            assert runner.server is not None
            gate = ConnectionGate(runner.server, settings.max_connections)
            server = await asyncio.get_running_loop().create_server(
                gate, settings.host, settings.port, ssl=endpoint_ssl(settings), backlog=128
            )
            try:
                yield int(server.sockets[0].getsockname()[1]) if server.sockets else settings.port
            finally:
                server.close()
        finally:
            await runner.cleanup()
