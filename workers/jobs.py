"""Guarded state transitions for media and transcription jobs.

Every change is one short transaction that checks the state it expects, so a
redelivered or duplicate message can never produce a second result. A stage is
*claimed* by the Dramatiq message id that runs it: a redelivery of the same message
(its worker died) takes over; a different message for a job that is already being
worked on, with a fresh heartbeat, is a duplicate and is dropped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from typing import Any, Iterator

import peewee as pw

from mp4totext import runtime
from storage.db import JobState, Media, MediaState, Stage, Transcription, add_event, database, utcnow

STAGE_ORDER = [Stage.PREPARING_MEDIA, Stage.WAITING, Stage.TRANSCRIBING, Stage.DIARIZING, Stage.FINALIZING,
               Stage.DONE]
# Overall percent at the start of each stage; transcribing spans 5..95, or 5..70 when
# speaker recognition (70..95) follows.
STAGE_PERCENT = {Stage.PREPARING_MEDIA: 0.0, Stage.WAITING: 5.0, Stage.TRANSCRIBING: 5.0, Stage.DIARIZING: 70.0,
                 Stage.FINALIZING: 95.0, Stage.DONE: 100.0}


class LostClaim(Exception):
    """The job was deleted, cancelled or taken over while this worker ran it."""


@dataclasses.dataclass
class Claim:
    outcome: str  # run | skip (duplicate) | past (stage already done) | done | exhausted | cancelled
    job: Any = None


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """A write transaction that serialises with other writers (IMMEDIATE on SQLite)."""
    with database.connection_context():
        if isinstance(database.obj, pw.SqliteDatabase):
            with database.atomic("IMMEDIATE"):
                yield
        else:
            with database.atomic():
                yield


def _for_update(query: pw.ModelSelect) -> pw.ModelSelect:
    return query.for_update() if isinstance(database.obj, pw.PostgresqlDatabase) else query


def _fresh(heartbeat: dt.datetime | None, lease_s: float) -> bool:
    return heartbeat is not None and (utcnow() - heartbeat).total_seconds() < lease_s


def event_of(job: Transcription, heartbeat: bool = False) -> dict[str, Any]:
    return {
        "id": job.id,
        "sequence": job.sequence,
        "state": job.state,
        "stage": job.stage,
        "progress": round(job.progress, 2),
        "processed_s": job.processed_s,
        "duration_s": job.duration_s,
        "error_message": job.error_message,
        "attempts": job.attempts,
        "heartbeat": heartbeat,
        "time": utcnow().isoformat() + "Z",
    }


def publish(job: Transcription) -> None:
    runtime.get().bus.publish(event_of(job))


def _bump(job: Transcription, detail: str = "", event: bool = True) -> None:
    job.sequence += 1
    job.update_time = utcnow()
    job.save()
    if event:
        add_event(job, detail)


def _get_locked(job_id: str) -> Transcription | None:
    return _for_update(Transcription.select().where(Transcription.id == job_id)).first()


# ---------------------------------------------------------------- media


def claim_media(media_id: str, message_id: str, max_attempts: int, lease_s: float) -> Claim:
    with locked():
        media = _for_update(Media.select().where(Media.id == media_id)).first()
        if media is None or media.state == MediaState.FAILED:
            return Claim("done", media)
        if media.state == MediaState.READY:
            return Claim("past", media)
        if media.claim_message_id not in (None, message_id) and _fresh(media.heartbeat_time, lease_s):
            return Claim("skip", media)
        media.attempts += 1
        if media.attempts > max_attempts:
            media.save()
            return Claim("exhausted", media)
        media.claim_message_id = message_id
        media.heartbeat_time = utcnow()
        media.update_time = utcnow()
        media.save()
        return Claim("run", media)


def media_ready(media_id: str, message_id: str, *, duration_s: float, format_name: str, audio_codec: str,
                audio_key: str) -> bool:
    with database.connection_context():
        n = (
            Media.update(state=MediaState.READY, duration_s=duration_s, format_name=format_name,
                         audio_codec=audio_codec, audio_key=audio_key, claim_message_id=None, update_time=utcnow())
            .where(Media.id == media_id, Media.state == MediaState.PROCESSING, Media.claim_message_id == message_id)
            .execute()
        )
    return n == 1


def media_failed(media_id: str, message: str) -> list[Transcription]:
    """Mark media FAILED and fail the transcriptions that waited for it; return those."""
    with locked():
        Media.update(state=MediaState.FAILED, error_message=message, claim_message_id=None, update_time=utcnow()).where(
            Media.id == media_id, Media.state == MediaState.PROCESSING
        ).execute()
        waiting = list(
            Transcription.select().where(Transcription.media == media_id, Transcription.state.not_in(JobState.TERMINAL))
        )
        for job in waiting:
            _finish(job, JobState.FAILED, reason="MEDIA_INVALID", message=f"media/{media_id} is not usable: {message}")
    for job in waiting:
        publish(job)
    return waiting


def jobs_to_start(media_id: str) -> list[Transcription]:
    """Move transcriptions that waited for this (now READY) media to WAITING; return the ones moved."""
    with database.connection_context():
        candidates = list(
            Transcription.select(Transcription.id).where(
                Transcription.media == media_id,
                Transcription.state == JobState.QUEUED,
                Transcription.stage == Stage.PREPARING_MEDIA,
            )
        )
    return [job for job in (to_waiting(c.id) for c in candidates) if job is not None]


def to_waiting(job_id: str) -> Transcription | None:
    """PREPARING_MEDIA -> WAITING. Exactly one caller wins and must enqueue the transcribe step."""
    with locked():
        job = _get_locked(job_id)
        if job is None or job.state != JobState.QUEUED or job.stage != Stage.PREPARING_MEDIA:
            return None
        media = Media.get_by_id(job.media_id)
        if media.state != MediaState.READY:
            return None
        job.duration_s = media.duration_s
        job.stage = Stage.WAITING
        job.progress = STAGE_PERCENT[Stage.WAITING]
        job.attempts = 0
        _bump(job)
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
        if job is None or job.state in JobState.TERMINAL:
            return Claim("done", job)
        if job.cancel_requested:
            _finish(job, JobState.CANCELLED, reason="CANCELLED", message="cancelled by the client")
            outcome = "cancelled"
        elif job.stage not in stages:
            ahead = STAGE_ORDER.index(job.stage) > STAGE_ORDER.index(running_stage)
            return Claim("past" if ahead else "skip", job)
        elif job.claim_message_id not in (None, message_id) and _fresh(job.heartbeat_time, lease_s):
            return Claim("skip", job)
        else:
            job.attempts += 1
            job.total_attempts += 1
            if job.attempts > max_attempts and not fail_when_exhausted:
                job.save()
                return Claim("exhausted", job)
            if job.attempts > max_attempts:
                last = f" Last error: {job.error_message}" if job.error_message else ""
                _finish(job, JobState.FAILED, reason="ATTEMPTS_EXHAUSTED",
                        message=f"the {running_stage.lower()} stage was attempted {max_attempts} times without "
                                f"finishing (a worker crashed or timed out each time).{last}")
                outcome = "exhausted"
            else:
                job.state = JobState.RUNNING
                job.stage = running_stage
                job.claim_message_id = message_id
                job.heartbeat_time = utcnow()
                job.start_time = job.start_time or utcnow()
                job.progress = max(job.progress, STAGE_PERCENT[running_stage])
                _bump(job, detail=f"attempt {job.attempts}")
                outcome = "run"
    publish(job)
    return Claim(outcome, job)


def report_progress(job_id: str, message_id: str, processed_s: float, duration_s: float,
                    span: tuple[float, float] = (5.0, 95.0), fraction: float | None = None) -> Transcription:
    """Save stage progress (overall percent within ``span``); raise LostClaim if the job is no
    longer ours. Returns the row. ``fraction`` overrides processed_s / duration_s."""
    done = fraction if fraction is not None else (processed_s / duration_s if duration_s > 0 else 0.0)
    pct = span[0] + (span[1] - span[0]) * min(max(done, 0.0), 1.0)
    now = utcnow()
    with database.connection_context():
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
    """Finish the claimed stage and move to ``next_stage`` (caller enqueues it). None if not ours."""
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
    publish(job)
    return job


def keep_without_speakers(job_id: str, message_id: str | None, error: str) -> Transcription | None:
    """Speaker recognition failed for good: keep the transcript, record why, go on to finalize.

    Returns the job (moved to FINALIZING) or None if it is not in the diarizing stage
    (or, with a ``message_id``, not claimed by it).
    """
    with locked():
        job = _get_locked(job_id)
        if job is None or job.state in JobState.TERMINAL or job.stage != Stage.DIARIZING:
            return None
        if message_id is not None and job.claim_message_id not in (None, message_id):
            return None
        result = dict(job.result or {})
        result["diarization"] = {"state": "FAILED", "error_message": error, "pipeline": "",
                                 "processing_s": None}
        job.result = result
        job.warnings = [*(job.warnings or []),
                        f"speaker recognition failed, the transcript has no speaker labels: {error}"]
        job.state = JobState.RUNNING
        job.stage = Stage.FINALIZING
        job.claim_message_id = None
        job.attempts = 0
        job.error_message = ""
        job.progress = max(job.progress, STAGE_PERCENT[Stage.FINALIZING])
        _bump(job, detail="DIARIZATION_FAILED")
    publish(job)
    return job


def release_for_retry(job_id: str, message_id: str, waiting_stage: str, error: str) -> None:
    """A transient failure: give the job back so the retried message can claim it."""
    with locked():
        job = _get_locked(job_id)
        if job is None or job.claim_message_id != message_id or job.state in JobState.TERMINAL:
            return
        job.state = JobState.QUEUED
        job.stage = waiting_stage
        job.claim_message_id = None
        job.error_message = f"attempt {job.attempts} failed, will retry: {error}"
        _bump(job)
    publish(job)


def finish(job_id: str, state: str, reason: str = "", message: str = "", only_stage: str | None = None,
           message_id: str | None = None) -> Transcription | None:
    """Move a job to a terminal state unless it already is in one. Returns the job if it changed."""
    with locked():
        job = _get_locked(job_id)
        if job is None or job.state in JobState.TERMINAL:
            return None
        if only_stage is not None and job.stage != only_stage:
            return None
        if message_id is not None and job.claim_message_id not in (None, message_id):
            return None
        _finish(job, state, reason=reason, message=message)
    publish(job)
    from observability.metrics import JOBS_FINISHED

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
    _bump(job, detail=reason or state)


def request_cancel(job: Transcription) -> Transcription:
    """Cancel now if nothing runs it, else flag it for the worker (checked between segments)."""
    with locked():
        row = _get_locked(job.id)
        if row is None or row.state in JobState.TERMINAL:
            return row or job
        if row.state == JobState.QUEUED:
            _finish(row, JobState.CANCELLED, reason="CANCELLED", message="cancelled by the client")
        else:
            row.cancel_requested = True
            _bump(row, detail="cancel requested")
    publish(row)
    return row


def publish_deleted(job: Transcription) -> None:
    runtime.get().bus.publish({"id": job.id, "deleted": True, "sequence": job.sequence + 1})
