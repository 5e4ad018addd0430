"""The AI items of jobs as the job state machine sees them (core.jobs): their statuses for
progress events, and what a job's end means for the items waiting on its transcript.

Everything else about items (creating, claiming, saving chunks, finishing) is core.enhancements.
"""
from __future__ import annotations

from core import outbox, webhooks
from mp4totext.contracts import ItemStatus, JobState
from storage.db import Enhancement, Transcription, connection, utcnow


def items_of(job_ids: list[str]) -> dict[str, list[ItemStatus]]:
    """The AI items of these jobs (only jobs that have some need asking), oldest first."""
    found: dict[str, list[ItemStatus]] = {}
    if not job_ids:
        return found
    with connection():
        rows = (Enhancement.select(Enhancement.id, Enhancement.transcription, Enhancement.kind, Enhancement.language,
                                   Enhancement.state, Enhancement.chunks_done, Enhancement.chunks_total,
                                   Enhancement.error_message)
                .where(Enhancement.transcription.in_(job_ids)).order_by(Enhancement.create_time, Enhancement.id))
        for r in rows:
            found.setdefault(r.transcription_id, []).append(ItemStatus(
                id=r.id, kind=r.kind, language=r.language, state=r.state, chunks_done=r.chunks_done,
                chunks_total=r.chunks_total, error_message=r.error_message))
    return found


def settle_items(job: Transcription, state: str) -> None:
    """Its AI items waiting for the transcript start with the job's success (their messages are
    committed with it), or end with its failure or cancellation (also one asked for while the
    job finished: a cancel requested then still holds for the items)."""
    waiting = Enhancement.select(Enhancement.id).where(Enhancement.transcription == job.id,
                                                       Enhancement.state == "PENDING")
    if state == JobState.SUCCEEDED and not job.cancel_requested:
        ids = [item.id for item in waiting]
        for item_id in ids:
            outbox.add("enhance", item_id, job.priority, job.trace_context)
        if ids:  # queued now: the maintenance sweep measures a lost message from here
            Enhancement.update(update_time=utcnow()).where(Enhancement.id.in_(ids)).execute()
        return
    if state == JobState.SUCCEEDED:  # cancel requested
        ended, reason, message = "CANCELLED", "CANCELLED", "cancelled by the client"
    else:
        ended = "CANCELLED" if state == JobState.CANCELLED else "FAILED"
        reason, message = "TRANSCRIPTION_" + state, f"the transcription is {state}: there is no transcript to work on"
    ids = [item.id for item in waiting]
    Enhancement.update(state=ended, end_time=utcnow(), update_time=utcnow(), error_reason=reason,
                       error_message=message).where(
        Enhancement.transcription == job.id, Enhancement.state == "PENDING").execute()
    if ids:  # their events commit with the job's end
        for item in Enhancement.select().where(Enhancement.id.in_(ids)):
            webhooks.item_finished(item, job)
