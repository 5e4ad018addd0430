"""The weekly usage report: the maintenance sweep enqueues one ``usage_report`` message per tenant
still without a report for the last complete ISO week; the actor (low queue) writes it once
(core.usage.weekly_report: a second run, a redelivery or another scheduler's message is a no-op)."""
from __future__ import annotations

import structlog

from core import usage
from core.queue import enqueue
from mp4totext.contracts import Priority, broker_priority

log = structlog.get_logger(__name__)

ACTOR = "usage_report"
MAX_PER_SWEEP = 1000  # tenants enqueued per sweep at most: the rest at the next one


def report(tenant_id: str) -> None:
    """The actor: the tenant's report for the last complete ISO week (idempotent)."""
    structlog.contextvars.bind_contextvars(stage=ACTOR, tenant_id=tenant_id)
    created = usage.weekly_report(tenant_id)
    log.info("stage_finished", outcome="reported" if created else "already_reported")


def enqueue_due() -> int:
    """Enqueue the report of every tenant that lacks last week's; returns how many."""
    week, _, end = usage.last_week()
    due = usage.tenants_due(week, end)[:MAX_PER_SWEEP]
    for tenant_id in due:
        enqueue(ACTOR, tenant_id, broker_priority(Priority.LOW))
    return len(due)
