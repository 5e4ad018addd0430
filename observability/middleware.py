"""Every Dramatiq middleware of ours, and the one function that installs them on a broker.

- ``LogContext``: a fresh structlog context per message (actors run on reused threads).
- ``DbConnections``: one database connection per message, opened before and closed after
  it (returned to the pool), so stages never leak a connection whatever they raise.
- ``Metrics``: messages enqueued/processed by outcome, retries and dead letters.
- ``TracingMiddleware``: PRODUCER span on enqueue, CONSUMER span around processing.

Retry counts, backoff and time limits are per-actor options (``workers.actors``), read by
Dramatiq's own ``Retries`` and ``TimeLimit`` middlewares.
"""
from __future__ import annotations

import threading
from typing import Any

import dramatiq
import structlog
from dramatiq.common import q_name
from dramatiq.middleware import CurrentMessage, Middleware, Retries
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from observability import metrics, tracing


class LogContext(Middleware):
    """Fresh structlog context per message, bound to its id, actor, queue and retry count."""

    def before_process_message(self, broker: Any, message: Any) -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            message_id=message.message_id, actor=message.actor_name, queue=message.queue_name,
            retries=message.options.get("retries", 0),
        )

    def after_process_message(self, broker: Any, message: Any, *, result: Any = None,
                              exception: BaseException | None = None) -> None:
        structlog.contextvars.clear_contextvars()

    after_skip_message = after_process_message


class DbConnections(Middleware):
    """Open the database connection a message uses; close it (back to the pool) when it is done."""

    def __init__(self, database: Any) -> None:
        self.database = database

    def before_process_message(self, broker: Any, message: Any) -> None:
        self.database.connect(reuse_if_open=True)

    def after_process_message(self, broker: Any, message: Any, *, result: Any = None,
                              exception: BaseException | None = None) -> None:
        if not self.database.is_closed():
            self.database.close()

    after_skip_message = after_process_message


class Metrics(Middleware):
    """Messages enqueued/processed by outcome, retries and dead letters (Prometheus)."""

    def after_enqueue(self, broker: Any, message: Any, delay: Any) -> None:
        metrics.ENQUEUED.labels(message.actor_name, q_name(message.queue_name)).inc()

    def after_process_message(self, broker: Any, message: Any, *, result: Any = None,
                              exception: BaseException | None = None) -> None:
        actor, queue = message.actor_name, q_name(message.queue_name)
        if exception is None:
            outcome = "ok"
        elif message.failed:
            outcome = "failed"
            metrics.DEAD_LETTERS.labels(actor).inc()
        else:
            outcome = "retry"
            metrics.RETRIES.labels(actor).inc()
        metrics.MESSAGES.labels(actor, queue, outcome).inc()

    def after_skip_message(self, broker: Any, message: Any) -> None:
        metrics.MESSAGES.labels(message.actor_name, q_name(message.queue_name), "skipped").inc()


def _messaging_attrs(message: Any) -> dict[str, Any]:
    return {
        "messaging.system": "rabbitmq",
        "messaging.destination.name": message.queue_name,
        "messaging.message.id": message.message_id,
        "messaging.dramatiq.actor": message.actor_name,
        "messaging.dramatiq.retries": int(message.options.get("retries", 0)),
        "messaging.dramatiq.priority": message.options.get("broker_priority"),
        "mp4t.object_id": str(message.args[0]) if message.args else None,
    }


class TracingMiddleware(Middleware):
    """PRODUCER span on enqueue (context into the message), CONSUMER span around processing.

    Add it *before* Retries (``broker.add_middleware(m, before=Retries)``): "after" hooks run
    in reverse order, so Retries then re-enqueues while the failed attempt's span is current.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._producing: dict[str, trace.Span] = {}
        self._lock = threading.Lock()

    # -- producer side
    def before_enqueue(self, broker: Any, message: Any, delay: Any) -> None:
        with self._lock:
            if message.message_id in self._producing:  # publish retried after a connection error
                return
        attrs = {k: v for k, v in _messaging_attrs(message).items() if v is not None}
        if delay:
            attrs["messaging.dramatiq.delay_ms"] = int(delay)
        # Re-published without a current span (a delayed retry moved from the delay queue by the
        # worker's consumer thread): stay in the trace the message already belongs to.
        parent = None
        if not trace.get_current_span().get_span_context().is_valid:
            parent = tracing.extract(message.options.get(tracing.OPTION_KEY))
        span = tracing.tracer().start_span(f"{message.actor_name} publish", context=parent, kind=SpanKind.PRODUCER,
                                   attributes=attrs)
        if not span.get_span_context().is_valid:
            return
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        message.options[tracing.OPTION_KEY] = carrier
        with self._lock:
            self._producing[message.message_id] = span
            if len(self._producing) > 10000:  # enqueue that raised: never leak spans
                self._producing.clear()

    def after_enqueue(self, broker: Any, message: Any, delay: Any) -> None:
        with self._lock:
            span = self._producing.pop(message.message_id, None)
        if span is not None:
            span.end()

    # -- consumer side
    def before_process_message(self, broker: Any, message: Any) -> None:
        parent = tracing.extract(message.options.get(tracing.OPTION_KEY))
        span = tracing.tracer().start_span(f"{message.actor_name} process", context=parent, kind=SpanKind.CONSUMER,
                                   attributes={k: v for k, v in _messaging_attrs(message).items() if v is not None})
        token = otel_context.attach(trace.set_span_in_context(span))
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        stack.append((message.message_id, span, token))

    def after_process_message(self, broker: Any, message: Any, *, result: Any = None,
                              exception: BaseException | None = None) -> None:
        stack = getattr(self._local, "stack", None)
        if not stack or stack[-1][0] != message.message_id:
            return
        _mid, span, token = stack.pop()
        if exception is not None:
            span.record_exception(exception)
            span.set_status(Status(StatusCode.ERROR, f"{type(exception).__name__}: {exception}"[:200]))
            span.set_attribute("mp4t.outcome", "failed" if message.failed else "retry")
        else:
            span.set_attribute("mp4t.outcome", "ok")
        span.end()
        try:
            otel_context.detach(token)
        except Exception:
            pass

    def after_skip_message(self, broker: Any, message: Any) -> None:
        self.after_process_message(broker, message)


def install(broker: dramatiq.Broker, database: Any) -> None:
    """Add our middlewares to ``broker`` (its defaults, Retries and TimeLimit included, stay)."""
    broker.add_middleware(CurrentMessage())
    broker.add_middleware(LogContext())
    broker.add_middleware(DbConnections(database))
    # Before Retries: "after" hooks run in reverse, so these see message.failed and the
    # retry is enqueued while the failed attempt's span is still current.
    broker.add_middleware(Metrics(), before=Retries)
    broker.add_middleware(TracingMiddleware(), before=Retries)
