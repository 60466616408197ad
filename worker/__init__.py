"""Asynchronous Kafka inference worker: Avro requests, dynamic batches, PyTorch, replies.

The public API is what ``__all__`` lists; modules are importable for advanced use, but only
these names are promised to stay.
"""

from worker.client import InferenceClient
from worker.codec import decode_request, decode_response, encode_request, encode_response
from worker.domain import ErrorInfo, InferenceRequest, InferenceResponse, Tensor, Timing
from worker.errors import (
    ClientError,
    ConfigError,
    DecodeError,
    ErrorCode,
    ReplyError,
    ReplyTimeoutError,
    RequestError,
    WorkerError,
)
from worker.settings import Settings, load_settings

__all__ = [
    "ClientError",
    "ConfigError",
    "DecodeError",
    "ErrorCode",
    "ErrorInfo",
    "InferenceClient",
    "InferenceRequest",
    "InferenceResponse",
    "ReplyError",
    "ReplyTimeoutError",
    "RequestError",
    "Settings",
    "Tensor",
    "Timing",
    "WorkerError",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "load_settings",
]
