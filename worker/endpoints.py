"""What the Open Inference Protocol endpoints (REST and gRPC) share.

The API they ask the worker (:class:`V2Api`: the repository, readiness, the direct path into
the lanes), the server's name, version and extensions, a model's V2 metadata, the bound on one
request's bytes, and the warning for an endpoint open to the network without TLS and client
authentication. The transports themselves are :mod:`worker.rest` and :mod:`worker.grpc_api`;
neither imports the other.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from worker.direct import Direct
from worker.endpoint_settings import EndpointSettings
from worker.repository import ModelRepository
from worker.settings import RuntimeSettings

__all__ = [
    "EXTENSIONS",
    "SERVER_NAME",
    "V2Api",
    "model_metadata",
    "request_bytes",
    "server_version",
    "warn_if_open",
]

log = structlog.get_logger(__name__)

SERVER_NAME = "kafka-inference-worker"
EXTENSIONS = ["binary_tensor_data"]


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


def request_bytes(settings: EndpointSettings) -> int:
    """The most bytes of one request an endpoint reads (its own bound, else the runtime's)."""
    if settings.max_request_bytes is not None:
        return settings.max_request_bytes
    return RuntimeSettings().max_request_bytes  # settings built outside Settings (tests)


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
