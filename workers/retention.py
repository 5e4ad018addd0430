"""The retention sweep on the low queue (core.retention), and the scheduler that enqueues it.

Every low-queue worker runs a scheduler, but a database claim lets only one of them enqueue a
sweep per ``MP4T_RETENTION_INTERVAL_S``, and a restart does not reset the clock.
"""
from __future__ import annotations

import threading

import structlog

from core import retention, runtime
from core.queue import enqueue

log = structlog.get_logger(__name__)

ACTOR = "retention"


def sweep(label: str = "") -> None:
    """One bounded retention and maintenance pass (``label`` names the run in its log line)."""
    rt = runtime.get()
    structlog.contextvars.bind_contextvars(stage="retention")
    retention.run(rt.settings, rt.store, label=label)


def schedule(interval_s: float, stop: threading.Event) -> threading.Thread:
    """Until ``stop``: every ``min(interval_s, 60)`` s, enqueue a sweep if it is due (claimed)."""

    def loop() -> None:
        # The first check waits one period: a process that is starting (embedded mode creates its
        # key now) meets no extra writer, and the claim in the database keeps the schedule anyway.
        while not stop.wait(min(interval_s, 60.0)):
            try:
                if retention.claim("retention_enqueued", interval_s):
                    enqueue(ACTOR, "scheduled", 0)
            except Exception as exc:
                log.warning("retention_enqueue_failed", error=str(exc))

    thread = threading.Thread(target=loop, name="retention-scheduler", daemon=True)
    thread.start()
    return thread
