"""Admission: from a fetched record to a job for a lane, or the messages that answer it now.

One plain function, :func:`admit`, no Kafka client and no event loop::

    origin ─> decode (a record's bytes; a call comes decoded) ─> limits
        ─> priority class ─> route (primary + optional shadow) ─> validate
        ─> Admitted(job, shadow job)          for the lanes (worker.lanes)
        ─> Answered([error reply])            over a limit, unknown model, bad tensor
        ─> Answered([DECODE failure, reply?]) not a request at all (a reply too if the record
                                              has a correlation_id header)

The pipeline (:mod:`worker.pipeline`) calls it once per request of any origin and acts on the
outcome; tests call it by the hundred without a broker.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import structlog

from worker.answers import Answer, Stage, error_response
from worker.domain import InferenceRequest
from worker.errors import SHOWN_CHARS, DecodeError, ErrorCode, RequestError, detached, shown
from worker.formats import Codecs
from worker.headers import header
from worker.model import LoadedModel, Prepared
from worker.model_config import MAX_SHAPE_DIMENSIONS
from worker.origins import Origin, Record
from worker.outgoing import Destinations
from worker.priority import Priority, choose
from worker.repository import ModelRepository
from worker.shadow import Comparison
from worker.v2 import MAX_ID_BYTES

__all__ = ["Admitted", "Answered", "Job", "Limits", "admit", "check_limits"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request may ask for (``WORKER_RUNTIME__*``)."""

    max_request_bytes: int
    max_request_elements: int
    default_timeout_ms: int = 0
    """Deadline for requests without ``deadline_ms``, from the record's timestamp (0: none)."""


@dataclass(slots=True)
class Job:
    """A decoded, validated request waiting for its batch (or a shadow copy of one)."""

    origin: Origin
    request: InferenceRequest
    model: LoadedModel
    prepared: Prepared
    """Its inputs as the program takes them (tokenised, checked), and their length."""
    enqueued: float
    """When it was admitted (``time.monotonic()``): queue wait is measured from here."""
    deadline_ms: int | None
    comparison: Comparison | None = None
    is_shadow: bool = False
    priority: Priority = Priority.NORMAL
    """Its class in the batcher (:mod:`worker.priority`)."""
    cache_key: bytes | None = None
    """Its inputs' key in its version's response cache, once looked up (:mod:`worker.caching`)."""


@dataclass(slots=True)
class Admitted:
    """A job for its version's lane, and a copy for the shadow's lane if it has one."""

    job: Job
    shadow: Job | None = None


@dataclass(slots=True)
class Answered:
    """The request is answered without running a model."""

    answers: list[Answer]


def admit(
    origin: Origin,
    repository: ModelRepository,
    limits: Limits,
    destinations: Destinations,
    codecs: Codecs,
    *,
    now: float,
    tokenize: bool = True,
) -> Admitted | Answered:
    """Decide what happens to one request (``now``: ``time.monotonic()``).

    ``tokenize=False``: a text model's strings are checked but left pending (the worker
    tokenises them batch-wise in :mod:`worker.tokenizing`); see ``Job.prepared.pending``.

    Never raises: an unexpected exception (a bug) is the last-resort guard's, which fails the
    request at stage ``ADMISSION`` (a record is dead-lettered, naming the exception).
    """
    try:
        return _admit(origin, repository, limits, destinations, codecs, now=now, tokenize=tokenize)
    except Exception as exc:
        log.exception("admitting a request raised; it failed", origin=origin.where())
        return Answered([Answer(origin, failed=Stage.ADMISSION, error=detached(exc))])


def _admit(
    origin: Origin,
    repository: ModelRepository,
    limits: Limits,
    destinations: Destinations,
    codecs: Codecs,
    *,
    now: float,
    tokenize: bool,
) -> Admitted | Answered:
    if isinstance(origin, Record):
        try:
            request = codecs.decode(origin.value, origin.headers, origin.key)
        except DecodeError as exc:
            return Answered(_undecodable(origin, exc))
        requested = destinations.requested(origin.headers)
        if requested is not None and not destinations.allows(requested):
            refused = RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"reply topic {shown(requested)} is not allowed (WORKER_KAFKA__REPLY_TOPICS "
                f"lists the allowed ones); this reply goes to {destinations.replies_topic!r}",
            )
            return Answered([Answer(origin, error_response(request, refused))])
    else:
        request = origin.request
    if not request.id:
        # Answered under the record's correlation_id header, if any: an empty id matches nothing.
        raw_id = header(origin.headers, "correlation_id")
        request = replace(request, id=raw_id.decode(errors="replace") if raw_id else "")
        empty = RequestError(
            ErrorCode.INVALID_ARGUMENT,
            "request id is empty; set it to a correlation id (the reply carries it)",
        )
        return Answered([Answer(origin, error_response(request, empty))])
    if len(request.id) > MAX_ID_BYTES:
        # Answered under its first MAX_ID_BYTES characters: never a megabyte of log or header.
        long_id = RequestError(
            ErrorCode.INVALID_ARGUMENT,
            f"request id is {len(request.id)} characters; at most {MAX_ID_BYTES} are accepted",
        )
        request = replace(request, id=request.id[:MAX_ID_BYTES])
        return Answered([Answer(origin, error_response(request, long_id))])
    route = None
    try:
        check_limits(limits, origin, request)
        default = Priority.NORMAL if isinstance(origin, Record) else Priority.HIGH
        priority = choose(origin.headers, request.parameters, default)
        route = repository.route(request.model_name, request.model_version, request.id)
        prepared = route.primary.validate(request, tokenize=tokenize)
    except RequestError as exc:
        detached(exc)  # its chain's frames (the request's arrays) are cycles of their own
        log.info(
            "request answered with an error",
            correlation_id=request.id[:SHOWN_CHARS],
            model=request.model_name[:SHOWN_CHARS],
            code=str(exc.code),
            error=exc.message,
        )
        response = error_response(request, exc)
        if route is not None:  # the version that refused it
            response = replace(response, model_version=route.primary.version)
        served = repository.serves(response.model_name, response.model_version)
        return Answered([Answer(origin, response, served=served)])
    deadline = request.deadline_ms
    if deadline is None and limits.default_timeout_ms:
        deadline = origin.timestamp_ms + limits.default_timeout_ms
    model = route.primary
    job = Job(origin, request, model, prepared, now, deadline, priority=priority)
    return Admitted(job, _shadow_copy(job, route.shadow, tokenize=tokenize))


def _shadow_copy(job: Job, shadow: LoadedModel | None, *, tokenize: bool) -> Job | None:
    """The shadow's copy of a job (None: no shadow, or the shadow's tokenizer refused it)."""
    if shadow is None:
        return None
    prepared = job.prepared
    if shadow.text is not None:  # the shadow may tokenise differently
        try:
            prepared = shadow.validate(job.request, tokenize=tokenize)
        except RequestError as exc:
            detached(exc)  # no cycle left behind (see _admit)
            return None
    model = job.model
    output = shadow.config.routing.shadow_compare or shadow.config.outputs[-1].name
    job.comparison = Comparison(model.name, model.version, shadow.version, output)
    return replace(job, model=shadow, prepared=prepared, is_shadow=True)


def check_limits(limits: Limits, origin: Origin, request: InferenceRequest) -> None:
    """Raise before any allocation for a request over a size limit or with impossible shapes.

    Over ``max_request_bytes`` or ``max_request_elements``: RESOURCE_EXHAUSTED; a negative
    dimension or more than :data:`MAX_SHAPE_DIMENSIONS`: INVALID_ARGUMENT. Counting stops as soon as
    the total passes the limit, so no shape of any size or value makes this slow or makes its
    message unprintable.
    """
    if isinstance(origin, Record):
        size = len(origin.value or b"")
    else:  # a call (REST, gRPC): its tensors' bytes
        size = sum(len(t.data) for t in origin.request.inputs)
    if size > limits.max_request_bytes:
        raise RequestError(
            ErrorCode.RESOURCE_EXHAUSTED,
            f"request is {size} bytes; this worker serves at most "
            f"{limits.max_request_bytes} (WORKER_RUNTIME__MAX_REQUEST_BYTES)",
        )
    budget = limits.max_request_elements
    total = 0
    for tensor in request.inputs:
        shape = tensor.shape
        if len(shape) > MAX_SHAPE_DIMENSIONS:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"input {shown(tensor.name)} has {len(shape)} dimensions; at most "
                f"{MAX_SHAPE_DIMENSIONS} are accepted",
            )
        if shape and min(shape) < 0:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"input {shown(tensor.name)} has a negative dimension in its shape",
            )
        count = 0 if 0 in shape else 1
        for dim in shape:
            count *= dim
            if total + count > budget:
                raise RequestError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"inputs declare more than {budget} elements in all; this worker serves at "
                    "most that many (WORKER_RUNTIME__MAX_REQUEST_ELEMENTS)",
                )
        total += count


def _undecodable(record: Record, exc: DecodeError) -> list[Answer]:
    """A DECODE failure (a dead-letter copy); an error reply too if the record names an id."""
    exc = detached(exc)  # kept in the answer: not with the frames (and bytes) that raised it
    raw_id = header(record.headers, "correlation_id")
    if exc.request_id:  # a V2 body's own id
        raw_id = exc.request_id.encode()
    raw_id = raw_id[:MAX_ID_BYTES] if raw_id is not None else None
    log.warning(
        "undecodable record dead-lettered",
        partition=record.tp.partition,
        offset=record.offset,
        error=exc.message,
        correlation_id=raw_id[:SHOWN_CHARS].decode(errors="replace") if raw_id else None,
    )
    if raw_id is None:
        return [Answer(record, failed=Stage.DECODE, error=exc)]
    request = InferenceRequest(id=raw_id.decode(errors="replace"), model_name="", inputs=[])
    return [Answer(record, error_response(request, exc), failed=Stage.DECODE, error=exc)]
