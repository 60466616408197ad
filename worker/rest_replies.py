"""Writing a REST call's reply: the HTTP status of each error code, the V2 JSON or binary body.

An error reply is ``{"error": "..."}`` with the status of its code (:data:`HTTP_STATUS`); a
result is V2 JSON, or the binary tensor extension (``Inference-Header-Content-Length``: the
JSON's length, then raw tensor bytes) for the outputs asked for as binary data. A reply with
more than :data:`ENCODE_ON_LOOP_VALUES` JSON values is written in the endpoint's codec thread,
a slice at a time, so that no reply holds the event loop for long.
"""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from worker.domain import InferenceResponse
from worker.errors import ErrorCode
from worker.rest_requests import HEADER_LENGTH
from worker.v2json import encode_rest_response, encode_rest_response_in_slices

__all__ = ["ENCODE_ON_LOOP_VALUES", "HTTP_STATUS", "error_reply", "result_reply"]

HTTP_STATUS = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
}
"""The HTTP status of each error code (REST); gRPC uses the status code of the same name."""

ENCODE_ON_LOOP_VALUES = 8192
"""Replies with up to this many JSON values are written on the event loop; larger ones in the
codec thread, a slice of this many values at a time (each slice a few milliseconds)."""


def error_reply(status: int, message: str) -> web.Response:
    """``{"error": message}`` with ``status``."""
    return web.json_response({"error": message}, status=status)


async def result_reply(
    response: InferenceResponse, wanted: list[str], binary: set[str], codec: ThreadPoolExecutor
) -> web.Response:
    """The reply to an infer call: its error, or the outputs in ``wanted`` (empty: all).

    ``binary``: outputs written as binary data (``*``: all of them).
    """
    if response.error is not None:
        code = ErrorCode(response.error.code)
        return error_reply(HTTP_STATUS.get(code, 500), response.error.message)
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
