"""structlog on stderr (stdout stays for command output): JSON when not a terminal, console otherwise."""
from __future__ import annotations

import logging
import sys

import structlog


def _add_trace_ids(_logger: object, _name: str, event: dict) -> dict:
    try:
        from opentelemetry import trace

        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            event.setdefault("trace_id", format(ctx.trace_id, "032x"))
            event.setdefault("span_id", format(ctx.span_id, "016x"))
    except Exception:  # tracing is optional
        pass
    return event


def setup_logging(level: str = "INFO", fmt: str = "auto", service: str = "mp4totext") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_ids,
        lambda _l, _n, event: {"service": service, **event},
    ]
    renderer = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries log through stdlib logging: keep their warnings, in the same stream.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format='{"level":"%(levelname)s","logger":"%(name)s","event":"%(message)s"}'
                        if use_json else "%(levelname)s %(name)s: %(message)s")
