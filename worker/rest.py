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
status of their code (:data:`HTTP_STATUS`). Optional TLS (mutual with a client CA) and a
bearer token (:class:`worker.settings.EndpointSettings`).

Bounds, in the order a request meets them: at most ``max_connections`` open connections (one
more is answered 503 and closed); a place of the in-flight bound taken before the body is read
(none left: 429 at once); a body over ``max_request_bytes`` (by default the runtime's) refused
before more of it is read (413); the body's arrival bounded by the request's wait (408). A body
over :data:`DECODE_ON_LOOP_BYTES` is parsed in the endpoint's codec thread, one at a time, and
a reply with more than :data:`ENCODE_ON_LOOP_VALUES` JSON values is written there in slices,
so no request holds the event loop (which the Kafka consumer's heartbeats share) for long.

Here: the routes, the order of an infer call's steps and the server. Reading a call is
:mod:`worker.rest_requests`, writing its reply :mod:`worker.rest_replies`, what REST shares
with gRPC (the API, metadata, bounds) :mod:`worker.endpoints`; their names are re-exported.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from worker.connections import ConnectionGate
from worker.direct import Place
from worker.endpoint_settings import EndpointSettings, RestSettings
from worker.endpoints import (
    EXTENSIONS,
    SERVER_NAME,
    V2Api,
    model_metadata,
    request_bytes,
    server_version,
    warn_if_open,
)
from worker.errors import ConfigError
from worker.rest_replies import ENCODE_ON_LOOP_VALUES, HTTP_STATUS, error_reply, result_reply
from worker.rest_requests import (
    DECODE_ON_LOOP_BYTES,
    HEADER_LENGTH,
    PASSED_HEADERS,
    TIMEOUT_HEADER,
    RefusedError,
    call_headers,
    decode_body,
    received,
    requested_outputs,
    whole_number,
)

__all__ = [
    "DECODE_ON_LOOP_BYTES",
    "ENCODE_ON_LOOP_VALUES",
    "HTTP_STATUS",
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

_outputs = requested_outputs
"""Its name before :mod:`worker.rest_requests` (``tests/test_direct.py`` imports it)."""


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


CLOSE_WAIT_S = 2.0
"""How long closing the endpoint waits for connections still open (every answer is out by
then: the worker drained first)."""


@dataclass(frozen=True)
class _Endpoint:
    """What an infer call needs besides the API: its bounds and the codec thread."""

    wait_s: float
    max_bytes: int
    codec: ThreadPoolExecutor
    body_wait_s: float
    """Longest wait for a body, whatever a ``Request-Timeout-Ms`` header asks."""


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
            message = f"model {name!r}{f' version {version!r}' if version else ''} is not served"
            return error_reply(404, message)

    async def model_ready(request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version")
        if not api.repository().serves(name, version):
            return error_reply(404, f"model {name!r} is not served")
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


async def _infer(api: V2Api, request: web.Request, endpoint: _Endpoint) -> web.Response:
    """Bounds first (a place in flight, the body's size), then read, decode, infer, reply."""
    direct = api.direct
    if direct.closing:  # and the connection closes: clients reconnect to another worker
        stopping = error_reply(503, "the worker is stopping")
        stopping.force_close()
        return stopping
    place = direct.take()  # before a byte of the body is read
    if place is None:
        return error_reply(429, direct.full_message)
    with place:  # given back here unless the request was dispatched (then by its answer)
        try:
            return await _infer_in_place(api, request, endpoint, place)
        except RefusedError as refused:
            reply = error_reply(refused.status, refused.message)
            if refused.close:  # the rest of the body is not waited for
                reply.force_close()
            return reply


async def _infer_in_place(
    api: V2Api, request: web.Request, endpoint: _Endpoint, place: Place
) -> web.Response:
    name, version = request.match_info["name"], request.match_info.get("version")
    header_length, timeout_s = call_headers(request, name + (version or ""))
    loop = asyncio.get_running_loop()
    started = loop.time()
    wait_s = min(timeout_s if timeout_s is not None else endpoint.wait_s, endpoint.body_wait_s)
    body = await received(request, wait_s, endpoint.max_bytes)
    length = len(body) if header_length is None else header_length
    if not length <= len(body):
        within = f"{HEADER_LENGTH} must be a length within the body ({len(body)} bytes)"
        raise RefusedError(400, within)
    headers = [("model_name", name.encode())]
    if version:
        headers.append(("model_version", version.encode()))
    # aiohttp decodes header bytes with surrogateescape: this gives back exactly those bytes.
    passed = [
        (h, request.headers[h].encode(errors="surrogateescape"))
        for h in PASSED_HEADERS
        if h in request.headers
    ]
    if len(body) <= DECODE_ON_LOOP_BYTES:
        decoded, wanted, binary = decode_body(body, length, headers + passed)
    else:
        decoded, wanted, binary = await loop.run_in_executor(
            endpoint.codec, decode_body, body, length, headers + passed
        )
    del body  # the tensors hold their own bytes
    if decoded.model_name != name or (version and decoded.model_version != version):
        raise RefusedError(400, "the body names another model than the URL")
    if timeout_s is not None:  # the deadline counts from the request's arrival
        timeout_s = max(0.0, timeout_s - (loop.time() - started))
    answer = await api.direct.infer(
        "rest", decoded, passed, timeout_s=timeout_s, wait_s=endpoint.wait_s, place=place
    )
    reply = await result_reply(answer.response, wanted, binary, endpoint.codec)
    trace = answer.header("traceparent")
    if trace is not None:  # the worker's span in the caller's trace
        reply.headers["traceparent"] = trace
    return reply


def _auth(settings: EndpointSettings) -> Callable[..., Awaitable[web.StreamResponse]]:
    token = settings.token.get_secret_value().encode() if settings.token else None

    @web.middleware
    async def check(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if token is not None and not request.path.startswith("/v2/health/"):
            given = request.headers.get("Authorization", "").encode(errors="surrogateescape")
            if not hmac.compare_digest(given, b"Bearer " + token):
                return error_reply(401, "a bearer token is required (Authorization: Bearer ...)")
        return await handler(request)

    return check


@contextlib.asynccontextmanager
async def serve_rest(api: V2Api, settings: RestSettings) -> AsyncIterator[int]:
    """Serve the V2 REST API while open; yields the bound port (``port=0``: any)."""
    warn_if_open("REST", settings)
    max_bytes = request_bytes(settings)
    app = web.Application(middlewares=[_auth(settings)], client_max_size=max_bytes)
    with ThreadPoolExecutor(1, thread_name_prefix="rest-codec") as codec:
        endpoint = _Endpoint(
            settings.request_timeout_s, max_bytes, codec, body_wait_s=settings.body_timeout_s
        )
        app.add_routes(_routes(api, endpoint))
        # Closing waits at most this for a connection still sending (all answers are out).
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=CLOSE_WAIT_S
        )
        await runner.setup()
        try:
            assert runner.server is not None
            gate = ConnectionGate(runner.server, settings.max_connections)
            try:
                server = await asyncio.get_running_loop().create_server(
                    gate, settings.host, settings.port, ssl=endpoint_ssl(settings), backlog=128,
                    reuse_port=settings.reuse_port or None,
                )  # fmt: skip
            except OSError as exc:
                address = f"{settings.host}:{settings.port}"
                raise ConfigError.cannot_listen(
                    "REST endpoint", address, "WORKER_REST__PORT", exc.strerror
                ) from exc
            try:
                yield int(server.sockets[0].getsockname()[1]) if server.sockets else settings.port
            finally:
                server.close()
        finally:
            await runner.cleanup()
