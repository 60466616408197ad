"""Where a request goes once it is in the worker, stated once for every origin.

::

    Source (a Kafka record, or a REST/gRPC request)
      └─ Pipeline.dispatch ─> admission.admit ─┬─ Answered: route(messages) now
                                               └─ Admitted ─┬─ strings pending ─> Tokenizing ─┐
                                                            └─────────────────────> Lanes <───┘
      Lanes: batch, run, answer ─> route(messages)

``route`` is the worker's: a record's messages go to the replier, a direct request's answer to
its caller. The worker (:mod:`worker.app`) builds one :class:`Pipeline` when it starts serving;
tests build the same one around the same stages with a route of their own, so the whole path
runs without Kafka.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worker.admission import Admitted, Limits, admit
from worker.domain import ErrorInfo, InferenceResponse
from worker.errors import ErrorCode
from worker.lanes import Lanes
from worker.outgoing import Destinations, Outgoing, Source
from worker.repository import ModelRepository
from worker.tokenizing import Tokenizing

__all__ = ["Pipeline", "router"]


@dataclass(frozen=True)
class Pipeline:
    """Admission, the tokenizer stage and the lanes, joined; answers go to ``route``."""

    repository: Callable[[], ModelRepository]
    """The repository serving now (a reload replaces it)."""
    limits: Limits
    destinations: Destinations
    tokenizing: Tokenizing
    lanes: Lanes
    route: Callable[[Sequence[Outgoing]], None]

    def dispatch(self, source: Source) -> None:
        """Admit one request; queue its job, or hand its answer to ``route`` now."""
        outcome = admit(
            source, self.repository(), self.limits, self.destinations,
            now=time.monotonic(), tokenize=False,
        )  # fmt: skip
        if isinstance(outcome, Admitted):
            if outcome.job.prepared.pending:  # a text model's strings: tokenised batch-wise
                self.tokenizing.put(outcome)
            else:
                self.lanes.put(outcome)
        else:
            self.route(outcome.outgoing)


def router(
    *,
    audit_topic: str,
    acknowledged: Callable[[Sequence[Outgoing]], None],
    publish: Callable[[list[Outgoing]], None] | None,
) -> Callable[[Sequence[Outgoing]], None]:
    """Where answers go: a record's to ``publish`` (the replier); a direct request's to its caller.

    A direct request's reply is handed to its caller and counted at once (``acknowledged``);
    its audit-topic record is published (not tracked: it has no offset). A direct request that
    got only a dead-letter copy (a bug answering its batch) gets an INTERNAL error naming the
    stage; the copy itself is not published (its caller has the error). ``publish`` None: no
    Kafka, nothing to publish.
    """

    def route(items: Sequence[Outgoing]) -> None:
        published: list[Outgoing] = []
        answered: list[Outgoing] = []
        failed: dict[int, Outgoing] = {}
        for item in items:
            respond = item.source.respond
            if respond is None:
                published.append(item)
            elif item.meta is not None and item.response is not None:
                respond(item.response, item.headers)
                answered.append(item)
            elif item.is_dead_letter:
                failed[id(item.source)] = item
            elif audit_topic and item.topic == audit_topic:
                published.append(item)
        for item in failed.values():  # respond() ignores a second answer to one request
            assert item.source.respond is not None
            item.source.respond(_failed(item), [])
        if answered:
            acknowledged(answered)
        if published and publish is not None:
            publish(published)

    return route


def _failed(copy: Outgoing) -> InferenceResponse:
    """The answer to a direct request whose only outcome was a dead-letter copy."""
    request = copy.source.request
    return InferenceResponse(
        id=copy.correlation_id or (request.id if request else ""),
        model_name=request.model_name if request else "",
        error=ErrorInfo(
            str(ErrorCode.INTERNAL),
            f"the worker failed at stage {copy.stage} answering this request; see its log",
        ),
    )
