"""Logging set-up: structlog for our events, the standard library's records routed through it.

JSON lines when stderr is not a TTY (containers, CI), readable console lines on a TTY. In a
child of ``serve --processes`` every line carries the child's index (``child``), as the
parent's lines about that child do.
"""

from __future__ import annotations

import logging
import sys
from functools import partial

import structlog

from worker.settings import LogSettings

__all__ = ["configure_logging"]


def configure_logging(settings: LogSettings) -> None:
    """Configure structlog and the standard library (aiokafka logs through it) once."""
    as_json = settings.format == "json" or (settings.format == "auto" and not sys.stderr.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if settings.child is not None:  # a child of serve --processes: its lines say which
        shared.append(partial(_add_child, settings.child))
    # No local variables in tracebacks (rich's default): a record's payload would be printed
    # in every frame that holds it.
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    )
    structlog.configure(
        processors=[
            # First, so that a filtered-out event (debug per batch) costs no formatting.
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info if as_json else _passthrough,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # aiokafka is chatty at INFO (every connection, every group join); keep its warnings.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))


def _add_child(
    child: int, _logger: object, _name: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    event.setdefault("child", child)
    return event


def _passthrough(
    _logger: object, _name: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    return event
