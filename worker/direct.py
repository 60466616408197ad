"""Requests that arrive outside Kafka (REST, gRPC), fed into the same path as records.

:meth:`Direct.infer` makes a :class:`~worker.origins.Call` of a request its endpoint decoded
(its transport, a sequence number, the caller's trace headers) and hands it to the pipeline's
dispatch (:mod:`worker.pipeline`): the same admission, routing (versions, canary, shadow),
validation, lanes and batches as a Kafka record; its answer comes back through the call's
``respond``, never encoded for Kafka, and its audit record and metrics name its transport. A
batch may mix Kafka and direct requests.

Backpressure: calls count toward ``max_in_flight`` together with the Kafka records in flight
(:class:`~worker.inflight.InFlight`); at the bound a new one is refused at once with
RESOURCE_EXHAUSTED (HTTP 429), never queued. A request holds its :class:`Place` from before its
body is read (REST takes it with :meth:`Direct.take`) until its answer is produced, whether or
not its caller still waits: a caller that gives up (its timeout, a cancelled call) leaves its
job queued, and the job keeps its place until it leaves the batcher or tokenizer. A deadline
(gRPC's, or the REST ``Request-Timeout-Ms`` header) becomes the request's ``deadline_ms``: past
it, the request is answered DEADLINE_EXCEEDED without running.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from worker.domain import ErrorInfo, InferenceRequest, InferenceResponse
from worker.errors import ErrorCode
from worker.inflight import InFlight
from worker.origins import Call

__all__ = ["Answer", "Direct", "Place"]

GRACE_S = 5.0
"""How long past its deadline a caller waits for the answer (the answer says why it is late)."""


class Place:
    """One place of the in-flight bound, held by one direct request.

    Given back by :meth:`release` while its request was not dispatched (refused, or its body
    unreadable); once dispatched, only the request's answer gives it back, so a job whose
    caller left still counts until it leaves the batcher or tokenizer.
    """

    __slots__ = ("_direct", "_held", "dispatched")

    def __init__(self, direct: Direct) -> None:
        self._direct = direct
        self._held = True
        self.dispatched = False
        """Its request was handed to the pipeline: only its answer gives the place back."""

    def release(self) -> None:
        """Give the place back, unless its request was dispatched (its answer does that)."""
        if not self.dispatched:
            self.answered()

    def answered(self) -> None:
        """The request's answer is produced: give the place back (once)."""
        if self._held:
            self._held = False
            self._direct.in_flight.calls -= 1

    def __enter__(self) -> Place:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class Direct:
    """Admits calls through ``dispatch`` (the pipeline's); bounded with the records in flight."""

    def __init__(self, dispatch: Callable[[Call], None], in_flight: InFlight) -> None:
        self._dispatch = dispatch
        self.in_flight = in_flight
        """The bound shared with the records; ``in_flight.calls`` counts the calls holding a
        place: being read or decoded, or dispatched and not yet answered (whether or not their
        callers still wait)."""
        self._numbers = itertools.count()
        self.closing = False
        """The worker is stopping: new requests are answered UNAVAILABLE."""

    @property
    def pending(self) -> int:
        """Calls holding a place of the in-flight bound."""
        return self.in_flight.calls

    def room(self) -> int:
        """Requests that may still be taken in (Kafka records and calls together)."""
        return self.in_flight.room()

    def take(self) -> Place | None:
        """A place of the in-flight bound for a request about to be read; None when full."""
        if self.room() <= 0:
            return None
        self.in_flight.calls += 1
        return Place(self)

    @property
    def full_message(self) -> str:
        """Why a request is refused at the bound (RESOURCE_EXHAUSTED, HTTP 429)."""
        return (
            f"the worker holds {self.in_flight.limit} requests in flight "
            "(WORKER_RUNTIME__MAX_IN_FLIGHT); "
            "send again later"
        )

    async def infer(
        self,
        transport: str,
        request: InferenceRequest,
        headers: Sequence[tuple[str, bytes]] = (),
        *,
        timeout_s: float | None = None,
        wait_s: float = 60.0,
        place: Place | None = None,
    ) -> Answer:
        """Serve one request; its response (errors included: see ``response.error``).

        ``timeout_s``: the caller's deadline, from now; ``wait_s``: how long to wait for an
        answer when there is none. ``place``: one taken (:meth:`take`) before the request was
        read; without one, one is taken now (RESOURCE_EXHAUSTED when none is left). Returning
        early (the wait over, or the caller cancelled) leaves a dispatched request its place.
        """
        if self.closing:
            if place is not None:
                place.release()
            return Answer(_error(request, ErrorCode.UNAVAILABLE, "the worker is stopping"))
        if place is None:
            place = self.take()
            if place is None:
                return Answer(_error(request, ErrorCode.RESOURCE_EXHAUSTED, self.full_message))
        now_ms = int(time.time() * 1000)
        if not request.id:  # optional over REST and gRPC; the answer carries the one given
            request = replace(request, id=uuid.uuid4().hex)
        if timeout_s is not None:
            deadline = now_ms + int(timeout_s * 1000)
            if request.deadline_ms is None or deadline < request.deadline_ms:
                request = replace(request, deadline_ms=deadline)
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        held = place

        def respond(response: InferenceResponse, headers: list[tuple[str, bytes]]) -> None:
            held.answered()  # the job has left the batcher or tokenizer
            if not future.done():
                future.set_result(Answer(response, headers))

        call = Call(transport, next(self._numbers), request, list(headers), now_ms, respond)
        place.dispatched = True
        try:
            self._dispatch(call)
        except BaseException:
            place.answered()  # not queued: nothing will answer it
            raise
        wait = (timeout_s if timeout_s is not None else wait_s) + GRACE_S
        try:
            async with asyncio.timeout(wait):
                return await future
        except TimeoutError:
            late = f"no answer within {wait:.1f} s"
            return Answer(_error(request, ErrorCode.DEADLINE_EXCEEDED, late))


@dataclass(frozen=True, slots=True)
class Answer:
    """What a direct request gets: its response, and the reply's headers (``traceparent``)."""

    response: InferenceResponse
    headers: list[tuple[str, bytes]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """One reply header as text (``traceparent``), if present."""
        value = dict(self.headers).get(name)
        return value.decode(errors="replace") if value is not None else None


def _error(request: InferenceRequest, code: ErrorCode, message: str) -> InferenceResponse:
    return InferenceResponse(
        id=request.id, model_name=request.model_name, model_version=request.model_version,
        error=ErrorInfo(str(code), message),
    )  # fmt: skip
