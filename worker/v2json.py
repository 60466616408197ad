r"""KServe V2 JSON on Kafka: the body of ``POST /v2/models/{name}/infer``, as MLServer takes it.

A record with header ``content-type: application/json`` (or Seldon's ``seldon-infer-type:
json/inferModelRequest``) holds::

    {"id": "42", "parameters": {...},
     "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                 "data": [0.0, 3.0, ...]}]}

``data`` is flat (row-major) or nested; ``BYTES`` data are strings. The model is named by header
(:mod:`worker.v2`). The reply is the V2 response body, with ``content-type:
application/json``::

    {"id": "42", "model_name": "digits", "model_version": "2",
     "parameters": {"queue_us": 812, "compute_us": 95, "batch_size": 17},
     "outputs": [{"name": "label", "datatype": "INT64", "shape": [1], "data": [7]}]}

An error reply has ``"error": "<message>"`` (as V2 REST errors do) and its code in
``parameters.error_code``.

JSON can spell text that is not Unicode: a lone surrogate (the escape ``\ud800`` unpaired, or
its raw bytes, which Python's ``json`` passes through). Such a body is refused here, at the
boundary, so no id, name or string that cannot be written as UTF-8 ever reaches a reply.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import Any

from worker.domain import BYTES, InferenceRequest, InferenceResponse, Parameters, Tensor
from worker.errors import DecodeError, shown
from worker.v2 import (
    Headers,
    checked_shape,
    reply_parameters,
    request_id,
    request_model,
    tensor_from_values,
    tensor_values,
)

__all__ = [
    "CONTENT_TYPE",
    "decode_json_request",
    "encode_json_response",
    "encode_rest_response",
    "encode_rest_response_in_slices",
    "is_unicode",
    "parse_json_body",
    "request_from_body",
]

CONTENT_TYPE = "application/json"

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
"""A JSON escape of a surrogate (paired ones are fine; only then are the strings checked)."""
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def decode_json_request(
    value: bytes | memoryview, headers: Headers, key: bytes | None, *, binary: bytes = b""
) -> InferenceRequest:
    """A V2 JSON body (and its record's headers and key) as a request; DecodeError if not.

    ``binary``: the binary tensor extension's data after the JSON (REST only): an input whose
    ``parameters.binary_data_size`` is n takes the next n bytes of it as its raw data.
    """
    return request_from_body(parse_json_body(value), headers, key, binary=binary)


def parse_json_body(value: bytes | memoryview) -> dict[str, Any]:
    """The JSON object of a V2 body; DecodeError if it is not JSON or not an object."""
    raw = bytes(value)
    try:
        # Strict UTF-8 first: json.loads(bytes) would let encoded surrogates through.
        body = json.loads(raw.decode("utf-8-sig"), parse_constant=_not_json)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise DecodeError(f"record is not JSON in UTF-8: {str(exc)[:200]}") from exc
    if not isinstance(body, dict):
        raise DecodeError(f"V2 JSON request must be an object, not {type(body).__name__}")
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(body):
        raise DecodeError(
            "V2 JSON request holds a lone surrogate escape (\\ud800-\\udfff without its pair): "
            "that is not Unicode text and cannot be answered in UTF-8"
        )
    return body


def _not_json(literal: str) -> Any:
    """``NaN`` and ``Infinity`` are Python's extensions, not JSON: refused."""
    raise ValueError(f"{literal} is not a JSON value")


def is_unicode(text: str) -> bool:
    """False if ``text`` holds a lone surrogate: it cannot be written as UTF-8."""
    return _LONE_SURROGATE.search(text) is None


def _has_lone_surrogate(doc: Any) -> bool:
    """True if a string (key or value) anywhere in the parsed JSON ``doc`` holds one."""
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not is_unicode(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def request_from_body(
    body: dict[str, Any], headers: Headers, key: bytes | None, *, binary: bytes = b""
) -> InferenceRequest:
    """A parsed V2 body as a request (see :func:`decode_json_request`)."""
    try:
        return _request(body, headers, key, memoryview(binary))
    except DecodeError as exc:  # the error reply can still carry the id, if there is one
        given = body.get("id")
        exc.request_id = request_id(given if isinstance(given, str) else "", headers, key) or None
        raise


def _request(
    body: dict[str, Any], headers: Headers, key: bytes | None, binary: memoryview
) -> InferenceRequest:
    inputs = body.get("inputs")
    if not isinstance(inputs, list):
        raise DecodeError('V2 JSON request needs "inputs": a list of tensors')
    name, version = request_model(_text(body, "model_name"), _text(body, "model_version"), headers)
    tensors = []
    for i, raw in enumerate(inputs):
        if not isinstance(raw, dict):
            raise DecodeError(f"inputs[{i}] must be an object with name, datatype, shape, data")
        shape = raw.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise DecodeError(f"inputs[{i}].shape must be a list of whole numbers")
        name_, datatype = _text(raw, "name"), _text(raw, "datatype")
        size = _binary_size(raw.get("parameters"), f"inputs[{i}]")
        if size is not None:
            if size > len(binary):
                raise DecodeError(
                    f"inputs[{i}] declares {size} bytes of binary data; {len(binary)} are left"
                )
            dims = checked_shape(name_, shape)
            tensors.append(Tensor(name_, datatype, dims, bytes(binary[:size])))
            binary = binary[size:]
            continue
        if "data" not in raw:
            raise DecodeError(f"inputs[{i}] has no data")
        tensors.append(tensor_from_values(name_, datatype, shape, raw["data"]))
    if binary:
        raise DecodeError(f"{len(binary)} bytes of binary data are not claimed by any input")
    return InferenceRequest(
        id=request_id(_text(body, "id"), headers, key),
        model_name=name,
        model_version=version,
        inputs=tensors,
        parameters=_parameters(body.get("parameters")),
    )


def _binary_size(parameters: Any, where: str) -> int | None:
    """``parameters.binary_data_size`` of a tensor (the binary extension), if given."""
    if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
        return None
    size = parameters["binary_data_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise DecodeError(f"{where}.parameters.binary_data_size must be a whole number >= 0")
    return size


def _text(body: dict[str, Any], field: str) -> str:
    value = body.get(field, "")
    if not isinstance(value, str):
        raise DecodeError(f"{field} must be a string, not {type(value).__name__}")
    return value


def _parameters(raw: Any) -> Parameters | None:
    """Scalar parameters only (as in Avro); nested values are refused, not dropped."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise DecodeError("parameters must be an object")
    for key, value in raw.items():
        if not isinstance(value, str | int | float | bool):
            raise DecodeError(
                f"parameter {shown(key)} is {type(value).__name__}; parameters are strings, "
                "numbers or booleans"
            )
    return raw


def encode_json_response(response: InferenceResponse) -> bytes:
    """The V2 JSON response body for a reply (an error: ``error`` and its code)."""
    return json.dumps(_response_body(response, set()), separators=(",", ":")).encode()


def encode_rest_response(
    response: InferenceResponse, *, wanted: Sequence[str] = (), binary: Collection[str] = ()
) -> tuple[bytes, int | None]:
    """A REST infer response: the JSON, then raw data of the outputs named in ``binary``.

    ``wanted``: only these outputs (empty: all). Returns the body and the length of its JSON
    part when binary data follows (the ``Inference-Header-Content-Length`` header), else None.
    """
    outputs = [t for t in response.outputs if not wanted or t.name in wanted]
    chosen = replace(response, outputs=outputs)
    as_binary = {t.name for t in outputs if t.name in binary}
    header = json.dumps(_response_body(chosen, as_binary), separators=(",", ":")).encode()
    if not as_binary:
        return header, None
    blobs = [t.data for t in outputs if t.name in as_binary]
    return b"".join([header, *blobs]), len(header)


def _response_body(response: InferenceResponse, binary: set[str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": response.id,
        "model_name": response.model_name,
        "model_version": response.model_version or "",
        "parameters": reply_parameters(response),
    }
    if response.error is not None:
        body["error"] = response.error.message
        return body
    outputs = []
    for t in response.outputs:
        output: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if t.name in binary:
            output["parameters"] = {"binary_data_size": len(t.data)}
        else:
            output["data"] = tensor_values(t)
        outputs.append(output)
    body["outputs"] = outputs
    return body


def encode_rest_response_in_slices(
    response: InferenceResponse, *, wanted: Sequence[str] = (), binary: Collection[str] = (),
    values_per_slice: int = 8192,
) -> tuple[bytes, int | None]:  # fmt: skip
    """What :func:`~worker.v2json.encode_rest_response` makes, byte for byte, written in slices.

    ``json.dumps`` holds the interpreter lock for a whole list (a second for a million
    floats), so a thread writing a large reply in one call would stall the event loop as
    much as the loop itself; here each call writes ``values_per_slice`` values, and the lock
    is given up between them.
    """
    outputs = [t for t in response.outputs if not wanted or t.name in wanted]
    as_binary = {t.name for t in outputs if t.name in binary}
    everything = replace(response, outputs=outputs)
    skeleton, header_length = encode_rest_response(everything, binary=[t.name for t in outputs])
    if not outputs:
        return skeleton, None
    assert header_length is not None
    meta = json.loads(skeleton[:header_length])
    described = meta.pop("outputs")
    parts = [_dumps(meta)[:-1], ',"outputs":[']
    for i, (tensor, output) in enumerate(zip(outputs, described, strict=True)):
        parts.append("," if i else "")
        if tensor.name in as_binary:
            parts.append(_dumps(output))
            continue
        del output["parameters"]  # binary_data_size: this one goes as JSON data
        parts += [_dumps(output)[:-1], ',"data":[', *_value_slices(tensor, values_per_slice)]
        parts.append("]}")
    parts.append("]}")
    header = "".join(parts).encode()
    if not as_binary:
        return header, None
    blobs = [t.data for t in outputs if t.name in as_binary]
    return b"".join([header, *blobs]), len(header)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _value_slices(tensor: Tensor, size: int) -> list[str]:
    """A tensor's values as JSON, ``size`` values a call, joined by commas (no brackets)."""
    if tensor.datatype == BYTES:
        values: Any = tensor_values(tensor)  # Python code: gives up the lock as it goes
    else:
        values = tensor.to_numpy().ravel()
    out: list[str] = []
    for start in range(0, len(values), size):
        chunk = values[start : start + size]
        text = _dumps(chunk if isinstance(chunk, list) else chunk.tolist())
        out += ["," if out else "", text[1:-1]]
    return out
