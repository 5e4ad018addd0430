"""Guarded state transitions for media and transcription jobs.

Every change is one short transaction that checks the state it expects, so a
redelivered or duplicate message can never produce a second result. A stage is
*claimed* by the Dramatiq message id that runs it: a redelivery of the same message
(its worker died) takes over; a different message for a job that is already being
worked on, with a fresh heartbeat, is a duplicate and is dropped.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Callable

import peewee as pw

from core import leases, outbox, plan, quotas, runtime, usage, webhooks
from core.items import items_of, settle_items
from core.plan import STAGE_PERCENT
from mp4totext.contracts import (
    TERMINAL_STATES,
    ClaimOutcome,
    DeletedEvent,
    JobConfig,
    ItemStatus,
    JobState,
    MediaState,
    ProgressEvent,
    Stage,
    TranscriptResult,
)
from observability import tracing
from observability.metrics import JOBS_FINISHED
from storage.db import Enhancement, Media, Transcription, add_event, connection, database, locked, utcnow


class LostClaim(Exception):
    """The job was deleted, cancelled or taken over while this worker ran it."""


@dataclasses.dataclass
class Claim:
    outcome: ClaimOutcome
    job: Any = None  # the Transcription or Media row (None when it does not exist)


def _for_update(query: pw.ModelSelect) -> pw.ModelSelect:
    return query.for_update() if isinstance(database.obj, pw.PostgresqlDatabase) else query


def event_of(job: Transcription, heartbeat: bool = False, items: list[ItemStatus] | None = None) -> ProgressEvent:
    if items is None:
        items = items_of([job.id]).get(job.id, []) if job.ai_items else []
    return ProgressEvent(id=job.id, sequence=job.sequence, state=job.state, stage=job.stage,
                         progress=round(job.progress, 2), processed_s=job.processed_s, duration_s=job.duration_s,
                         error_message=job.error_message, attempts=job.attempts, heartbeat=heartbeat,
                         time=dt.datetime.now(dt.timezone.utc), items=items)


def publish(job: Transcription) -> None:
    runtime.get().bus.publish(event_of(job).model_dump(mode="json"))


def current_events(job_ids: list[str], chunk: int = 500) -> dict[str, ProgressEvent]:
    """Each job's state as an event, read from the database in a few queries (deleted jobs are
    missing from the answer)."""
    found: dict[str, ProgressEvent] = {}
    with connection():
        for i in range(0, len(job_ids), chunk):
            rows = list(Transcription.select().where(Transcription.id.in_(job_ids[i:i + chunk])))
            items = items_of([job.id for job in rows if job.ai_items])
            for job in rows:
                found[job.id] = event_of(job, items=items.get(job.id, []))
    return found


def count_by_state() -> dict[str, int]:
    """Transcriptions per state, every state present (for the mp4t_jobs gauge)."""
    with connection():
        rows = (Transcription.select(Transcription.state, pw.fn.COUNT(Transcription.id).alias("n"))
                .group_by(Transcription.state).tuples())
        counts = {str(state): 0 for state in JobState}
        counts.update({state: n for state, n in rows})
    return counts


def _bump(job: Transcription, detail: str = "", event: bool = True) -> None:
    job.sequence += 1
    job.update_time = utcnow()
    job.save()
    if event:
        add_event(job, detail)


def _send_next(job: Transcription, trace_context: dict[str, str] | None) -> None:
    """The message that runs the job's current stage, committed with the change (core.outbox);
    ``trace_context`` parents its PRODUCER span."""
    if job.stage in plan.ACTOR_FOR_STAGE:
        # a tenant's burst goes lower than other tenants' first jobs (core.quotas)
        outbox.add(plan.actor_for(job.stage), job.id, quotas.queue_priority(job), trace_context)


def _get_locked(job_id: str) -> Transcription | None:
    return _for_update(Transcription.select().where(Transcription.id == job_id)).first()


# ---------------------------------------------------------------- media


def claim_media(media_id: str, message_id: str, max_attempts: int, lease_s: float) -> Claim:
    with locked():
        media = _for_update(Media.select().where(Media.id == media_id)).first()
        if media is None or media.state == MediaState.FAILED:
            return Claim(ClaimOutcome.DONE, media)
        if media.state == MediaState.READY:
            return Claim(ClaimOutcome.PAST, media)
        if leases.held_elsewhere(media, message_id, lease_s):
            return Claim(ClaimOutcome.SKIP, media)
        media.attempts += 1
        if media.attempts > max_attempts:
            media.save()
            return Claim(ClaimOutcome.EXHAUSTED, media)
        leases.take(media, message_id)
        media.save()
        return Claim(ClaimOutcome.RUN, media)


def media_ready(media_id: str, message_id: str, *, duration_s: float, format_name: str, audio_codec: str,
                audio_key: str) -> bool:
    with connection():
        n = (
            Media.update(state=MediaState.READY, duration_s=duration_s, format_name=format_name,
                         audio_codec=audio_codec, audio_key=audio_key, claim_message_id=None, update_time=utcnow())
            .where(Media.id == media_id, Media.state == MediaState.PROCESSING, Media.claim_message_id == message_id)
            .execute()
        )
    return n == 1


def media_exists(media_id: str) -> bool:
    with connection():
        return Media.select().where(Media.id == media_id).exists()


def media_failed(media_id: str, message: str, from_state: str = MediaState.PROCESSING) -> list[Transcription]:
    """Mark media FAILED (from ``from_state``: PROCESSING when preparing it failed, READY when the
    retention sweep found its objects gone) with its media.failed event, and fail the
    transcriptions that waited for it, in one transaction; return those."""
    with locked():
        changed = Media.update(state=MediaState.FAILED, error_message=message, claim_message_id=None,
                               update_time=utcnow()).where(
            Media.id == media_id, Media.state == from_state
        ).execute()
        if changed:
            webhooks.media_failed(Media.get_by_id(media_id), message)
        elif from_state != MediaState.PROCESSING:
            return []  # not READY any more: someone else decided its fate
        waiting = list(_for_update(
            Transcription.select().where(Transcription.media == media_id, Transcription.state.not_in(TERMINAL_STATES))
        ))
        for job in waiting:
            _finish(job, JobState.FAILED, reason="MEDIA_INVALID", message=f"media/{media_id} is not usable: {message}")
    for job in waiting:
        publish(job)
    return waiting


def jobs_to_start(media_id: str) -> list[Transcription]:
    """Move transcriptions that waited for this (now READY) media to WAITING; return the ones moved."""
    with connection():
        candidates = list(
            Transcription.select(Transcription.id).where(
                Transcription.media == media_id,
                Transcription.state == JobState.QUEUED,
                Transcription.stage == Stage.PREPARING_MEDIA,
            )
        )
    return [job for job in (to_waiting(c.id) for c in candidates) if job is not None]


def create(tenant: str, media: Media, config: JobConfig, priority: int, request_id: str | None,
           owner: str) -> Transcription:
    """A transcription of ``media`` with its quota reservation and AI items, in one transaction.
    Raises QuotaExceeded (nothing written) or IntegrityError (the same request_id, concurrently);
    the caller then moves it on with ``to_waiting`` (inside ``outbox.sending()``)."""
    with locked():
        reservation = quotas.admit(tenant, media.duration_s, config.to_json())  # locks the quota row
        job = Transcription.create(tenant=tenant, media=media.id, request_id=request_id or None,
                                   config=config.to_json(), priority=priority, duration_s=media.duration_s,
                                   trace_context=tracing.inject(), ai_items=len(config.ai), owner=owner)
        quotas.reserve(job.id, tenant, reservation)
        for item in config.ai:
            Enhancement.create(tenant=tenant, transcription=job.id, kind=item["kind"],
                               language=item.get("language", ""), request_id=request_id or None)
    return job


def to_waiting(job_id: str) -> Transcription | None:
    """PREPARING_MEDIA -> WAITING. Exactly one caller wins; the transcribe message goes to the outbox."""
    with locked():
        job = _get_locked(job_id)
        if job is None or job.state != JobState.QUEUED or job.stage != Stage.PREPARING_MEDIA:
            return None
        media = Media.get_by_id(job.media_id)
        if media.state != MediaState.READY:
            return None
        job.duration_s = media.duration_s
        refused = quotas.reserve_duration(job, media.duration_s or 0.0)  # created before the duration was known
        if refused:
            _finish(job, JobState.FAILED, reason="QUOTA_EXCEEDED", message=refused)
        else:
            job.stage = Stage.WAITING
            job.progress = STAGE_PERCENT[Stage.WAITING]
            job.attempts = 0
            _bump(job)
            _send_next(job, job.trace_context)  # the job's own trace (the RPC that created it)
    publish(job)
    return job


# ---------------------------------------------------------------- transcription stages


def claim_stage(job_id: str, stages: tuple[str, ...], running_stage: str, message_id: str,
                max_attempts: int, lease_s: float, fail_when_exhausted: bool = True) -> Claim:
    """Claim ``job_id`` for the stage that accepts jobs in ``stages``.

    Past ``max_attempts`` the job FAILS, unless ``fail_when_exhausted`` is False (an
    optional stage): then the claim is "exhausted" and the caller decides.
    """
    with locked():
        job = _get_locked(job_id)
        if job is None or job.state in TERMINAL_STATES:
            return Claim(ClaimOutcome.DONE, job)
        if job.cancel_requested:
            _finish(job, JobState.CANCELLED, reason="CANCELLED", message="cancelled by the client")
            outcome = ClaimOutcome.CANCELLED
        elif job.stage not in stages:
            ahead = plan.is_ahead(job.stage, running_stage)
            return Claim(ClaimOutcome.PAST if ahead else ClaimOutcome.SKIP, job)
        elif leases.held_elsewhere(job, message_id, lease_s):
            return Claim(ClaimOutcome.SKIP, job)
        else:
            job.attempts += 1
            job.total_attempts += 1
            if job.attempts > max_attempts and not fail_when_exhausted:
                job.save()
                return Claim(ClaimOutcome.EXHAUSTED, job)
            if job.attempts > max_attempts:
                last = f" Last error: {job.error_message}" if job.error_message else ""
                _finish(job, JobState.FAILED, reason="ATTEMPTS_EXHAUSTED",
                        message=f"the {running_stage.lower()} stage was attempted {max_attempts} times without "
                                f"finishing (a worker crashed or timed out each time).{last}")
                outcome = ClaimOutcome.EXHAUSTED
            else:
                job.state = JobState.RUNNING
                job.stage = running_stage
                leases.take(job, message_id)
                job.start_time = job.start_time or utcnow()
                job.progress = max(job.progress, STAGE_PERCENT[running_stage])
                _bump(job, detail=f"attempt {job.attempts}")
                outcome = ClaimOutcome.RUN
    publish(job)
    return Claim(outcome, job)


def report_progress(job_id: str, message_id: str, processed_s: float, duration_s: float,
                    span: tuple[float, float] = (5.0, 95.0), fraction: float | None = None) -> Transcription:
    """Save stage progress (overall percent within ``span``); raise LostClaim if the job is no
    longer ours. Returns the row. ``fraction`` overrides processed_s / duration_s."""
    done = fraction if fraction is not None else (processed_s / duration_s if duration_s > 0 else 0.0)
    pct = span[0] + (span[1] - span[0]) * min(max(done, 0.0), 1.0)
    now = utcnow()
    with connection():
        n = (
            Transcription.update(
                processed_s=processed_s, progress=min(pct, 95.0), sequence=Transcription.sequence + 1,
                heartbeat_time=now, update_time=now,
            )
            .where(Transcription.id == job_id, Transcription.claim_message_id == message_id,
                   Transcription.state == JobState.RUNNING)
            .execute()
        )
        job = Transcription.get_or_none(Transcription.id == job_id)
    if n == 0 or job is None:
        raise LostClaim(job_id)
    publish(job)
    return job


def stage_done(job_id: str, message_id: str, next_stage: str, **fields: Any) -> Transcription | None:
    """Finish the claimed stage and move to ``next_stage`` (its message goes to the outbox). None if not ours."""
    with locked():
        job = _get_locked(job_id)
        if job is None or job.claim_message_id != message_id or job.state != JobState.RUNNING:
            return None
        for k, v in fields.items():
            setattr(job, k, v)
        job.stage = next_stage
        job.claim_message_id = None
        job.attempts = 0
        job.progress = max(job.progress, STAGE_PERCENT[next_stage])
        _bump(job)
        _send_next(job, tracing.inject() or job.trace_context)
    publish(job)
    return job


def skip_stage(job_id: str, message_id: str | None, stage: str, mark: Callable[[TranscriptResult], TranscriptResult],
               warning: str, detail: str) -> Transcription | None:
    """An optional stage failed for good: keep the job's work, record why (``mark`` the result,
    add ``warning``) and move on to the stage after it (its message goes to the outbox).

    Returns the job, or None if it is not in ``stage`` (or, with a ``message_id``, not claimed by it).
    """
    with locked():
        job = _get_locked(job_id)
        if job is None or job.state in TERMINAL_STATES or job.stage != stage:
            return None
        if message_id is not None and job.claim_message_id not in (None, message_id):
            return None
        job.result = mark(TranscriptResult.from_json(job.result)).to_json()
        job.warnings = [*(job.warnings or []), warning]
        job.state = JobState.RUNNING
        job.stage = plan.next_stage(job.config, stage)
        job.claim_message_id = None
        job.attempts = 0
        job.error_message = ""
        job.progress = max(job.progress, STAGE_PERCENT[job.stage])
        _bump(job, detail=detail)
        _send_next(job, tracing.inject() or job.trace_context)
    publish(job)
    return job


def release_for_retry(job_id: str, message_id: str, waiting_stage: str, error: str,
                      outage: bool = False) -> None:
    """A transient failure: give the job back so the retried message can claim it.

    With ``outage`` (a service we depend on failed, not the work) the attempt is not counted:
    the attempt counter is for crash loops.
    """
    with locked():
        job = _get_locked(job_id)
        if job is None or job.claim_message_id != message_id or job.state in TERMINAL_STATES:
            return
        job.state = JobState.QUEUED
        job.stage = waiting_stage
        job.claim_message_id = None
        if outage:
            job.attempts = max(job.attempts - 1, 0)
            job.error_message = f"waiting for a service to come back, will retry: {error}"
        else:
            job.error_message = f"attempt {job.attempts} failed, will retry: {error}"
        _bump(job)
    publish(job)


def release_media(media_id: str, message_id: str) -> None:
    """Preparing media met an outage: give it back without counting the attempt."""
    leases.release(Media, media_id, message_id, Media.state == MediaState.PROCESSING, uncount=True)


def finish(job_id: str, state: str, reason: str = "", message: str = "", only_stage: str | None = None,
           message_id: str | None = None) -> Transcription | None:
    """Move a job to a terminal state unless it already is in one. Returns the job if it changed."""
    with locked():
        job = _get_locked(job_id)
        if job is None or job.state in TERMINAL_STATES:
            return None
        if only_stage is not None and job.stage != only_stage:
            return None
        if message_id is not None and job.claim_message_id not in (None, message_id):
            return None
        _finish(job, state, reason=reason, message=message)
    publish(job)
    JOBS_FINISHED.labels(state, reason or state).inc()
    return job


def _finish(job: Transcription, state: str, reason: str, message: str) -> None:
    now = utcnow()
    job.state = state
    job.stage = Stage.DONE
    job.claim_message_id = None
    job.end_time = now
    if state == JobState.SUCCEEDED:
        job.progress = 100.0
        job.error_message = ""
        job.error_reason = ""
        if job.start_time is not None:
            job.processing_s = (now - job.start_time).total_seconds()
    else:
        job.error_reason = reason
        job.error_message = message
    if job.ai_items:  # read under the row lock every caller holds: items are added under it too
        settle_items(job, state)
    usage.on_finish(job, state)  # charged once, with the change: success charges, failure releases
    _bump(job, detail=reason or state)
    webhooks.job_finished(job)  # its event and deliveries commit with the state change


def request_cancel(job: Transcription) -> Transcription:
    """Cancel now if nothing runs it, else flag it for the worker (checked between segments)."""
    with locked():
        row = _get_locked(job.id)
        if row is None or row.state in TERMINAL_STATES:
            return row or job
        if row.state == JobState.QUEUED:
            _finish(row, JobState.CANCELLED, reason="CANCELLED", message="cancelled by the client")
        else:
            row.cancel_requested = True
            _bump(row, detail="cancel requested")
    publish(row)
    return row


def publish_deleted(job: Transcription) -> None:
    runtime.get().bus.publish(DeletedEvent(id=job.id, sequence=job.sequence + 1).model_dump(mode="json"))
