"""Open Inference Protocol Protobuf on Kafka: ``ModelInferRequest`` in, ``ModelInferResponse`` out.

A record with header ``content-type: application/x-protobuf`` (also ``application/protobuf``,
or Seldon's ``seldon-infer-type: proto/InferModelRequest``) holds a serialised
``inference.ModelInferRequest`` (:mod:`worker.oip`, generated from the protocol's proto). Each
input's values come from ``raw_input_contents`` (the same little-endian bytes as Avro; BYTES
elements each a 4-byte length then the bytes) or from its typed ``contents``. The model is the
message's ``model_name``/``model_version``, else the record's headers (:mod:`worker.v2`).

The reply is a ``ModelInferResponse`` with ``content-type: application/x-protobuf``; outputs
travel in ``raw_output_contents``, as Triton sends them. The message has no error field (gRPC
puts errors in the call status): an error reply has no outputs and parameters ``error_code``
and ``error`` (string parameters); timing is in ``queue_us``, ``compute_us``, ``batch_size``.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import DecodeError as ProtobufDecodeError

from worker.domain import BYTES, InferenceRequest, InferenceResponse, Parameters, Tensor
from worker.errors import DecodeError, shown
from worker.oip import pb
from worker.v2 import (
    Headers,
    checked_shape,
    reply_parameters,
    request_id,
    request_model,
    tensor_from_values,
)

__all__ = [
    "CONTENT_TYPE",
    "CONTENT_TYPES",
    "decode_proto_request",
    "encode_proto_response",
    "request_from_message",
    "response_message",
]

CONTENT_TYPE = "application/x-protobuf"
CONTENT_TYPES = (CONTENT_TYPE, "application/protobuf", "application/vnd.google.protobuf")
"""Content types read as a Protobuf ``ModelInferRequest``."""

_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    BYTES: "bytes_contents",
}  # fmt: skip
"""The typed field each datatype's values travel in (FP16 has none: raw contents only)."""


def decode_proto_request(value: bytes, headers: Headers, key: bytes | None) -> InferenceRequest:
    """A serialised ``ModelInferRequest`` as a request; DecodeError if it is not one."""
    message = pb.ModelInferRequest()
    try:
        message.ParseFromString(value)
    except (ProtobufDecodeError, RecursionError, ValueError) as exc:
        raise DecodeError(f"record is not a Protobuf ModelInferRequest: {exc}") from exc
    return request_from_message(message, headers, key)


def request_from_message(message: Any, headers: Headers, key: bytes | None) -> InferenceRequest:
    """A ``ModelInferRequest`` (parsed) as a request; DecodeError saying what is wrong."""
    try:
        return _request(message, headers, key)
    except DecodeError as exc:
        exc.request_id = request_id(message.id, headers, key) or None
        raise


def _request(message: Any, headers: Headers, key: bytes | None) -> InferenceRequest:
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise DecodeError(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs; "
            "give one per input, or none (typed contents)"
        )
    tensors = []
    for i, tensor in enumerate(message.inputs):
        shape = checked_shape(tensor.name, tensor.shape)
        if raw:
            tensors.append(Tensor(tensor.name, tensor.datatype, shape, bytes(raw[i])))
            continue
        field = _CONTENTS.get(tensor.datatype)
        if field is None:
            raise DecodeError(
                f"input {shown(tensor.name)}: datatype {shown(tensor.datatype)} has no typed "
                "contents; send it in raw_input_contents"
            )
        values = getattr(tensor.contents, field)
        tensors.append(tensor_from_values(tensor.name, tensor.datatype, shape, list(values)))
    name, version = request_model(message.model_name, message.model_version, headers)
    return InferenceRequest(
        id=request_id(message.id, headers, key),
        model_name=name,
        model_version=version,
        inputs=tensors,
        parameters=_parameters(message.parameters),
    )


def _parameters(given: Any) -> Parameters | None:
    if not given:
        return None
    out: Parameters = {}
    for name, parameter in given.items():
        which = parameter.WhichOneof("parameter_choice")
        if which is not None:
            out[name] = getattr(parameter, which)
    return out


def encode_proto_response(response: InferenceResponse) -> bytes:
    """The ``ModelInferResponse`` for a reply (an error: no outputs, ``error_code``/``error``)."""
    return bytes(response_message(response).SerializeToString())


def response_message(response: InferenceResponse) -> Any:
    """The ``ModelInferResponse`` message of a reply."""
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version or "",
        id=response.id,
    )  # fmt: skip
    params = reply_parameters(response)
    if response.error is not None:
        params["error"] = response.error.message
    for name, value in params.items():
        _set(message.parameters[name], value)
    for tensor in response.outputs:
        message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        message.raw_output_contents.append(tensor.data)
    return message


def _set(parameter: Any, value: str | float) -> None:  # bool and int are among them
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = value
