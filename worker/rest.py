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
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.metadata
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

from worker.codec import InferenceResponse
from worker.direct import HTTP_STATUS, Direct
from worker.errors import DecodeError, ErrorCode
from worker.repository import ModelRepository
from worker.settings import EndpointSettings
from worker.v2json import encode_rest_response, is_unicode, parse_json_body, request_from_body

__all__ = [
    "SERVER_NAME",
    "TIMEOUT_HEADER",
    "V2Api",
    "endpoint_ssl",
    "model_metadata",
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
MAX_BODY = 64 << 20


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


def _routes(api: V2Api, wait_s: float) -> list[web.RouteDef]:
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
        return await _infer(api, request, wait_s)

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


async def _infer(api: V2Api, request: web.Request, wait_s: float) -> web.Response:
    name, version = request.match_info["name"], request.match_info.get("version")
    body = await request.read()
    split = request.headers.get(HEADER_LENGTH)
    length = len(body) if split is None else whole_number(split)
    if length is None or not 0 <= length <= len(body):
        return _error(400, f"{HEADER_LENGTH} must be a length within the body ({len(body)} bytes)")
    if not is_unicode(name + (version or "")):
        return _error(400, "the model name or version in the URL is not UTF-8 text")
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
        parsed = parse_json_body(memoryview(body)[:length])  # once, for inputs and outputs
        decoded = request_from_body(parsed, headers + passed, None, binary=body[length:])
        timeout_s = _timeout(request)
        wanted, binary = _outputs(parsed)
    except DecodeError as exc:
        return _error(400, exc.message)
    if decoded.model_name != name or (version and decoded.model_version != version):
        return _error(400, "the body names another model than the URL")
    answer = await api.direct.infer("rest", decoded, passed, timeout_s=timeout_s, wait_s=wait_s)
    reply = _respond(answer.response, wanted, binary)
    trace = answer.header("traceparent")
    if trace is not None:  # the worker's span in the caller's trace
        reply.headers["traceparent"] = trace
    return reply


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


def _respond(response: InferenceResponse, wanted: list[str], binary: set[str]) -> web.Response:
    if response.error is not None:
        code = ErrorCode(response.error.code)
        return _error(HTTP_STATUS.get(code, 500), response.error.message)
    if "*" in binary:
        binary = {t.name for t in response.outputs}
    body, header_length = encode_rest_response(response, wanted=wanted, binary=binary)
    if header_length is None:
        return web.Response(body=body, content_type="application/json")
    return web.Response(
        body=body,
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(header_length)},
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
async def serve_rest(api: V2Api, settings: EndpointSettings) -> AsyncIterator[int]:
    """Serve the V2 REST API while open; yields the bound port (``port=0``: any)."""
    warn_if_open("REST", settings)
    app = web.Application(middlewares=[_auth(settings)], client_max_size=MAX_BODY)
    app.add_routes(_routes(api, settings.request_timeout_s))
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, ssl_context=endpoint_ssl(settings))
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        yield int(sockets[0].getsockname()[1]) if sockets else settings.port
    finally:
        await runner.cleanup()
