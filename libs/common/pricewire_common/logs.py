"""structlog configuration: JSON lines in production, a console renderer on a terminal."""

from __future__ import annotations

import logging
import re
import sys

import structlog
from opentelemetry import trace

from pricewire_common.config import LogFormat

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_NO_TRACE = "0" * 32


def add_trace_ids(_logger: object, _method: str, event_dict: structlog.types.EventDict) -> structlog.types.EventDict:
    """`trace_id` and `span_id` (W3C hex) of the span current when the line is logged, if there is one.

    With none, a line that names a message's `traceparent` (logged about that message, such as its
    rejection) gets that trace's `trace_id` and the sender's span as `parent_span_id`: a message that was
    traced is found in the logs by its trace id even where no span of this service was sampled for it.
    """
    parent = event_dict.pop("traceparent", None)
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict["trace_id"] = format(context.trace_id, "032x")
        event_dict["span_id"] = format(context.span_id, "016x")
    elif isinstance(parent, str) and (ids := _TRACEPARENT.fullmatch(parent)) and ids[1] != _NO_TRACE:
        event_dict["trace_id"], event_dict["parent_span_id"] = ids[1], ids[2]
    return event_dict


def configure_logging(*, level: str = "info", fmt: LogFormat = "auto") -> None:
    """Configure structlog once, at start. Call it from `__main__` or the CLI only."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_ids,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
