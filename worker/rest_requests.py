"""Reading a REST infer call: its headers, its body within the endpoint's bounds, the request.

The binary tensor extension's ``Inference-Header-Content-Length`` (:data:`HEADER_LENGTH`) and
the deadline (:data:`TIMEOUT_HEADER`) are read before the body (:func:`call_headers`); the body
is read within the request's wait and the byte bound (:func:`received`: 408, 413), then
decoded into the request, the outputs it asks for and those wanted as binary data
(:func:`decode_body`). A call refused on the way is a :class:`RefusedError` carrying its HTTP
status, which :mod:`worker.rest` answers.

An aiohttp request in, plain values out: nothing here reaches the pipeline. Decoding is plain
Python, run in the endpoint's codec thread for bodies over :data:`DECODE_ON_LOOP_BYTES`.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from aiohttp import web

from worker.domain import InferenceRequest
from worker.errors import DecodeError, detached
from worker.v2json import is_unicode, parse_json_body, request_from_body

__all__ = [
    "DECODE_ON_LOOP_BYTES",
    "HEADER_LENGTH",
    "PASSED_HEADERS",
    "TIMEOUT_HEADER",
    "RefusedError",
    "call_headers",
    "decode_body",
    "received",
    "requested_outputs",
    "whole_number",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
TIMEOUT_HEADER = "Request-Timeout-Ms"
"""A REST request's deadline, in milliseconds from now."""
PASSED_HEADERS = ("traceparent", "tracestate", "correlation_id")
"""HTTP request headers handed on with the request (trace context continues)."""
DECODE_ON_LOOP_BYTES = 16 << 10
"""Bodies up to this size are parsed on the event loop (at most a few milliseconds); larger
ones in the endpoint's codec thread."""


class RefusedError(Exception):
    """An infer call answered with an error status before it reached the pipeline."""

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


def call_headers(request: web.Request, model: str) -> tuple[int | None, float | None]:
    """The binary header's length and the timeout, read before the body; RefusedError if bad."""
    split = request.headers.get(HEADER_LENGTH)
    header_length = None if split is None else whole_number(split)
    if split is not None and header_length is None:
        raise RefusedError(400, f"{HEADER_LENGTH} must be a whole number of bytes within the body")
    try:
        timeout_s = _timeout(request)
    except DecodeError as exc:
        raise RefusedError(400, detached(exc).message) from None  # no cycle left behind
    if not is_unicode(model):
        raise RefusedError(400, "the model name or version in the URL is not UTF-8 text")
    return header_length, timeout_s


async def received(request: web.Request, wait_s: float, max_bytes: int) -> bytes:
    """The body, within ``wait_s`` and ``max_bytes``; RefusedError (408, 413) if not."""
    try:
        async with asyncio.timeout(wait_s):
            body = await _read_body(request, max_bytes)
    except TimeoutError:
        raise RefusedError(
            408, f"the request body did not arrive within {wait_s:.1f} s", close=True
        ) from None
    if body is None:
        raise RefusedError(413, _too_large(request.content_length, max_bytes))
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


def decode_body(
    body: bytes, length: int, headers: list[tuple[str, bytes]]
) -> tuple[InferenceRequest, list[str], set[str]]:
    """The request, the outputs it asks for and those wanted binary; RefusedError (400) if bad.

    The refusal keeps only the decode error's message: no traceback, so no cycle through the
    frames that read the body is left for the collector.
    """
    try:
        parsed = parse_json_body(memoryview(body)[:length])  # once, for inputs and outputs
        decoded = request_from_body(parsed, headers, None, binary=body[length:])
        wanted, binary = requested_outputs(parsed)
    except DecodeError as exc:
        raise RefusedError(400, detached(exc).message) from None
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


def requested_outputs(body: dict[str, Any]) -> tuple[list[str], set[str]]:
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
