"""One structlog processor chain for our events and for stdlib/Dramatiq/grpc records alike.

JSON when not a terminal (or ``MP4T_LOG_FORMAT=json``), console otherwise; every line has a
timestamp, level, logger, service, the bound context (job, message, RPC ids) and the current
trace/span ids. Logs go to stderr (stdout stays for command output), or to a file.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from opentelemetry import trace

# Our packages log at the configured level; libraries only from WARNING up.
OUR_LOGGERS = ("mp4totext", "core", "server", "workers", "storage", "observability", "launch")


def _add_trace_ids(_logger: object, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event.setdefault("span_id", format(ctx.span_id, "016x"))
    return event


def _service(service: str) -> Any:
    def add(_logger: object, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("service", service)
        return event

    return add


def setup_logging(level: str = "INFO", fmt: str = "auto", service: str = "mp4totext",
                  file: str | None = None, stream: TextIO | None = None) -> None:
    """Configure structlog and stdlib logging once for the process (safe to call again)."""
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and (file is not None or not stream.isatty()))
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_ids,
        _service(service),
    ]
    renderer = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    )
    handler: logging.Handler = logging.FileHandler(file, encoding="utf-8") if file else logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(numeric)
