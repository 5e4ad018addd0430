"""Dramatiq broker and actor registration.

Queue names and ``max_priority`` are fixed: RabbitMQ refuses to redeclare an existing
queue with another x-max-priority (PRECONDITION_FAILED), so changing them needs a migration.
"""
from __future__ import annotations

from typing import Any, Callable

import dramatiq
import structlog
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import q_name
from dramatiq.middleware import CurrentMessage, Middleware, Retries, TimeLimit

from mp4totext.config import Settings
from observability import metrics
from observability.tracing import TracingMiddleware

# "diarize" is a high-priority queue of its own: only workers installed with the diarize
# extra (torch + pyannote.audio) consume it, so servers and transcription workers stay small.
QUEUES = ("critical", "high", "diarize", "default", "low")
MAX_PRIORITY = 10
# Client priority (proto Priority enum value) -> broker_priority within a queue.
PRIORITY_MAP = {0: 5, 1: 2, 2: 5, 3: 7, 4: 10}

_actors: dict[str, dramatiq.Actor] = {}
_broker: dramatiq.Broker | None = None


class JobLogContext(Middleware):
    """Fresh structlog context per message (Dramatiq runs actors on reused threads)."""

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


class MetricsMiddleware(Middleware):
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


def setup_broker(settings: Settings) -> dramatiq.Broker:
    """Create the broker, register the actors on it and make it the global broker."""
    global _broker
    if settings.broker_url == "memory":
        broker: dramatiq.Broker = StubBroker()
        broker.emit_after("process_boot")
    else:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        broker = RabbitmqBroker(url=settings.broker_url, confirm_delivery=True, max_priority=MAX_PRIORITY)
    for mw in broker.middleware:
        if isinstance(mw, Retries):
            mw.min_backoff = settings.retry_min_backoff_ms
            mw.max_backoff = settings.retry_max_backoff_ms
            # The DB attempt counter decides; this only stops a message looping forever.
            mw.max_retries = settings.max_attempts + 2
        if isinstance(mw, TimeLimit):
            mw.time_limit = settings.job_time_limit_s * 1000
    broker.add_middleware(CurrentMessage())
    broker.add_middleware(JobLogContext())
    # Before Retries: "after" hooks run in reverse, so these see message.failed and the
    # retry is enqueued while the failed attempt's span is still current.
    broker.add_middleware(MetricsMiddleware(), before=Retries)
    broker.add_middleware(TracingMiddleware(), before=Retries)
    dramatiq.set_broker(broker)
    _broker = broker
    _register(broker, settings)
    return broker


def _register(broker: dramatiq.Broker, settings: Settings) -> None:
    from workers import actors

    def declare(fn: Callable[..., Any], name: str, queue: str, time_limit_s: int) -> None:
        _actors[name] = dramatiq.actor(
            fn,
            actor_name=name,
            queue_name=queue,
            broker=broker,
            time_limit=time_limit_s * 1000,
            throws=(actors.JobFailed,),
        )

    declare(actors.prepare_media, "prepare_media", "critical", settings.prepare_time_limit_s)
    declare(actors.transcribe_job, "transcribe", "high", settings.job_time_limit_s + 60)
    declare(actors.diarize_job, "diarize", "diarize", settings.diarization_time_limit_s + 60)
    declare(actors.finalize, "finalize", "critical", 60)
    declare(actors.maintenance, "maintenance", "low", 600)


def get_actor(name: str) -> dramatiq.Actor:
    if name not in _actors:
        raise RuntimeError("broker not set up: call workers.broker.setup_broker() at start-up")
    return _actors[name]


def get_broker() -> dramatiq.Broker:
    if _broker is None:
        raise RuntimeError("broker not set up")
    return _broker
