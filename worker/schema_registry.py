"""A Confluent-compatible schema registry: writer schemas by id, and our reply schema's id.

Records in the registry's wire format carry a schema id (:mod:`worker.formats`). Before a
fetched batch is admitted, :meth:`SchemaRegistry.prepare` looks up every id of it that it has
not seen (``GET /schemas/ids/{id}``), a few at a time, all within one time budget per batch
(``retry_s + timeout_s``), so unknown ids put in front of a good one cannot starve it; decoding
then only reads the cache (:meth:`SchemaRegistry.writer`). The cache is bounded (least recently
used go first). An id the registry does not have (404), whose schema is not Avro or whose
writer schema is refused (:mod:`worker.writer_schemas`) is remembered as such for a minute: its
records are answered INVALID_ARGUMENT without asking again. While the registry cannot be
reached, a new id is retried for ``retry_s``, then its records are answered UNAVAILABLE (and
dead-lettered, so they can be replayed); the other new ids of that moment fail at once instead
of each waiting out its own retries; ids already cached keep working throughout.

At start the response schema is registered under ``<replies topic>-value`` (TopicNameStrategy)
and replies are framed with the id the registry gives; with ``reply_schema_id`` set, that id
is checked to be our response schema instead (for registries the worker may not write to).
Basic auth and TLS (CA, client certificate) come from the settings; the password is a secret.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from collections import OrderedDict
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self

import aiohttp
import fastavro
import structlog
from fastavro.schema import to_parsing_canonical_form
from prometheus_client import Counter

from worker.codec import schema_text
from worker.errors import ConfigError, ErrorCode, RequestError
from worker.formats import WireFormat, framed_schema_id, wire_format
from worker.headers import Headers
from worker.settings import SchemaRegistrySettings, redacted_url
from worker.writer_schemas import writer_problem

__all__ = ["MAX_SCHEMA_BYTES", "SchemaRegistry"]

log = structlog.get_logger(__name__)

MAX_SCHEMA_BYTES = 1 << 20
"""Largest registry answer read."""
LOOKUPS_AT_ONCE = 4
REMEMBER_MISSING_S = 60.0
"""How long an id the registry does not have is answered without asking again."""
REMEMBER_OUTAGE_S = 1.0
"""How long the registry counts as down after a lookup gave up on it: new ids fail at once."""
CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class SchemaRegistry:
    """The registry client of one worker; an async context manager (it registers at entry)."""

    def __init__(
        self,
        settings: SchemaRegistrySettings,
        *,
        reply_subject: str,
        lookups: Counter | None = None,
    ) -> None:
        self._settings = settings
        self._lookups = lookups
        """``inference_schema_lookups_total``, by result."""
        self._subject = reply_subject
        self._session: aiohttp.ClientSession | None = None
        self._known: OrderedDict[int, Any] = OrderedDict()
        self._failed: OrderedDict[int, tuple[tuple[ErrorCode, str], float]] = OrderedDict()
        self._gate = asyncio.Semaphore(LOOKUPS_AT_ONCE)
        self._down_until = 0.0
        """Until then (``time.monotonic()``) the registry counts as unreachable."""
        self.reply_id = -1
        """The response schema's id (set on entry)."""

    async def __aenter__(self) -> Self:
        settings = self._settings
        headers = {"Accept": CONTENT_TYPE}
        if settings.username and settings.password is not None:
            pair = f"{settings.username}:{settings.password.get_secret_value()}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=settings.timeout_s),
            connector=aiohttp.TCPConnector(ssl=_ssl(settings)),
            headers=headers,
        )
        try:
            self.reply_id = await self._reply_schema()
        except BaseException:
            await self._session.close()
            raise
        log.info(
            "schema registry ready", url=redacted_url(settings.url), reply_schema_id=self.reply_id
        )
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def _reply_schema(self) -> int:
        """Register our response schema (or check the given id is it); its id."""
        ours = schema_text("inference_response")
        url = redacted_url(self._settings.url)
        given = self._settings.reply_schema_id
        try:
            if given is None:
                status, body = await self._call(
                    "POST", f"/subjects/{self._subject}/versions", {"schema": ours}
                )
                if status != 200 or not isinstance(body.get("id"), int):  # noqa: PLR2004
                    raise ConfigError(
                        f"schema registry {url} refused to register the response schema under "
                        f"{self._subject}: HTTP {status} {str(body)[:300]}"
                    )
                return int(body["id"])
            status, body = await self._call("GET", f"/schemas/ids/{given}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            problem = str(exc).replace(self._settings.url, url)  # aiohttp may name the URL
            raise ConfigError(
                f"schema registry {url} cannot be reached: {type(exc).__name__}: {problem}"
            ) from exc
        if status != 200 or _canonical(body.get("schema")) != _canonical(ours):  # noqa: PLR2004
            raise ConfigError(
                f"WORKER_SCHEMA_REGISTRY__REPLY_SCHEMA_ID={given} is not this worker's response "
                f"schema in {url} (HTTP {status}); register schemas/inference_response.avsc "
                "and give its id"
            )
        return given

    async def _call(
        self, method: str, path: str, payload: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        assert self._session is not None
        data = None if payload is None else json.dumps(payload)
        headers = None if payload is None else {"Content-Type": CONTENT_TYPE}
        async with self._session.request(
            method, self._settings.url + path, data=data, headers=headers
        ) as response:
            raw = await response.content.read(MAX_SCHEMA_BYTES + 1)
            if len(raw) > MAX_SCHEMA_BYTES:
                return response.status, {"error": f"answer over {MAX_SCHEMA_BYTES} bytes"}
            try:
                body = json.loads(raw) if raw else {}
            except (ValueError, RecursionError):  # not JSON, or nested past the parser
                body = {"error": raw[:200].decode(errors="replace")}
            return response.status, body if isinstance(body, dict) else {"error": str(body)[:200]}

    def writer(self, schema_id: int) -> Any:
        """The parsed writer schema of ``schema_id``; RequestError saying why if there is none."""
        schema = self._known.get(schema_id)
        if schema is not None:
            self._known.move_to_end(schema_id)
            return schema
        failed = self._failed.get(schema_id)
        if failed is not None:
            raise RequestError(*failed[0])  # a new one: a kept one would gather tracebacks
        raise RequestError(
            ErrorCode.UNAVAILABLE,
            f"schema id {schema_id} was not looked up before its record was read; send the "
            "request again",
        )

    async def prepare(self, records: Iterable[tuple[bytes | None, Headers]]) -> None:
        """Look up every new schema id of a fetched batch (a few at a time, one time budget)."""
        now = time.monotonic()
        for stale, (_, until) in list(self._failed.items()):
            if until < now:
                del self._failed[stale]
        wanted: dict[int, None] = {}  # distinct, in order of arrival
        for value, headers in records:
            schema_id = framed_schema_id(value)
            if (
                schema_id is None
                or schema_id in self._known
                or schema_id in self._failed
                or wire_format(value, headers) is not WireFormat.REGISTRY
            ):
                continue
            wanted[schema_id] = None
        if not wanted:
            return
        budget = self._settings.retry_s + self._settings.timeout_s
        try:
            async with asyncio.timeout(budget):
                await asyncio.gather(*(self._look_up(i) for i in wanted))
        except TimeoutError:
            late = [i for i in wanted if i not in self._known and i not in self._failed]
            log.warning("schema registry lookups out of time", ids=len(late), budget_s=budget)
            for schema_id in late:
                self._fail(
                    schema_id, ErrorCode.UNAVAILABLE,
                    f"schema id {schema_id} could not be looked up within {budget:.0f}s "
                    f"({len(wanted)} new ids arrived at once); send the request again",
                    REMEMBER_OUTAGE_S,
                )  # fmt: skip

    async def _look_up(self, schema_id: int) -> None:
        """Fetch one schema into the cache, or remember why it cannot be had."""
        deadline = time.monotonic() + self._settings.retry_s
        pause = 0.1
        async with self._gate:
            while True:
                if time.monotonic() < self._down_until:  # another lookup just gave up on it
                    self._count("unavailable")
                    self._fail(
                        schema_id, ErrorCode.UNAVAILABLE,
                        f"schema registry cannot be reached for schema id {schema_id}; send "
                        "the request again",
                        REMEMBER_OUTAGE_S,
                    )  # fmt: skip
                    return
                try:
                    status, body = await self._call("GET", f"/schemas/ids/{schema_id}")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    problem = f"schema registry cannot be reached ({type(exc).__name__})"
                else:
                    if status == 200:  # noqa: PLR2004
                        self._remember(schema_id, body)
                        self._count("ok" if schema_id in self._known else "missing")
                        return
                    if status == 404:  # noqa: PLR2004
                        self._count("missing")
                        self._fail(
                            schema_id, ErrorCode.INVALID_ARGUMENT,
                            f"schema id {schema_id} is not in the schema registry (404): the "
                            "producer's serializer registered it elsewhere, or it was deleted",
                            REMEMBER_MISSING_S,
                        )  # fmt: skip
                        return
                    problem = f"schema registry answered HTTP {status}"
                if time.monotonic() + pause > deadline:
                    log.warning("schema registry lookup failed", schema_id=schema_id, error=problem)
                    self._down_until = time.monotonic() + REMEMBER_OUTAGE_S
                    self._count("unavailable")
                    self._fail(
                        schema_id, ErrorCode.UNAVAILABLE,
                        f"{problem} for schema id {schema_id}; send the request again",
                        REMEMBER_OUTAGE_S,
                    )  # fmt: skip
                    return
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)

    def _count(self, result: str) -> None:
        if self._lookups is not None:
            self._lookups.labels(result).inc()

    def _remember(self, schema_id: int, body: dict[str, Any]) -> None:
        kind = body.get("schemaType", "AVRO")
        text = body.get("schema")
        try:
            if kind != "AVRO" or not isinstance(text, str):
                raise ValueError(f"a {kind} schema, not Avro")  # noqa: TRY301
            document = json.loads(text)
            problem = writer_problem(document)
            if problem:
                raise ValueError(f"refused: it {problem}")  # noqa: TRY301
            parsed = fastavro.parse_schema(document)
        except Exception as exc:  # noqa: BLE001 - any unusable schema is reported per record
            self._fail(
                schema_id, ErrorCode.INVALID_ARGUMENT,
                f"schema id {schema_id} cannot be read as an Avro schema: {str(exc)[:200]}",
                REMEMBER_MISSING_S,
            )  # fmt: skip
            return
        self._known[schema_id] = parsed
        while len(self._known) > self._settings.cache_size:
            self._known.popitem(last=False)

    def _fail(self, schema_id: int, code: ErrorCode, message: str, remember_s: float) -> None:
        self._failed[schema_id] = ((code, message), time.monotonic() + remember_s)
        while len(self._failed) > self._settings.cache_size:
            self._failed.popitem(last=False)


def _canonical(text: Any) -> str | None:
    try:
        return str(to_parsing_canonical_form(fastavro.parse_schema(json.loads(text))))
    except Exception:  # noqa: BLE001 - anything unparseable is simply not ours
        return None


def _ssl(settings: SchemaRegistrySettings) -> ssl.SSLContext | bool:
    """TLS for an https registry: its CA, and a client certificate for mutual TLS."""
    if not settings.url.startswith("https://"):
        return True  # aiohttp's default (plain http here)
    try:
        context = ssl.create_default_context(
            cafile=str(settings.ca_file) if settings.ca_file else None
        )
        if settings.cert_file is not None:
            context.load_cert_chain(settings.cert_file, settings.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"schema registry TLS files (WORKER_SCHEMA_REGISTRY__CA_FILE, __CERT_FILE, "
            f"__KEY_FILE): {type(exc).__name__}: {exc}"
        ) from None
    return context
