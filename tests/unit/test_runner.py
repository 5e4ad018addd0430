"""The stage runner's failure classes, on a real database and Dramatiq's in-process broker,
with stages that fail the way real ones do."""
from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Iterator

import pytest
import urllib3.exceptions
from dramatiq.brokers.stub import StubBroker
from peewee import OperationalError

from core import queue, runtime
from core.failures import is_infrastructure, outage_retries
from mp4totext.config import Settings
from mp4totext.contracts import JobState, MediaState, Stage, TranscriptResult
from storage.db import Media, Tenant, Transcription, database
from storage.objects import StorageError
from workers.pipeline import JobFailed, JobStage, Output, Skip, StageRun, run_job_stage
from workers.stages.media import MediaError


@pytest.fixture()
def broker(tmp_path: pathlib.Path) -> Iterator[StubBroker]:
    settings = Settings(data_dir=str(tmp_path), broker_url="memory", max_attempts=3)
    runtime.init(settings)
    yield queue.make_broker(settings)
    database.close()


def stage(run: Callable[[StageRun], Output], optional: bool = False) -> JobStage:
    skip = Skip(mark=TranscriptResult.without_speakers, warning="speakers failed", detail="X") if optional else None
    accepts = (Stage.DIARIZING,) if optional else (Stage.WAITING, Stage.TRANSCRIBING)
    return JobStage(actor="diarize" if optional else "transcribe", stage=accepts[-1], accepts=accepts, run=run,
                    time_limit_s=lambda s: 60, model=lambda s: "test", what="the test stage", done="done",
                    permanent=((MediaError, "MEDIA_INVALID"),), optional=skip)


def job(stage_now: Stage = Stage.WAITING, **fields: Any) -> str:
    with database.connection_context():
        tenant = Tenant.create(name="runner")
        media = Media.create(tenant=tenant, object_key="k", state=MediaState.READY, duration_s=3.0)
        return Transcription.create(tenant=tenant, media=media, stage=stage_now, duration_s=3.0, **fields).id


def row(job_id: str) -> Transcription:
    with database.connection_context():
        return Transcription.get_by_id(job_id)


def raising(exc: BaseException) -> Callable[[StageRun], Output]:
    def run(_run: StageRun) -> Output:
        raise exc

    return run


def sent(broker: StubBroker, queue_name: str) -> list[str]:
    q = broker.queues[queue_name]
    return [json.loads(q.get_nowait())["actor_name"] for _ in range(q.qsize())]


def test_success_saves_the_result_and_sends_the_next_stage(broker: StubBroker) -> None:
    job_id = job()
    run_job_stage(stage(lambda run: Output(TranscriptResult(text="hello", duration=3.0), 3.0)), job_id)
    done = row(job_id)
    assert done.stage == Stage.FINALIZING and TranscriptResult.from_json(done.result).text == "hello"
    assert sent(broker, "critical") == ["finalize"]


@pytest.mark.parametrize("outage", [ConnectionError("refused"), OperationalError("server closed the connection"),
                                    urllib3.exceptions.MaxRetryError(None, "/b", "S3 down"), StorageError("down")])
def test_an_outage_waits_without_spending_attempts(broker: StubBroker, outage: Exception) -> None:
    job_id = job()
    for _ in range(5):  # more than max_attempts
        with pytest.raises(type(outage)):  # for Dramatiq to retry with backoff
            run_job_stage(stage(raising(outage)), job_id)
    waiting = row(job_id)
    assert (waiting.state, waiting.stage, waiting.attempts) == (JobState.QUEUED, Stage.WAITING, 0)
    assert "waiting for a service" in waiting.error_message and waiting.total_attempts == 5


def test_a_transient_error_counts_attempts_then_fails_the_job(broker: StubBroker) -> None:
    job_id = job()
    for _ in range(2):
        with pytest.raises(ValueError):
            run_job_stage(stage(raising(ValueError("bug"))), job_id)
    assert row(job_id).attempts == 2 and row(job_id).state == JobState.QUEUED
    with pytest.raises(JobFailed):  # the third of max_attempts=3
        run_job_stage(stage(raising(ValueError("bug"))), job_id)
    failed = row(job_id)
    assert failed.state == JobState.FAILED and failed.error_reason == "ATTEMPTS_EXHAUSTED"


def test_a_permanent_error_fails_at_once(broker: StubBroker) -> None:
    job_id = job()
    with pytest.raises(JobFailed):
        run_job_stage(stage(raising(MediaError("not audio"))), job_id)
    failed = row(job_id)
    assert (failed.state, failed.error_reason, failed.error_message) == (JobState.FAILED, "MEDIA_INVALID",
                                                                        "not audio")


def test_an_optional_stage_that_fails_for_good_keeps_the_work(broker: StubBroker) -> None:
    job_id = job(Stage.DIARIZING, state=JobState.QUEUED, config={"diarization": {"enabled": True}},
                 result=TranscriptResult(text="kept").to_json())
    run_job_stage(stage(raising(MediaError("no audio")), optional=True), job_id)
    kept = row(job_id)
    assert kept.stage == Stage.FINALIZING and kept.state == JobState.RUNNING
    result = TranscriptResult.from_json(kept.result)
    assert result.text == "kept" and result.diarization.error_message == "no audio"
    assert kept.warnings == ["speakers failed: no audio"] and sent(broker, "critical") == ["finalize"]


def test_infrastructure_classification_and_budget() -> None:
    assert is_infrastructure(TimeoutError()) and not is_infrastructure(FileNotFoundError("gone"))
    assert not is_infrastructure(ValueError()) and not is_infrastructure(MediaError("x"))
    # enough retries to wait out the budget even when jitter halves every delay
    assert outage_retries(300, 1000, 30000) == 24 and outage_retries(0, 1000, 30000) == 0


def test_message_retries_outlast_an_outage_and_the_attempts(broker: StubBroker) -> None:
    from workers.actors import register

    s = Settings(max_attempts=3, retry_min_backoff_ms=1000, retry_max_backoff_ms=30000, outage_budget_s=300)
    actors = register(broker, s)
    # The retention sweep is not retried: its next scheduled run is the retry (core.retention).
    assert actors.pop("retention").options["max_retries"] == 0
    assert {a.options["max_retries"] for n, a in actors.items() if n != "enhance"} == {24 + 3 + 2}
    # AI items count their own tries (MP4T_LLM_MAX_ATTEMPTS, 4): one more than the stages' 3.
    assert actors["enhance"].options["max_retries"] == 24 + 4 + 2
    assert {a.options["max_backoff"] for a in actors.values()} == {30000}
