"""The stage runner: the one place that runs a pipeline stage for a Dramatiq message.

For a job stage it claims the job for this message, binds log and trace context, applies the
deadline, throttled progress and cancellation, runs the stage, classifies a failure, records
metrics and the canonical log line (``stage_finished``), saves the result and enqueues the
next stage (``core.plan``). A stage is a short declaration (``workers.actors``) around a
pure function (``workers.stages``).

How a failure is classified:
- cancelled by the client: the job ends CANCELLED;
- lost claim (deleted, cancelled or taken over while running): nothing more to do;
- over its time limit, or one of the stage's ``permanent`` errors (bad media, no pipeline):
  retrying cannot help, the failure is final at once;
- anything else is transient: the job is released and Dramatiq retries the message with
  backoff, until the job's attempts reach ``max_attempts`` (then final: ATTEMPTS_EXHAUSTED).
A final failure fails the job, unless the stage is optional: then the job keeps its work and
goes on without the stage, with a warning (``Skip``).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any, Callable

import numpy as np
import structlog
from dramatiq.middleware import CurrentMessage
from dramatiq.middleware.time_limit import TimeLimitExceeded

from core import jobs, outbox, plan, runtime
from core.failures import is_infrastructure
from mp4totext.config import Settings
from mp4totext.contracts import ClaimOutcome, JobConfig, JobState, Stage, TranscriptResult
from observability import metrics, tracing
from storage.db import Media, Transcription, connection, drop_broken_connection
from storage.objects import ObjectStore, audio_key
from workers.stages.media import SAMPLE_RATE, MediaError, load_wav
from workers.watchdog import Watchdog

log = structlog.get_logger(__name__)


class JobFailed(Exception):
    """Permanent failure already recorded on the job or media: not retried, message dead-lettered."""


class Cancelled(Exception):
    """The client cancelled the job while a stage ran it."""


class JobTimeout(Exception):
    """The stage ran past its deadline (checked at every progress report)."""


def message_id() -> str:
    msg = CurrentMessage.get_current_message()
    return msg.message_id if msg is not None else "local"


def progress_hook(deadline: float, interval_s: float,
                  report: Callable[[float], Transcription]) -> Callable[[float], None]:
    """A stage's progress callback: raises JobTimeout past ``deadline``, calls ``report`` (a DB
    write + live event) at most every ``interval_s``, and raises Cancelled when the row says so."""
    last = [0.0]

    def hook(value: float) -> None:
        now = time.monotonic()
        if now > deadline:
            raise JobTimeout()
        if now - last[0] < interval_s:
            return
        last[0] = now
        if report(value).cancel_requested:
            raise Cancelled()

    return hook


def finished(stage: str, outcome: str, started: float, level: str = "info", **fields: Any) -> None:
    """Metrics and the canonical log line of one run of a stage."""
    elapsed = time.monotonic() - started
    metrics.STAGE_DURATION.labels(stage, outcome).observe(elapsed)
    getattr(log, level)("stage_finished", outcome=outcome, duration_s=round(elapsed, 3), **fields)


def processed(stage: str, model: str, media_s: float, elapsed: float) -> float:
    """Record throughput metrics of a successful run; return its real-time factor."""
    rtf = elapsed / max(media_s, 1e-6)
    metrics.REALTIME_FACTOR.labels(stage, model).observe(rtf)
    metrics.MEDIA_SECONDS.labels(stage, model).inc(media_s)
    return rtf


# ---------------------------------------------------------------- job stages


@dataclasses.dataclass(frozen=True)
class Output:
    """What a job stage produced."""

    result: TranscriptResult
    media_s: float  # seconds of audio processed (real-time factor, throughput)
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)  # other job columns to save
    log: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra fields of the log line


@dataclasses.dataclass
class StageRun:
    """What a stage's ``run`` gets: the claimed job, its config and result, the settings, the
    object store, and progress callbacks (which also enforce the deadline and cancellation)."""

    job: Transcription
    settings: Settings
    store: ObjectStore
    on_seconds: Callable[[float], None] = lambda _s: None  # seconds of the media processed
    on_fraction: Callable[[float], None] = lambda _f: None  # fraction of this stage done
    audio_s: float | None = None

    @property
    def config(self) -> JobConfig:
        return JobConfig.from_json(self.job.config)

    @property
    def result(self) -> TranscriptResult:
        return TranscriptResult.from_json(self.job.result)

    def audio(self) -> np.ndarray:
        """The job's media as 16 kHz mono float32 (prepared by the prepare_media stage)."""
        with connection():
            media = Media.get_by_id(self.job.media_id)
        audio = self._load(media.audio_key)
        self.audio_s = len(audio) / SAMPLE_RATE
        return audio

    def media_audio(self, media_id: str) -> np.ndarray | None:
        """Another READY media of the job's tenant as 16 kHz mono float32 (e.g. a known speaker's
        reference voice); None when it was deleted since the job was created."""
        with connection():
            media = Media.get_or_none(Media.id == media_id, Media.tenant == self.job.tenant_id)
        if media is None or not media.audio_key:
            return None
        try:
            return self._load(media.audio_key)
        except FileNotFoundError:
            return None

    def _load(self, key: str) -> np.ndarray:
        with tracing.stage_span("load audio"), tempfile.TemporaryDirectory(prefix="mp4t-") as tmp:
            wav = os.path.join(tmp, "audio.wav")
            self.store.get_file(key, wav)
            return load_wav(wav)


@dataclasses.dataclass(frozen=True)
class Skip:
    """How an optional stage that failed for good leaves the job: result marked, warning added."""

    mark: Callable[[TranscriptResult, str], TranscriptResult]
    warning: str  # prefix of the job's warning; the reason follows
    detail: str  # the event's detail


@dataclasses.dataclass(frozen=True)
class JobStage:
    """A stage of a transcription job, as the runner executes it."""

    actor: str  # actor name; its queue is core.plan.ROUTES[actor]
    stage: Stage  # the job's stage while this runs
    accepts: tuple[Stage, ...]  # stages a job is claimed from (the first is where a retry waits)
    run: Callable[[StageRun], Output]  # loads inputs, calls the pure stage function
    time_limit_s: Callable[[Settings], int]
    model: Callable[[Settings], str]  # model/pipeline label for metrics and traces
    what: str  # for people: "transcription"
    done: str  # outcome of a successful run: "transcribed"
    permanent: tuple[tuple[type[Exception], str], ...] = ()  # errors retrying cannot fix -> reason
    optional: Skip | None = None


def run_job_stage(spec: JobStage, job_id: str) -> None:
    """Run ``spec`` for ``job_id`` as the current message (the body of every job-stage actor)."""
    rt = runtime.get()
    s = rt.settings
    msg_id = message_id()
    structlog.contextvars.bind_contextvars(job_id=job_id, stage=spec.actor)
    claim = jobs.claim_stage(job_id, spec.accepts, spec.stage, msg_id, s.max_attempts, s.lease_s,
                             fail_when_exhausted=spec.optional is None)
    job = _claimed(spec, claim, job_id, s)
    if job is None:
        return
    structlog.contextvars.bind_contextvars(tenant_id=job.tenant_id, attempt=job.attempts)
    tracing.set_attributes(**{"mp4t.job_id": job_id, "mp4t.tenant_id": job.tenant_id, "mp4t.attempt": job.attempts,
                              "mp4t.model": spec.model(s), "mp4t.media.duration_s": job.duration_s})
    started = time.monotonic()
    deadline = started + spec.time_limit_s(s)
    span = plan.percent_span(job.config, spec.stage)
    run = StageRun(job, s, rt.store)
    run.on_seconds = progress_hook(deadline, s.progress_interval_s, lambda done_s: jobs.report_progress(
        job_id, msg_id, done_s, run.audio_s or job.duration_s or 0.0, span=span))
    run.on_fraction = progress_hook(deadline, s.progress_interval_s, lambda fraction: jobs.report_progress(
        job_id, msg_id, job.processed_s, job.duration_s or 0.0, span=span, fraction=fraction))
    try:
        with Watchdog(deadline, lambda: _stop_reason(job_id, msg_id), s.cancel_poll_s, timeout=JobTimeout):
            out = spec.run(run)
    except (Exception, TimeLimitExceeded) as exc:
        _failed(spec, run, exc, msg_id, started)
        return
    _succeeded(spec, run, out, msg_id, started)


def _stop_reason(job_id: str, msg_id: str) -> type[BaseException] | None:
    """Why a running stage must stop now (the watchdog asks every cancel_poll_s), or None."""
    with connection():
        row = (Transcription.select(Transcription.cancel_requested, Transcription.claim_message_id)
               .where(Transcription.id == job_id).first())
    if row is None or row.claim_message_id != msg_id:
        return jobs.LostClaim  # deleted, or taken over after our lease ran out
    return Cancelled if row.cancel_requested else None


def _claimed(spec: JobStage, claim: jobs.Claim, job_id: str, s: Settings) -> Transcription | None:
    """The job to run, or None after dealing with a claim that runs nothing."""
    if claim.outcome == ClaimOutcome.RUN:
        return claim.job
    # PAST (a redelivery after the stage was done) needs nothing: the next stage's message was
    # committed with the stage's result (core.outbox).
    if claim.outcome == ClaimOutcome.EXHAUSTED and spec.optional is None:
        raise JobFailed(claim.job.error_message)  # claim_stage has failed the job
    elif claim.outcome == ClaimOutcome.EXHAUSTED:
        last = claim.job.error_message or "a worker crashed or timed out each time"
        _skip(spec, job_id, None, f"attempted {s.max_attempts} times ({last})")
    else:
        log.info("stage_skipped", outcome=claim.outcome.value)
    return None


def _permanent(spec: JobStage, exc: BaseException, s: Settings) -> tuple[str, str] | None:
    """(reason, message) of a failure retrying cannot fix, or None for a transient one."""
    if isinstance(exc, (JobTimeout, TimeLimitExceeded)):
        return "TIME_LIMIT", f"{spec.what} exceeded the time limit of {spec.time_limit_s(s)} s"
    for cls, reason in spec.permanent:
        if isinstance(exc, cls):
            return reason, str(exc)
    return None


def _failed(spec: JobStage, run: StageRun, exc: BaseException, msg_id: str, started: float) -> None:
    job, s = run.job, run.settings
    if isinstance(exc, Cancelled):
        jobs.finish(job.id, JobState.CANCELLED, reason="CANCELLED", message="cancelled by the client")
        finished(spec.actor, "cancelled", started)
        return
    if isinstance(exc, jobs.LostClaim):
        finished(spec.actor, "lost_claim", started)
        return
    error = f"{type(exc).__name__}: {exc}"
    if is_infrastructure(exc):
        drop_broken_connection()
        jobs.release_for_retry(job.id, msg_id, spec.accepts[0], error, outage=True)
        finished(spec.actor, "outage", started, level="warning", error=error, retrying=True)
        raise exc  # Dramatiq retries it with backoff; the attempt was not counted
    final = _permanent(spec, exc, s)
    if final is None:
        if job.attempts < s.max_attempts:
            jobs.release_for_retry(job.id, msg_id, spec.accepts[0], error)
            finished(spec.actor, "error", started, level="warning", error=error, retrying=True)
            raise exc
        final = "ATTEMPTS_EXHAUSTED", f"{spec.what} failed {job.attempts} times; last error: {error}"
    reason, message = final
    tracing.set_attributes(**{"mp4t.error": message})
    if spec.optional is not None:
        _skip(spec, job.id, msg_id, message)
        finished(spec.actor, reason.lower(), started, level="warning", error=message)
        return
    jobs.finish(job.id, JobState.FAILED, reason=reason, message=message, message_id=msg_id)
    finished(spec.actor, reason.lower(), started, level="warning", error=message)
    raise JobFailed(message) from exc


def _skip(spec: JobStage, job_id: str, msg_id: str | None, error: str) -> None:
    """An optional stage failed for good: the job keeps its work and goes on to the next stage."""
    assert spec.optional is not None
    with outbox.sending():
        jobs.skip_stage(job_id, msg_id, spec.stage, mark=lambda r: spec.optional.mark(r, error),
                        warning=f"{spec.optional.warning}: {error}", detail=spec.optional.detail)


def _succeeded(spec: JobStage, run: StageRun, out: Output, msg_id: str, started: float) -> None:
    job, s = run.job, run.settings
    nxt = plan.next_stage(job.config, spec.stage)
    with outbox.sending():
        done = jobs.stage_done(job.id, msg_id, nxt, result=out.result.to_json(), **out.fields)
    if done is None:
        finished(spec.actor, "lost_claim", started)
        return
    log = dict(out.log)
    model = log.pop("model", None) or spec.model(s)  # the model that ran, where the stage chose one
    rtf = processed(spec.actor, model, out.media_s, time.monotonic() - started)
    tracing.set_attributes(**{"mp4t.rtf": round(rtf, 4)})
    finished(spec.actor, spec.done, started, media_duration_s=round(out.media_s, 3), rtf=round(rtf, 4),
             model=model, **log)


# ---------------------------------------------------------------- media preparation


@dataclasses.dataclass(frozen=True)
class PreparedMedia:
    duration_s: float
    format_name: str
    audio_codec: str
    audio_key: str


def start_waiting_jobs(media_id: str) -> None:
    # Each job continues the trace of the RPC that created it (the upload's, unless the
    # client sent its own context): its outbox message carries that context.
    with outbox.sending():
        jobs.jobs_to_start(media_id)


def _deleted(media_id: str) -> bool:
    try:
        return not jobs.media_exists(media_id)
    except Exception:  # noqa: BLE001 - the database is out: the caller handles its own error
        return False


def run_media_stage(prepare: Callable[[Media, Settings, ObjectStore], PreparedMedia], media_id: str) -> None:
    """Run ``prepare`` for ``media_id`` as the current message, then start the jobs waiting for it.

    ``MediaError`` is permanent (the media and its jobs FAIL); anything else is retried by
    Dramatiq until the media's attempts reach ``max_attempts``.
    """
    rt = runtime.get()
    s = rt.settings
    msg_id = message_id()
    structlog.contextvars.bind_contextvars(media_id=media_id, stage="prepare_media")
    claim = jobs.claim_media(media_id, msg_id, s.max_attempts, s.lease_s)
    if claim.outcome == ClaimOutcome.PAST:  # READY already (redelivery after a crash): make sure jobs run
        start_waiting_jobs(media_id)
        return
    if claim.outcome == ClaimOutcome.EXHAUSTED:
        reason = f"processing this file was attempted {s.max_attempts} times and never finished"
        jobs.media_failed(media_id, reason)
        raise JobFailed(reason)
    if claim.outcome != ClaimOutcome.RUN:
        log.info("stage_skipped", outcome=claim.outcome.value)
        return
    media: Media = claim.job
    structlog.contextvars.bind_contextvars(tenant_id=media.tenant_id, attempt=media.attempts)
    log.info("stage_started")
    tracing.set_attributes(**{"mp4t.media_id": media_id, "mp4t.tenant_id": media.tenant_id,
                              "mp4t.attempt": media.attempts, "mp4t.media.size_bytes": media.size_bytes})
    started = time.monotonic()
    try:
        out = prepare(media, s, rt.store)
    except MediaError as exc:
        jobs.media_failed(media_id, str(exc))
        tracing.set_attributes(**{"mp4t.error": str(exc)})
        finished("prepare_media", "media_invalid", started, error=str(exc))
        raise JobFailed(str(exc)) from exc
    except Exception as exc:
        if _deleted(media_id):  # deleted under us (its original is gone): nothing to retry
            rt.store.delete(audio_key(media.tenant_id, media_id))
            finished("prepare_media", "deleted", started, error=f"{type(exc).__name__}: {exc}")
            return
        if not is_infrastructure(exc):
            raise  # retried by Dramatiq; the attempt counts
        drop_broken_connection()
        jobs.release_media(media_id, msg_id)
        finished("prepare_media", "outage", started, level="warning", error=f"{type(exc).__name__}: {exc}")
        raise  # Dramatiq retries it with backoff; the attempt was not counted
    if jobs.media_ready(media_id, msg_id, duration_s=out.duration_s, format_name=out.format_name,
                        audio_codec=out.audio_codec, audio_key=out.audio_key):
        start_waiting_jobs(media_id)
    elif not jobs.media_exists(media_id):  # deleted while we prepared it: deleted means gone
        rt.store.delete(out.audio_key)
        finished("prepare_media", "deleted", started)
        return
    rtf = processed("prepare_media", "ffmpeg", out.duration_s, time.monotonic() - started)
    tracing.set_attributes(**{"mp4t.media.duration_s": round(out.duration_s, 3), "mp4t.rtf": round(rtf, 4)})
    finished("prepare_media", "ready", started, media_duration_s=round(out.duration_s, 3))


# ---------------------------------------------------------------- the last step


def finalize(job_id: str) -> None:
    """FINALIZING -> SUCCEEDED (a no-op for a job that is not there, e.g. a redelivery)."""
    structlog.contextvars.bind_contextvars(job_id=job_id, stage="finalize")
    started = time.monotonic()
    with outbox.sending():  # the AI items' messages, committed with the success, go out now
        job = jobs.finish(job_id, JobState.SUCCEEDED, only_stage=Stage.FINALIZING)
    if job is not None:
        tracing.set_attributes(**{"mp4t.job_id": job_id, "mp4t.tenant_id": job.tenant_id,
                                  "mp4t.processing_s": job.processing_s})
    finished("finalize", "succeeded" if job else "noop", started)
