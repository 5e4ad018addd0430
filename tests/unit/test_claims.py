"""The job state machine's claim outcomes, on a real (SQLite) database."""
from __future__ import annotations

import datetime as dt
import pathlib
from typing import Any, Iterator

import pytest

from core import jobs, runtime
from mp4totext.config import Settings
from mp4totext.contracts import ClaimOutcome, JobState, MediaState, Stage, TranscriptResult
from storage.db import Media, Tenant, Transcription, database, utcnow

TRANSCRIBE = (Stage.WAITING, Stage.TRANSCRIBING)
LEASE = 600.0


@pytest.fixture()
def rt(tmp_path: pathlib.Path) -> Iterator[Any]:
    yield runtime.init(Settings(data_dir=str(tmp_path), broker_url="memory"))
    database.close()


def make_job(stage: str = Stage.WAITING, state: str = JobState.QUEUED, **fields: Any) -> Transcription:
    with database.connection_context():
        tenant = Tenant.create(name=f"t-{utcnow().timestamp()}")
        media = Media.create(tenant=tenant, object_key="k", state=MediaState.READY, duration_s=10.0)
        return Transcription.create(tenant=tenant, media=media, stage=stage, state=state, duration_s=10.0, **fields)


def claim(job_id: str, message: str, accepts: tuple[Stage, ...] = TRANSCRIBE, stage: Stage = Stage.TRANSCRIBING,
          max_attempts: int = 3, optional: bool = False) -> jobs.Claim:
    return jobs.claim_stage(job_id, accepts, stage, message, max_attempts, LEASE, fail_when_exhausted=not optional)


def row(job_id: str) -> Transcription:
    with database.connection_context():
        return Transcription.get_by_id(job_id)


def test_first_claim_runs_and_a_duplicate_message_is_skipped(rt: Any) -> None:
    job = make_job()
    first = claim(job.id, "m1")
    assert first.outcome == ClaimOutcome.RUN and first.job.attempts == 1
    assert row(job.id).state == JobState.RUNNING and row(job.id).claim_message_id == "m1"
    assert claim(job.id, "m2").outcome == ClaimOutcome.SKIP  # live claim of another message
    assert row(job.id).attempts == 1


def test_redelivery_of_the_same_message_takes_over_and_counts_an_attempt(rt: Any) -> None:
    job = make_job()
    claim(job.id, "m1")
    again = claim(job.id, "m1")
    assert again.outcome == ClaimOutcome.RUN and again.job.attempts == 2 and again.job.total_attempts == 2


def test_stale_claim_of_a_dead_worker_is_taken_over(rt: Any) -> None:
    job = make_job()
    claim(job.id, "m1")
    with database.connection_context():
        Transcription.update(heartbeat_time=utcnow() - dt.timedelta(seconds=LEASE + 1)).where(
            Transcription.id == job.id).execute()
    assert claim(job.id, "m2").outcome == ClaimOutcome.RUN


def test_a_stage_already_done_is_past_and_an_earlier_one_is_skipped(rt: Any) -> None:
    assert claim(make_job(stage=Stage.FINALIZING, state=JobState.RUNNING).id, "m").outcome == ClaimOutcome.PAST
    early = make_job(stage=Stage.PREPARING_MEDIA)
    assert claim(early.id, "m").outcome == ClaimOutcome.SKIP


def test_terminal_or_missing_job_is_done(rt: Any) -> None:
    assert claim(make_job(stage=Stage.DONE, state=JobState.SUCCEEDED).id, "m").outcome == ClaimOutcome.DONE
    assert claim("0" * 32, "m").outcome == ClaimOutcome.DONE


def test_pending_cancellation_ends_the_job_at_the_claim(rt: Any) -> None:
    job = make_job(cancel_requested=True)
    assert claim(job.id, "m").outcome == ClaimOutcome.CANCELLED
    assert row(job.id).state == JobState.CANCELLED and row(job.id).error_reason == "CANCELLED"


def test_required_stage_past_max_attempts_fails_the_job(rt: Any) -> None:
    job = make_job(attempts=3, error_message="boom")
    out = claim(job.id, "m")
    assert out.outcome == ClaimOutcome.EXHAUSTED
    failed = row(job.id)
    assert failed.state == JobState.FAILED and failed.error_reason == "ATTEMPTS_EXHAUSTED"
    assert "attempted 3 times" in failed.error_message and "boom" in failed.error_message


def test_optional_stage_past_max_attempts_leaves_the_decision_to_the_runner(rt: Any) -> None:
    job = make_job(stage=Stage.DIARIZING, state=JobState.QUEUED, attempts=3, config={"diarization": {"enabled": True}})
    out = claim(job.id, "m", accepts=(Stage.DIARIZING,), stage=Stage.DIARIZING, optional=True)
    assert out.outcome == ClaimOutcome.EXHAUSTED and row(job.id).state == JobState.QUEUED
    kept = jobs.skip_stage(job.id, None, Stage.DIARIZING, mark=lambda r: r.without_speakers("gone"),
                           warning="speaker recognition failed: gone", detail="DIARIZATION_FAILED")
    assert kept is not None and kept.stage == Stage.FINALIZING and kept.attempts == 0
    result = TranscriptResult.from_json(row(job.id).result)
    assert result.diarization.state == "FAILED" and result.diarization.error_message == "gone"
    assert row(job.id).warnings == ["speaker recognition failed: gone"]


def test_stage_done_only_for_the_claiming_message(rt: Any) -> None:
    job = make_job()
    claim(job.id, "m1")
    assert jobs.stage_done(job.id, "other", Stage.FINALIZING) is None
    done = jobs.stage_done(job.id, "m1", Stage.FINALIZING, result=TranscriptResult(text="hi").to_json())
    assert done is not None and done.stage == Stage.FINALIZING and done.claim_message_id is None
    assert TranscriptResult.from_json(row(job.id).result).text == "hi"


def test_progress_of_a_lost_claim_raises(rt: Any) -> None:
    job = make_job()
    claim(job.id, "m1")
    assert jobs.report_progress(job.id, "m1", 5.0, 10.0).progress == pytest.approx(50.0)
    with pytest.raises(jobs.LostClaim):
        jobs.report_progress(job.id, "not-mine", 6.0, 10.0)


def test_media_claim_outcomes(rt: Any) -> None:
    with database.connection_context():
        tenant = Tenant.create(name="media-claims")
        media = Media.create(tenant=tenant, object_key="k")
    assert jobs.claim_media(media.id, "m1", 2, LEASE).outcome == ClaimOutcome.RUN
    assert jobs.claim_media(media.id, "m2", 2, LEASE).outcome == ClaimOutcome.SKIP
    assert jobs.claim_media(media.id, "m1", 2, LEASE).outcome == ClaimOutcome.RUN  # redelivery: attempt 2
    assert jobs.claim_media(media.id, "m1", 2, LEASE).outcome == ClaimOutcome.EXHAUSTED
    assert jobs.media_ready(media.id, "m1", duration_s=1.0, format_name="wav", audio_codec="pcm", audio_key="a")
    assert jobs.claim_media(media.id, "m3", 2, LEASE).outcome == ClaimOutcome.PAST
