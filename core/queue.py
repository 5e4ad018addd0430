"""The queue interface both sides use: the Dramatiq broker, and sending work by actor name.

Servers enqueue without loading any worker code: a message names its actor and goes to the
actor's queue (``core.plan.ROUTES``); workers register the actors that consume it.
"""
from __future__ import annotations

from typing import Mapping

import dramatiq
import pika.exceptions
import structlog
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.errors import BrokerError

from core import failures
from core.plan import QUEUES, ROUTES, message_priority
from mp4totext.config import Settings
from mp4totext.contracts import BROKER_MAX_PRIORITY
from observability import middleware, tracing
from storage.db import database

_broker: dramatiq.Broker | None = None
log = structlog.get_logger(__name__)


def _broker_outage(exc: BaseException) -> bool:
    return isinstance(exc, (pika.exceptions.AMQPError, BrokerError))


failures.register(_broker_outage)

def make_broker(settings: Settings) -> dramatiq.Broker:
    """Create the broker (RabbitMQ, or in-process for embedded mode) and make it the global one."""
    global _broker
    broker: dramatiq.Broker
    if settings.broker_url == "memory":
        broker = StubBroker()
        broker.emit_after("process_boot")
    else:
        broker = RabbitmqBroker(url=settings.broker_url, confirm_delivery=True, max_priority=BROKER_MAX_PRIORITY)
    middleware.install(broker, database)
    for queue in QUEUES:
        broker.declare_queue(queue)
    dramatiq.set_broker(broker)
    _broker = broker
    return broker


def get_broker() -> dramatiq.Broker:
    if _broker is None:
        raise RuntimeError("broker not set up: call core.queue.make_broker() at start-up")
    return _broker


def enqueue(actor: str, object_id: str, priority: int, trace_context: Mapping[str, str] | None = None,
            delay_ms: int | None = None) -> None:
    """Send ``actor(object_id)`` for a job of broker ``priority`` (publish confirmed by RabbitMQ;
    finishing messages go first, see core.plan.message_priority).

    ``trace_context`` (a job's stored context) parents the message's PRODUCER span; ``delay_ms``
    holds the message back that long (Dramatiq's delay queue).
    """
    message = dramatiq.Message(queue_name=ROUTES[actor], actor_name=actor, args=(object_id,), kwargs={},
                               options={"broker_priority": message_priority(actor, priority)})
    with tracing.attached(trace_context):
        get_broker().enqueue(message, delay=delay_ms)


def queue_depths() -> dict[str, int]:
    """Messages each queue holds, ready or delayed (a delayed retry still counts), by queue name;
    a queue whose depth cannot be read is left out. Messages a consumer holds unacknowledged
    (prefetched or being worked on) are not counted: RabbitMQ does not report them this way."""
    broker = get_broker()
    depths: dict[str, int] = {}
    for queue in QUEUES:
        try:
            if isinstance(broker, RabbitmqBroker):
                ready, delayed, _dead = broker.get_queue_message_counts(queue)
            elif isinstance(broker, StubBroker):
                ready = broker.queues[queue].qsize()
                delayed = broker.queues[dramatiq.common.dq_name(queue)].qsize()
            else:
                continue
        except Exception as exc:  # a depth is an optimisation; the sweep then re-sends as before
            log.warning("queue_depth_unreadable", queue=queue, error=f"{type(exc).__name__}: {exc}")
            continue
        depths[queue] = ready + delayed
    return depths
