"""The low-queue maintenance sweep, and the scheduler that enqueues it on low-queue workers."""
from __future__ import annotations

import datetime as dt
import threading

import structlog

from core import enhancements, jobs, plan, registry, runtime, upload_sessions
from core.queue import enqueue
from mp4totext.contracts import Priority, broker_priority
from workers import usage_reports, webhooks

log = structlog.get_logger(__name__)


def sweep(_unused: str = "") -> None:
    """Abort stale multipart uploads, forget dead workers, re-enqueue work whose message was lost."""
    rt = runtime.get()
    s = rt.settings
    structlog.contextvars.bind_contextvars(stage="maintenance")
    expired_sessions = upload_sessions.expire()  # abandoned resumable uploads: parts aborted, row gone
    aborted = rt.store.abort_stale_uploads(dt.timedelta(seconds=s.stale_upload_s),
                                           keep=upload_sessions.live_upload_ids())
    stuck_media, stuck_jobs = jobs.stuck(dt.timedelta(seconds=s.stuck_after_s))
    stuck_items = enhancements.stuck(dt.timedelta(seconds=s.stuck_after_s))
    registry.forget_dead_workers()
    # Recovered work continues the trace it belongs to.
    for m in stuck_media:
        enqueue("prepare_media", m.id, broker_priority(Priority.NORMAL), m.trace_context)
    for j in stuck_jobs:
        enqueue(plan.actor_for(j.stage), j.id, j.priority, j.trace_context)
    for item_id, priority, trace_context in stuck_items:
        enqueue(enhancements.ACTOR, item_id, priority, trace_context)
    requeued_webhooks = webhooks.requeue_due()  # retries the schedule left to the sweep, lost messages
    usage_reports.enqueue_due()  # last week's usage report of each tenant still without one
    log.info("stage_finished", outcome="maintenance", aborted_uploads=aborted, expired_upload_sessions=expired_sessions,
             requeued=len(stuck_media) + len(stuck_jobs) + len(stuck_items), requeued_webhooks=requeued_webhooks)


def schedule(interval_s: float, stop: threading.Event) -> threading.Thread:
    """Enqueue the sweep every ``interval_s`` until ``stop`` (several schedulers are harmless)."""

    def loop() -> None:
        while True:
            try:
                enqueue("maintenance", "", 0)
            except Exception as exc:
                log.warning("maintenance_enqueue_failed", error=str(exc))
            if stop.wait(interval_s):
                return

    thread = threading.Thread(target=loop, name="maintenance-scheduler", daemon=True)
    thread.start()
    return thread
