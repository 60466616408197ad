"""Every exception the worker raises, under one root.

The tree::

    WorkerError                     root of everything raised by this package
    ├── ConfigError             settings, model repository or topics unusable at start-up
    ├── ConnectError            no broker reached, TLS refused or authentication failed
    ├── WatchdogError           no progress while there was work: exit so a supervisor restarts
    ├── DeviceLostError         the model's device cannot run anything more: exit to restart
    ├── DrainTimeoutError       a stop did not finish within the shutdown timeout
    ├── FencedError             another worker joined the group with this one's instance id
    ├── RequestError            one request cannot be served; ``code`` goes into its reply
    │   └── DecodeError         the record's bytes are not a request at all
    └── ClientError             raised by :mod:`worker.client` to the caller
        ├── ReplyTimeoutError   no reply arrived in time
        └── ReplyError          the worker answered with an error (``code``, ``message``)

Behaviour lives in attributes, not in more types: a :class:`RequestError` carries its
:class:`ErrorCode`, which the reply repeats so that clients can branch on it; a
:class:`ConnectError` says whether trying again may help (``retriable``); ``hard_exit`` and
``exit_code`` say how the command line ends the process.
"""

from __future__ import annotations

import enum
from typing import TypeVar

__all__ = [
    "SHOWN_CHARS",
    "ClientError",
    "ConfigError",
    "ConnectError",
    "DecodeError",
    "DeviceLostError",
    "DrainTimeoutError",
    "ErrorCode",
    "FencedError",
    "ReplyError",
    "ReplyTimeoutError",
    "RequestError",
    "WatchdogError",
    "WorkerError",
    "cut",
    "detached",
    "shown",
]

_E = TypeVar("_E", bound=BaseException)

_MAX_CHAIN = 100
"""Most chained exceptions :func:`detached` walks (a chain is a few links; this only bounds it)."""

SHOWN_CHARS = 80
"""Longest request-supplied string repeated in an error message or a log line."""


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` of at most ``limit`` characters of a request-supplied string.

    Strings of any length are safe in messages and logs this way; a cut says how much was
    left out.
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}...({len(value) - limit} more characters)"


def cut(text: str) -> str:
    """``text`` as it is if short (a shape, a byte count: ``[1, 64]``), else cut by :func:`shown`.

    A hostile shape of many dimensions never makes a message long.
    """
    return text if len(text) <= SHOWN_CHARS else shown(text)


class ErrorCode(enum.StrEnum):
    """Codes carried in ``InferenceResponse.error.code`` (named after gRPC status codes)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    """The request is malformed: bad bytes, dtype, shape, byte length or input name."""
    NOT_FOUND = "NOT_FOUND"
    """No such model, or no such version of it."""
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    """The request's deadline passed before its batch ran; the model was not run for it."""
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    """The request is over a size limit (record bytes or tensor elements)."""
    INTERNAL = "INTERNAL"
    """The model raised while computing this request."""
    UNAVAILABLE = "UNAVAILABLE"
    """The worker cannot serve this request now (for example, it is shutting down)."""


class WorkerError(Exception):
    """Root of every exception raised by the ``worker`` package."""

    hard_exit = False
    """End the process at once (``os._exit``): a model call may be stuck in a thread that an
    orderly interpreter exit would wait for forever."""
    exit_code = 1
    """The command line's exit status for this error."""


class ConfigError(WorkerError):
    """Settings, the model repository or the Kafka topics are not usable; raised at start-up."""

    exit_code = 2
    """``serve``: a restart cannot help (process mode stops on it); other commands exit 1."""

    @classmethod
    def cannot_listen(
        cls, what: str, address: str, setting: str, reason: str | None
    ) -> ConfigError:
        """An endpoint whose address cannot be bound (``reason``: the OS's, if it said one)."""
        reason = reason or "the port is in use, or the address is not this machine's"
        return cls(f"the {what} cannot listen on {address}: {reason}; {setting} chooses the port")


class ConnectError(WorkerError):
    """No bootstrap server could be reached, or TLS or SASL authentication failed.

    ``retriable``: False when the cause is the configuration (untrusted certificate, wrong
    password, TLS against a plaintext listener): retrying would only hide it.
    """

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


class WatchdogError(WorkerError):
    """The worker made no progress for too long while it had work; its supervisor restarts it."""

    hard_exit = True
    exit_code = 3


class DeviceLostError(WorkerError):
    """A model's device failed in a way its context cannot recover from (CUDA's sticky errors).

    A device-side assert, an illegal memory access or a launch failure leaves the process's
    CUDA context broken: every later call on it fails. Retrying would only fail every later
    batch, so the worker stops (what was answered is committed; the batch that failed, and
    anything not answered, is served again by the partitions' next owner) and its supervisor
    starts a fresh process.
    """

    hard_exit = True
    exit_code = 4


class DrainTimeoutError(WorkerError):
    """A stop did not finish within ``shutdown_timeout_s``.

    What was done is committed; the rest is served again by the next owner of the partitions.
    """

    hard_exit = True


class FencedError(WorkerError):
    """Another member joined the group with this worker's ``group_instance_id``.

    Static membership needs an id unique to each worker; two workers sharing one keep fencing
    each other out of the group, so this one stops with an error saying so.
    """


class RequestError(WorkerError):
    """One request cannot be served; answered with an error reply carrying ``code``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DecodeError(RequestError):
    """A record's value is not a decodable inference request.

    INVALID_ARGUMENT, unless decoding failed for a reason of the moment (UNAVAILABLE: the
    schema registry could not be reached).
    """

    def __init__(self, message: str, *, code: ErrorCode = ErrorCode.INVALID_ARGUMENT) -> None:
        super().__init__(code, message)
        self.request_id: str | None = None
        """The correlation id, when the record got far enough to name one (V2 bodies)."""


class ClientError(WorkerError):
    """Raised by :class:`worker.client.InferenceClient` to its caller."""


class ReplyTimeoutError(ClientError):
    """No reply for the request arrived within the timeout."""


class ReplyError(ClientError):
    """The worker answered the request with an error reply."""

    def __init__(self, request_id: str, code: str, message: str) -> None:
        super().__init__(f"request {request_id} failed with {code}: {message}")
        self.request_id = request_id
        self.code = code
        self.message = message


def detached(exc: _E) -> _E:
    """``exc`` without tracebacks (its own, its chain's) or chain, to be kept after it was handled.

    A traceback references the frames that raised, and so their locals: a record's bytes, a
    forward pass's tensors. Its frames reference the exception back, so an exception kept in an
    answer is a garbage cycle that holds all of that until the collector runs (the worker defers
    young collections: :mod:`worker.heap`). Only the type and message are reported (replies,
    dead-letter headers); log the traceback, if wanted, before detaching.
    """
    chain: list[BaseException] = [exc]  # the chained ones' frames are cycles of their own
    seen: set[int] = set()
    while chain and len(seen) < _MAX_CHAIN:
        current = chain.pop()
        if id(current) not in seen:
            seen.add(id(current))
            chain += [e for e in (current.__cause__, current.__context__) if e is not None]
            if isinstance(current, BaseExceptionGroup):
                chain += current.exceptions
            current.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None
    return exc
