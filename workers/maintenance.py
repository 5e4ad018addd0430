"""The low-queue maintenance sweep, and the scheduler that enqueues it on low-queue workers."""
from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import structlog

from core import enhancements, live, plan, recovery, registry, runtime, upload_sessions
from core.plan import ROUTES
from core.queue import enqueue, queue_depths
from mp4totext.contracts import Priority, broker_priority
from workers import usage_reports, webhooks

log = structlog.get_logger(__name__)
DEDICATED = {q for q in set(ROUTES.values()) if list(ROUTES.values()).count(q) == 1}


def sweep(_unused: str = "") -> None:
    """Abort stale multipart uploads, forget dead workers, re-enqueue work whose message was lost."""
    rt = runtime.get()
    s = rt.settings
    structlog.contextvars.bind_contextvars(stage="maintenance")
    expired_sessions = upload_sessions.expire()  # abandoned resumable uploads: parts aborted, row gone
    ended_live = live.expire()  # live sessions their app never ended: the recording becomes media
    forgotten_live = live.forget()  # failed ones, and those whose media was deleted
    aborted = rt.store.abort_stale_uploads(dt.timedelta(seconds=s.stale_upload_s),
                                           keep=upload_sessions.live_upload_ids())
    stuck = recovery.stuck(dt.timedelta(seconds=s.stuck_after_s))
    stale_items, held_items, pending_items = enhancements.stuck(dt.timedelta(seconds=s.stuck_after_s))
    registry.forget_dead_workers()
    # Work that only waits its turn in a backlog has its message in the queue: re-sending it at
    # every sweep grew a queue to ~2,400 messages for 50 jobs (load test, 20 s stuck_after_s).
    # So a queue gets at most as many messages as it holds fewer than the rows waiting on it (in
    # the order the queue serves them: priority, then age); a claimed stage whose heartbeat
    # stopped has no message left.
    # Only a queue one actor uses tells how many of these rows have a message (critical also
    # carries finalize and webhook messages: its stale media are all re-sent, as before).
    depth = {q: n for q, n in queue_depths().items() if q in DEDICATED}
    waiting: list[Any] = []
    for name, total in stuck.waiting_by_queue.items():
        rows = [j for j in stuck.waiting if ROUTES[plan.actor_for(j.stage)] == name]
        waiting += _missing(rows, total, depth.get(name))
    media = _missing(stuck.media, stuck.media_total, depth.get(ROUTES["prepare_media"]))
    items = _missing(stale_items, pending_items, depth.get(ROUTES[enhancements.ACTOR])) + held_items
    # Recovered work continues the trace it belongs to.
    for m in media:
        enqueue("prepare_media", m.id, broker_priority(Priority.NORMAL), m.trace_context)
    for j in waiting + stuck.held:
        enqueue(plan.actor_for(j.stage), j.id, j.priority, j.trace_context)
    for item_id, priority, trace_context in items:
        enqueue(enhancements.ACTOR, item_id, priority, trace_context)
    requeued_webhooks = webhooks.requeue_due()  # retries the schedule left to the sweep, lost messages
    usage_reports.enqueue_due()  # last week's usage report of each tenant still without one
    log.info("stage_finished", outcome="maintenance", aborted_uploads=aborted, expired_upload_sessions=expired_sessions,
             requeued=len(media) + len(waiting) + len(stuck.held) + len(items), requeued_webhooks=requeued_webhooks,
             stale_waiting=len(stuck.media) + len(stuck.waiting) + len(stale_items), queue_depths=depth,
             ended_live_sessions=ended_live, forgotten_live_sessions=forgotten_live)


def _missing(stale: list[Any], waiting_total: int, held: int | None) -> list[Any]:
    """Of ``stale`` rows (oldest first; ``waiting_total`` rows wait on the queue in all), those to
    send again when the queue holds ``held`` messages (None: unknown, all of them)."""
    if held is None:
        return stale
    return stale[:max(0, waiting_total - held)]


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
