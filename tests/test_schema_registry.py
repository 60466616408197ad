"""The schema registry client (worker.schema_registry) against a small HTTPS server.

Conduit's registry (the integration tests' real one) has neither TLS nor authentication; this
server checks what the client sends: basic auth, its client certificate, the request paths.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from worker.codec import schema_text
from worker.errors import ConfigError, ErrorCode, RequestError
from worker.schema_registry import SchemaRegistry
from worker.settings import SchemaRegistrySettings, load_settings, redacted_url

from .pki import Pki, make_pki

PASSWORD = "registry-password"  # noqa: S105 - this test's own credential
BASIC = "Basic " + base64.b64encode(f"worker:{PASSWORD}".encode()).decode()


@contextlib.asynccontextmanager
async def https_registry(pki: Pki, seen: list[str]) -> AsyncIterator[int]:
    """A registry that wants basic auth and a client certificate; it knows schema id 7."""

    @web.middleware
    async def auth(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        seen.append(f"{request.method} {request.path}")
        if request.headers.get("Authorization") != BASIC:
            return web.json_response({"error_code": 40101}, status=401)
        return await handler(request)

    async def register(_: web.Request) -> web.Response:
        return web.json_response({"id": 41})

    async def by_id(request: web.Request) -> web.Response:
        if request.match_info["id"] == "7":
            return web.json_response({"schema": schema_text("inference_request")})
        if request.match_info["id"] == "8":
            return web.json_response({"schema": "{}", "schemaType": "PROTOBUF"})
        return web.json_response({"error_code": 40403}, status=404)

    app = web.Application(middlewares=[auth])
    app.add_routes([web.post("/subjects/{subject}/versions", register),
                    web.get("/schemas/ids/{id}", by_id)])  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.broker_cert, pki.broker_key)
    context.load_verify_locations(pki.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def registry_settings(pki: Pki, port: int, **over: object) -> SchemaRegistrySettings:
    """Settings for the HTTPS registry with credentials and a client certificate."""
    fields: dict[str, object] = {
        "url": f"https://localhost:{port}", "username": "worker", "password": PASSWORD,
        "ca_file": pki.ca, "cert_file": pki.client_cert, "key_file": pki.client_key,
        "retry_s": 0.0, **over,
    }  # fmt: skip
    return SchemaRegistrySettings.model_validate(fields)


async def test_basic_auth_and_mutual_tls_reach_the_registry(tmp_path: Path) -> None:
    """With credentials and certificate: registered, ids looked up, failures remembered."""
    pki = make_pki(tmp_path / "pki")
    seen: list[str] = []
    async with https_registry(pki, seen) as port:
        settings = registry_settings(pki, port)
        async with SchemaRegistry(settings, reply_subject="replies-value") as registry:
            assert registry.reply_id == 41
            framed = [b"\x00" + i.to_bytes(4, "big") + b"body" for i in (7, 8, 9)]
            await registry.prepare([(value, []) for value in framed])
            await registry.prepare([(value, []) for value in framed])  # all remembered
            assert registry.writer(7)["name"] == "inference.v2.InferenceRequest"
            with pytest.raises(RequestError, match="cannot be read as an Avro schema") as bad:
                registry.writer(8)
            with pytest.raises(RequestError, match=r"not in the schema registry \(404\)"):
                registry.writer(9)
    assert bad.value.code is ErrorCode.INVALID_ARGUMENT
    assert seen == ["POST /subjects/replies-value/versions", "GET /schemas/ids/7",
                    "GET /schemas/ids/8", "GET /schemas/ids/9"], "each id asked once"  # fmt: skip


async def test_wrong_credentials_or_no_client_certificate_fail_the_start(tmp_path: Path) -> None:
    """A registry refusing the worker is a start-up error, not a silent downgrade."""
    pki = make_pki(tmp_path / "pki")
    async with https_registry(pki, []) as port:
        wrong = registry_settings(pki, port, password="not-it")  # noqa: S106
        with pytest.raises(ConfigError, match="refused to register the response schema"):
            async with SchemaRegistry(wrong, reply_subject="r-value"):
                pass
        anonymous = registry_settings(pki, port, cert_file=None, key_file=None)
        with pytest.raises(ConfigError, match="cannot be reached"):
            async with SchemaRegistry(anonymous, reply_subject="r-value"):
                pass


async def test_unknown_ids_ahead_of_a_good_one_never_starve_it(tmp_path: Path) -> None:
    """50 unknown ids, then a good one: all looked up once; the good one served; fresh refusals."""
    pki = make_pki(tmp_path / "pki")
    seen: list[str] = []
    values: list[tuple[bytes | None, list[tuple[str, bytes]]]] = [
        (b"\x00" + (100 + i).to_bytes(4, "big") + b"x", []) for i in range(50)
    ]
    values.append((b"\x00" + (7).to_bytes(4, "big") + b"x", []))
    async with (
        https_registry(pki, seen) as port,
        SchemaRegistry(registry_settings(pki, port), reply_subject="r-value") as reg,
    ):
        await reg.prepare(values)
        assert reg.writer(7) is not None
        with pytest.raises(RequestError, match="not in the schema registry") as caught:
            reg.writer(149)
        with pytest.raises(RequestError, match="not in the schema registry") as again:
            reg.writer(149)
        await reg.prepare(values)  # all remembered: nothing asked again
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert again.value is not caught.value, "a new error per record: a kept one grows tracebacks"
    assert len(seen) == 1 + 51


async def test_while_the_registry_is_down_new_ids_fail_at_once_not_each_after_retries(
    tmp_path: Path,
) -> None:
    """40 new ids, registry gone: all UNAVAILABLE as unreachable, none for want of time.

    Retried one by one (4 at a time, 0.5 s each) they would need 5 s: twice the budget.
    """
    pki = make_pki(tmp_path / "pki")
    values: list[tuple[bytes | None, list[tuple[str, bytes]]]] = [
        (b"\x00" + (100 + i).to_bytes(4, "big") + b"x", []) for i in range(40)
    ]
    async with contextlib.AsyncExitStack() as stack:
        server = contextlib.AsyncExitStack()
        port = await server.enter_async_context(https_registry(pki, []))
        settings = registry_settings(pki, port, retry_s=0.5, timeout_s=2.0)
        reg = await stack.enter_async_context(SchemaRegistry(settings, reply_subject="r-value"))
        await server.aclose()  # the registry goes away after the worker started
        await reg.prepare(values)
    problems = []
    for i in range(40):
        with pytest.raises(RequestError) as caught:
            reg.writer(100 + i)
        assert caught.value.code is ErrorCode.UNAVAILABLE
        problems.append(caught.value.message)
    assert all(p.startswith("schema registry cannot be reached") for p in problems), problems


def test_registry_settings_pair_their_fields() -> None:
    """A URL must be http(s); cert and key, user and password go together."""
    with pytest.raises(ValueError, match="must start with http"):
        SchemaRegistrySettings(url="registry:8081")
    with pytest.raises(ValueError, match="username and password go together"):
        SchemaRegistrySettings(url="http://r", username="u")
    assert (
        json.loads(SchemaRegistrySettings(url="http://r/").model_dump_json())["url"] == "http://r"
    )


NO_AT = st.characters(exclude_characters="@")


@given(st.text(max_size=20), st.text(min_size=1, max_size=20), st.text(NO_AT, max_size=20))
def test_credentials_in_a_url_are_never_shown(user: str, password: str, path: str) -> None:
    """redacted_url hides any user:password@ of a URL, whatever characters they hold.

    (A path with an ``@`` is hidden up to it too: over-hiding is the safe side.)
    """
    url = f"https://{user}:{password}@registry.example:8081/{path}"
    assert redacted_url(url) == f"https://***@registry.example:8081/{path}"
    assert redacted_url("http://registry:8081/x") == "http://registry:8081/x"


async def test_a_registry_url_with_credentials_never_reaches_logs_or_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unreachable, refused or badly written: the password in the URL is not in the message."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens
    url = f"http://worker:{PASSWORD}@127.0.0.1:{port}"
    settings = SchemaRegistrySettings(url=url, retry_s=0.0, timeout_s=2.0)
    with capture_logs() as logs, pytest.raises(ConfigError) as caught:
        async with SchemaRegistry(settings, reply_subject="r-value"):
            pass
    assert "cannot be reached" in str(caught.value)
    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in repr(logs)
    monkeypatch.setenv("WORKER_SCHEMA_REGISTRY__URL", f"ftp://worker:{PASSWORD}@host")
    with pytest.raises(ConfigError, match="must start with http") as bad:
        load_settings()
    assert PASSWORD not in str(bad.value)
