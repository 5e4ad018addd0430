"""Recovery: work whose message may be lost (the maintenance sweep re-sends it, workers.maintenance)."""
from __future__ import annotations

import dataclasses
import datetime as dt

import peewee as pw

from core import plan
from mp4totext.contracts import JobState, MediaState, Stage
from storage.db import Media, Transcription, connection, utcnow


@dataclasses.dataclass
class Stuck:
    """Work that made no progress for a while: its message may be lost.

    ``waiting`` jobs (QUEUED) and ``media`` (PROCESSING) may also just be waiting their turn in a
    backlog; ``waiting_by_queue`` and ``media_total`` count all such rows, stale or not, so the
    sweep can compare them with the messages its queues hold (workers.maintenance). ``held``
    jobs were claimed (a running stage whose heartbeat stopped, or a finishing one): no message
    of theirs is waiting anywhere.
    """

    media: list[Media]
    waiting: list[Transcription]
    held: list[Transcription]
    media_total: int = 0
    waiting_by_queue: dict[str, int] = dataclasses.field(default_factory=dict)


def stuck(older_than: dt.timedelta) -> Stuck:
    """Media and jobs that made no progress for ``older_than`` (jobs highest priority first, then
    oldest): their message may be lost.

    With the outbox a committed state change always gets its message; what is left is work
    from before the outbox, a message dead-lettered after its retries, or a claim whose worker
    vanished. Re-enqueueing is safe because every stage is idempotent.
    """
    cutoff = utcnow() - older_than
    fields = (Transcription.id, Transcription.priority, Transcription.stage, Transcription.trace_context)
    queued = (Transcription.state == JobState.QUEUED) & Transcription.stage.in_(plan.WAITING_STAGES)
    with connection():
        media = list(Media.select(Media.id, Media.trace_context)
                     .where(Media.state == MediaState.PROCESSING, Media.update_time < cutoff)
                     .order_by(Media.update_time))
        media_total = Media.select().where(Media.state == MediaState.PROCESSING).count()
        # In the order the queue serves them (priority first): re-sending the oldest low-priority
        # row while a newer high-priority one lost its message would never reach the latter.
        waiting = list(Transcription.select(*fields).where(queued & (Transcription.update_time < cutoff))
                       .order_by(Transcription.priority.desc(), Transcription.update_time))
        by_queue: dict[str, int] = {}
        for stage, n in (Transcription.select(Transcription.stage, pw.fn.COUNT(Transcription.id))
                         .where(queued).group_by(Transcription.stage).tuples()):
            queue = plan.ROUTES[plan.actor_for(stage)]
            by_queue[queue] = by_queue.get(queue, 0) + n
        running = (Transcription.state == JobState.RUNNING) & (Transcription.heartbeat_time < cutoff)
        finishing = (Transcription.stage == Stage.FINALIZING) & (Transcription.update_time < cutoff)
        held = list(Transcription.select(*fields).where(running | finishing))
    return Stuck(media, waiting, held, media_total, by_queue)
