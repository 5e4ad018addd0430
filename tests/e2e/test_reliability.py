"""Crash safety: SIGKILLed workers, attempt limits, exactly-once completion."""
from __future__ import annotations

import signal
from typing import Any

from mp4totext.client import Client
from mp4totext.v1 import transcription_pb2 as tpb
from tests.support import Stack, log_lines, metric, queues_drained, wait_for


def _events(db: Any, job_id: str, state: str) -> int:
    from storage.db import TranscriptionEvent

    with db.connection_context():
        return TranscriptionEvent.select().where(TranscriptionEvent.transcription_id == job_id,
                                                 TranscriptionEvent.state == state).count()


def _stage_lines(proc: Any, job_id: str) -> list[dict[str, Any]]:
    """The worker's stage_finished log lines for the transcribe stage of ``job_id``."""
    return [ln for ln in log_lines(proc) if ln.get("event") == "stage_finished" and ln.get("job_id") == job_id
            and ln.get("stage") == "transcribe"]


def test_sigkill_worker_mid_transcription_completes_exactly_once(stack: Stack, client: Client, db: Any,
                                                                 long_speech: Any) -> None:
    media = client.upload(str(long_speech))
    job = client.create(media.name)
    job_id = job.name.split("/")[1]
    wait_for(lambda: client.get(job.name).progress_percent > 15, 180, "transcription progress", 0.2)
    killed = stack.workers["high"]
    killed.kill(signal.SIGKILL)
    killed_at = client.get(job.name)
    assert killed_at.state == tpb.TRANSCRIPTION_STATE_RUNNING and killed_at.attempt_count == 1
    high = stack.start_worker("high")
    final = client.wait(job.name, timeout=300)
    assert final.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED, final.error_message
    assert final.result.text.count("quick brown fox") >= 1
    assert _events(db, job_id, "SUCCEEDED") == 1
    from storage.db import Transcription

    with db.connection_context():
        row = Transcription.get_by_id(job_id)
    assert row.total_attempts >= 2  # the killed attempt was counted and redelivered
    # The redelivered message was consumed by the new worker: it ran the stage to its end...
    wait_for(lambda: _stage_lines(high, job_id), 60, "the new worker's stage_finished line for the job")
    # ...and nothing is left for it to run again: every message of the transcribe and finalize
    # queues (the redelivery, any duplicate the maintenance re-enqueued, their retries) has been
    # processed and acked. Only now is "still one success" evidence of anything.
    broker_url = stack.env["MP4T_BROKER_URL"]
    wait_for(lambda: queues_drained(broker_url, "high", "critical"), 120,
             "the high and critical queues to hold no ready or unacked message", 1)
    # (a process started in this test: its counter counts only what it consumed since)
    assert metric(stack.metrics(high), "mp4t_messages_total", actor="transcribe") >= 1
    # the redelivered message must not run again after success
    assert _events(db, job_id, "SUCCEEDED") == 1
    transcribed = [ln for proc in (killed, high) for ln in _stage_lines(proc, job_id)
                   if ln.get("outcome") == "transcribed"]
    assert len(transcribed) == 1, transcribed  # the killed attempt never finished; the redelivery did, once


def test_job_that_keeps_crashing_its_worker_fails_after_max_attempts(stack: Stack, client: Client, db: Any,
                                                                     long_speech: Any) -> None:
    media = client.upload(str(long_speech))
    job = client.create(media.name)
    max_attempts = 3  # MP4T_MAX_ATTEMPTS default
    try:
        for attempt in range(1, max_attempts + 1):
            wait_for(lambda: (j := client.get(job.name)).state == tpb.TRANSCRIPTION_STATE_RUNNING
                     and j.attempt_count == attempt and j.progress_percent > 6, 180, f"attempt {attempt} running", 0.1)
            stack.workers["high"].kill(signal.SIGKILL)
            stack.start_worker("high")
        final = wait_for(lambda: (j := client.get(job.name)).state == tpb.TRANSCRIPTION_STATE_FAILED and j, 120,
                         "job to fail")
    finally:
        if not stack.workers["high"].alive():
            stack.start_worker("high")
    assert final.error_reason == "ATTEMPTS_EXHAUSTED"
    assert "attempted 3 times" in final.error_message
    assert _events(db, job.name.split("/")[1], "SUCCEEDED") == 0


def test_priority_orders_queued_jobs(stack: Stack, client: Client, speech_mp4: Any) -> None:
    """With the transcription worker down, an URGENT job queued after LOW ones runs first."""
    media = client.upload(str(speech_mp4))
    client.wait(client.create(media.name).name)  # media READY
    stack.workers["high"].stop()
    try:
        low = [client.create(media.name, priority=tpb.PRIORITY_LOW) for _ in range(3)]
        urgent = client.create(media.name, priority=tpb.PRIORITY_URGENT)
    finally:
        stack.start_worker("high")
    jobs = [client.wait(j.name) for j in [*low, urgent]]
    assert all(j.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED for j in jobs)
    starts = {j.name: j.start_time.ToNanoseconds() for j in jobs}
    assert starts[urgent.name] < min(starts[j.name] for j in low)


def test_maintenance_recovers_lost_enqueue_and_stale_uploads(stack: Stack, client: Client, db: Any,
                                                             speech_mp4: Any, s3_client: Any) -> None:
    """A process that died between commit and enqueue leaves a job WAITING with no message;
    a crashed server leaves an incomplete multipart upload. The low-queue maintenance fixes both."""
    import datetime as dt

    from storage.db import JobState, Stage, Transcription, utcnow

    media = client.upload(str(speech_mp4))
    client.wait(client.create(media.name).name)
    with db.connection_context():
        first = Transcription.select().where(Transcription.media == media.name.split("/")[1]).get()
        lost = Transcription.create(tenant=first.tenant_id, media=first.media_id, config=first.config,
                                    state=JobState.QUEUED, stage=Stage.WAITING, duration_s=first.duration_s,
                                    update_time=utcnow() - dt.timedelta(seconds=60))
    upload_id = s3_client._create_multipart_upload(stack.s3["bucket"], "media/stale/object", {})  # noqa: SLF001
    final = wait_for(lambda: (j := client.get(f"transcriptions/{lost.id}")).state == tpb.TRANSCRIPTION_STATE_SUCCEEDED
                     and j, 120, "maintenance to re-enqueue the lost job", 0.5)
    assert final.result.text
    wait_for(lambda: upload_id not in {u.upload_id for u in s3_client._list_multipart_uploads(  # noqa: SLF001
        stack.s3["bucket"]).uploads}, 90, "stale multipart upload to be aborted", 1)
