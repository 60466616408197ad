"""What the pipeline decides for a request, before anything is encoded or sent.

Every stage (admission, the tokenizer stage, the lanes) ends a request with an :class:`Answer`:
its response, or the :class:`Stage` where it failed (a record that is not a request at all, or
a bug a last-resort guard caught), or both (an undecodable record that names a correlation id
gets an error reply and a dead-letter copy). The stages hand answers to the pipeline
(:data:`Deliver`), which sends each where its origin says (:mod:`worker.pipeline`): a Kafka
record's as messages on topics (:mod:`worker.outgoing`), a direct call's to its caller.

The responses themselves are built here too (:func:`error_response`, :func:`expired_response`,
:func:`model_response`), and :class:`ReplyMeta` says what metrics and the audit trail need to
know about a reply, whatever its origin. Nothing here knows a wire format or a client.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

import structlog

from worker.domain import ErrorInfo, InferenceRequest, InferenceResponse, Tensor, Timing
from worker.errors import SHOWN_CHARS, ErrorCode, RequestError
from worker.origins import Call, Origin
from worker.records import record
from worker.tracing import Trace

__all__ = [
    "UNSERVED",
    "Answer",
    "Deliver",
    "ReplyMeta",
    "Settled",
    "Stage",
    "error_response",
    "expired_response",
    "failed_response",
    "model_response",
    "reply_meta",
    "safe_text",
]

log = structlog.get_logger(__name__)

UNSERVED = "_unserved"
"""The ``model`` and ``version`` metric label of replies about a model or version not served:
labels come only from the repository, never from what a request names."""


class Stage(enum.StrEnum):
    """Where a request failed without a reply of its own (``__connect.errors.stage``)."""

    FETCH = "FETCH"
    """The Kafka client could not parse the record (its bytes are unknown: only its place)."""
    DECODE = "DECODE"
    """The value is not a request at all."""
    REPLY_PUBLISH = "REPLY_PUBLISH"
    """The reply could not be published."""
    ADMISSION = "ADMISSION"
    """Admitting the record raised unexpectedly (a bug): the last-resort guard copied it."""
    TOKENIZE = "TOKENIZE"
    """Tokenising its strings raised unexpectedly (a bug): the last-resort guard copied it."""
    BATCH = "BATCH"
    """Answering its batch raised unexpectedly (a bug): the last-resort guard copied it."""


@record
class Answer:
    """One request's outcome: a response, a failure, or both (see the module docstring)."""

    origin: Origin
    response: InferenceResponse | None = None
    failed: Stage | None = None
    """Where it failed; the record is then dead-lettered (a call gets INTERNAL)."""
    error: BaseException | None = None
    """Why it failed (with ``failed``)."""
    batch_id: str | None = None
    served: bool = False
    """The response's model and version are served here, so they may label metrics."""


Deliver = Callable[[Sequence[Answer]], None]
"""Where every stage hands its answers: the pipeline's :meth:`~worker.pipeline.Pipeline.deliver`.
All answers of one request come in one call."""


@record
class ReplyMeta:
    """What metrics and the audit trail need to know about a reply."""

    model: str
    """The model the request named (cut to a bounded length), for the audit trail."""
    version: str
    outcome: str
    """``ok`` or the reply's error code."""
    trace_id: str
    batch_id: str | None
    queue_s: float | None = None
    compute_s: float | None = None
    labels: tuple[str, str] = (UNSERVED, UNSERVED)
    """Metric labels (model, version): a served version's, or :data:`UNSERVED`."""
    refused_topic: bool = False
    """The request named a reply topic it may not use; this reply went to the default one."""


class Settled(Protocol):
    """An acknowledged answer as metrics and the audit trail see it (a message, or a call's)."""

    @property
    def origin(self) -> Origin:
        """The request it answers."""

    @property
    def meta(self) -> ReplyMeta | None:
        """For a reply: what it answered; None for anything else."""

    @property
    def stage(self) -> Stage | None:
        """For a dead-letter copy: where the record failed."""

    @property
    def correlation_id(self) -> str | None:
        """The id the answer carries."""

    @property
    def topic(self) -> str | None:
        """The topic it went to; None: to its caller."""


def reply_meta(
    answer: Answer, response: InferenceResponse, trace: Trace, *, refused_topic: bool = False
) -> ReplyMeta:
    """What metrics and the audit trail need to know about ``response``, sent for ``answer``."""
    timing = response.timing
    model, version = response.model_name[:SHOWN_CHARS], (response.model_version or "")[:SHOWN_CHARS]
    return ReplyMeta(
        model=model,
        version=version,
        outcome=response.error.code if response.error else "ok",
        trace_id=trace.trace_id,
        batch_id=answer.batch_id,
        queue_s=timing.queue_us / 1e6 if timing else None,
        compute_s=timing.compute_us / 1e6 if timing else None,
        labels=(model, version) if answer.served else (UNSERVED, UNSERVED),
        refused_topic=refused_topic,
    )


def error_response(request: InferenceRequest, exc: RequestError) -> InferenceResponse:
    """An error reply to ``request`` carrying the error's code and message."""
    return InferenceResponse(
        id=request.id,
        model_name=request.model_name,
        model_version=request.model_version,
        error=ErrorInfo(str(exc.code), exc.message),
    )


def expired_response(
    request: InferenceRequest,
    version: str,
    deadline_ms: int,
    now_ms: float,
    *,
    before: str = "its batch ran",
) -> InferenceResponse:
    """DEADLINE_EXCEEDED from ``version``: the deadline passed ``before`` (the batch ran)."""
    response = error_response(
        request,
        RequestError(
            ErrorCode.DEADLINE_EXCEEDED,
            f"deadline {deadline_ms} (Unix ms) passed {now_ms - deadline_ms:.0f} ms before "
            f"{before}; the model was not run",
        ),
    )
    return replace(response, model_version=version)


def model_response(
    request: InferenceRequest,
    model: str,
    version: str,
    result: list[Tensor] | Exception,
    timing: Timing,
    *,
    truncated: int = 0,
) -> InferenceResponse:
    """The reply for a request the model ran on: its outputs, or the error its rows raised.

    A :class:`RequestError` keeps its code (RESOURCE_EXHAUSTED: too big for the device's
    memory on its own); anything else the model raised is INTERNAL.

    ``truncated``: strings the tokenizer cut to its maximum length, said in the reply's
    parameters (``truncated``) when there were any.
    """
    if not isinstance(result, Exception):
        return InferenceResponse(
            id=request.id,
            model_name=model,
            model_version=version,
            outputs=result,
            timing=timing,
            parameters={"truncated": truncated} if truncated else None,
        )
    log.error(
        "model raised on a request",
        correlation_id=request.id[:SHOWN_CHARS],
        model=model,
        version=version,
        error=repr(result),
    )
    if isinstance(result, RequestError):
        error = ErrorInfo(str(result.code), result.message)
    else:
        error = ErrorInfo(
            str(ErrorCode.INTERNAL),
            f"model {model} v{version} failed on this request: {type(result).__name__}: {result}",
        )
    return InferenceResponse(
        id=request.id, model_name=model, model_version=version, error=error, timing=timing
    )


def safe_text(response: InferenceResponse) -> InferenceResponse:
    """``response`` with its text made something every format carries (lone surrogates: ``?``).

    Request text is checked when decoded, but a model or handler may raise with any text in
    its message; a caller's answer must never fail to encode (the code is kept).
    """
    texts = (response.id, response.model_name, response.model_version or "")
    message = response.error.message if response.error is not None else ""
    if all(_carried(t) for t in (*texts, message)):
        return response
    error = response.error
    return replace(
        response,
        id=_made_safe(response.id),
        model_name=_made_safe(response.model_name),
        model_version=_made_safe(response.model_version) if response.model_version else None,
        error=None if error is None else ErrorInfo(error.code, _made_safe(error.message)),
    )


def _carried(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _made_safe(text: str) -> str:
    return text.encode(errors="replace").decode()


def failed_response(call: Call, stage: Stage) -> InferenceResponse:
    """What a call gets when its only outcome is a failure at ``stage`` (a bug): INTERNAL."""
    return InferenceResponse(
        id=call.request.id,
        model_name=call.request.model_name,
        error=ErrorInfo(
            str(ErrorCode.INTERNAL),
            f"the worker failed at stage {stage} answering this request; see its log",
        ),
    )
