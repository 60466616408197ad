"""The settings of the worker's HTTP endpoints: metrics and probes, and the inference endpoints.

:class:`HttpSettings` is the metrics and health port (``WORKER_HTTP__*``);
:class:`EndpointSettings` what the Open Inference Protocol endpoints share (address, TLS,
bearer token, request bounds), specialised by :class:`RestSettings` (``WORKER_REST__*``) and
:class:`GrpcSettings` (``WORKER_GRPC__*``). Part of :class:`worker.settings.Settings` (which
re-exports these and fills in an endpoint's ``max_request_bytes``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, FilePath, SecretStr, model_validator

__all__ = ["EndpointSettings", "GrpcSettings", "HttpSettings", "RestSettings"]


class HttpSettings(BaseModel):
    """The metrics and health endpoint."""

    enabled: bool = True
    host: str = "0.0.0.0"  # noqa: S104 - probes and Prometheus reach a container from outside
    port: int = Field(default=9464, ge=0, le=65535)
    """``/metrics``, ``/healthz``, ``/readyz``; 0 picks a free port."""
    port_file: Path | None = None
    """Once serving, the bound port is written here (process mode sets it for each child)."""


class EndpointSettings(BaseModel):
    """An Open Inference Protocol endpoint (REST or gRPC): off unless enabled."""

    enabled: bool = False
    host: str = "0.0.0.0"  # noqa: S104 - callers reach a container from outside
    port: int = Field(default=0, ge=0, le=65535)
    """0 picks a free port (tests)."""
    reuse_port: bool = False
    """Share the port with other processes (SO_REUSEPORT; the kernel spreads connections):
    process mode sets it for its children. Off: a port in use is a start-up error."""
    cert_file: FilePath | None = None
    """PEM server certificate: serve TLS (with ``key_file``)."""
    key_file: FilePath | None = None
    client_ca_file: FilePath | None = None
    """PEM CA of client certificates: mutual TLS, a client without one is refused."""
    token: SecretStr | None = None
    """Bearer token every call must carry (``authorization: Bearer ...``), best from the
    secrets folder; health checks excepted. None: no token asked."""
    request_timeout_s: float = Field(default=60.0, gt=0)
    """How long a request without a deadline may wait for its answer (its body's arrival
    included, over REST)."""
    max_request_bytes: int | None = Field(default=None, ge=1)
    """Most bytes of one request as received: a REST body (after any Content-Encoding), a gRPC
    message; a larger one is refused before it is read (413 / RESOURCE_EXHAUSTED). None:
    ``runtime.max_request_bytes``, filled in when :class:`Settings` is built."""

    @model_validator(mode="after")
    def _tls(self) -> EndpointSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (TLS)")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("client_ca_file (mutual TLS) needs cert_file and key_file")
        return self

    @property
    def secured(self) -> bool:
        """Clients are authenticated (a token, or client certificates) over TLS."""
        return self.cert_file is not None and (
            self.token is not None or self.client_ca_file is not None
        )


class RestSettings(EndpointSettings):
    """KServe V2 REST (``/v2/...``), on Triton's default HTTP port."""

    port: int = Field(default=8000, ge=0, le=65535)
    max_connections: int = Field(default=256, ge=1)
    """Most open connections (HTTP/1.1: each carries one request at a time); one more is
    answered 503 and closed."""
    body_timeout_s: float = Field(default=10.0, gt=0)
    """Longest wait for a request's body once its headers arrived (a shorter
    ``Request-Timeout-Ms`` shortens it): a client that sends slowly or not at all holds its
    place of the in-flight bound at most this long, then gets 408."""


class GrpcSettings(EndpointSettings):
    """``inference.GRPCInferenceService``, on Triton's default gRPC port."""

    port: int = Field(default=8001, ge=0, le=65535)
    max_concurrent_rpcs: int = Field(default=512, ge=1)
    """Most calls being served at once; one more is refused RESOURCE_EXHAUSTED at once."""
