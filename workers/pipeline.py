"""The stage runner: runs a pipeline stage for a Dramatiq message, under the supervisor.

For a job stage it claims the job for this message, binds log and trace context, builds the
unit (deadline, throttled progress, cancellation, the stage's failure policy) that
``workers.supervisor`` runs, saves the result and enqueues the next stage (``core.plan``). A
stage is a short declaration (``workers.actors``) around a pure function (``workers.stages``).

A stage's failures follow ``workers.supervisor.Policy``: errors that say they are not retryable
(bad media, no pipeline) or the stage's ``permanent`` classes and the time limit are final at
once; an outage is retried uncounted; anything else is retried until the job's attempts reach
``max_attempts``. A final failure fails the job, unless the stage is optional: then the job
keeps its work and goes on without the stage, with a warning (``Skip``).
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

from core import jobs, leases, outbox, plan, runtime
from core.leases import Holder
from mp4totext.config import Settings
from mp4totext.contracts import ClaimOutcome, JobConfig, JobState, Stage, TranscriptResult
from observability import metrics, tracing
from storage.db import Leased, Media, Transcription, connection
from storage.objects import ObjectStore, audio_key
from workers.stages.media import SAMPLE_RATE, load_wav
from workers.supervisor import Cancelled, JobFailed, JobTimeout, Policy, Unit, finished, supervise
from workers.watchdog import Watchdog

__all__ = ["Cancelled", "JobFailed", "JobTimeout", "Output", "Skip", "StageRun", "JobStage", "run_job_stage",
           "run_media_stage", "finalize", "finished", "message_id", "processed"]

log = structlog.get_logger(__name__)


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
    supervise(_JobStageUnit(spec, run, msg_id, started, deadline), s.cancel_poll_s)


def stop_reason(model: type[Leased], row_id: str, msg_id: str) -> type[BaseException] | None:
    """Why running work on the row must stop now (the watchdog asks every cancel_poll_s), or None."""
    holder = leases.holder(model, row_id, msg_id)
    if holder is Holder.LOST:
        return jobs.LostClaim  # deleted, or taken over after our lease ran out
    return Cancelled if holder is Holder.CANCEL else None


class _JobStageUnit(Unit):
    """A job stage as the supervisor runs it (workers.supervisor.Unit)."""

    def __init__(self, spec: JobStage, run: StageRun, msg_id: str, started: float, deadline: float) -> None:
        s = run.settings
        self.spec, self.job, self.msg_id, self.started, self.s = spec, run.job, msg_id, started, s
        self.stage_run, self.stage, self.attempts, self.deadline = run, spec.actor, run.job.attempts, deadline
        self.policy = Policy(what=spec.what, max_attempts=s.max_attempts, final=spec.permanent,
                             time_limit=f"{spec.what} exceeded the time limit of {spec.time_limit_s(s)} s")

    def stop_reason(self) -> type[BaseException] | None:
        return stop_reason(Transcription, self.job.id, self.msg_id)

    def run(self, _dog: Watchdog) -> Output:
        return self.spec.run(self.stage_run)

    def succeeded(self, out: Output) -> tuple[str, dict[str, Any]] | None:
        nxt = plan.next_stage(self.job.config, self.spec.stage)
        with outbox.sending():
            if jobs.stage_done(self.job.id, self.msg_id, nxt, result=out.result.to_json(), **out.fields) is None:
                return None
        fields = dict(out.log)
        model = fields.pop("model", None) or self.spec.model(self.s)  # the model that ran, where the stage chose one
        rtf = processed(self.spec.actor, model, out.media_s, time.monotonic() - self.started)
        tracing.set_attributes(**{"mp4t.rtf": round(rtf, 4)})
        return self.spec.done, dict(media_duration_s=round(out.media_s, 3), rtf=round(rtf, 4), model=model, **fields)

    def cancelled(self) -> None:
        jobs.finish(self.job.id, JobState.CANCELLED, reason="CANCELLED", message="cancelled by the client")

    def failed(self, reason: str, message: str) -> bool:
        if self.spec.optional is not None:
            _skip(self.spec, self.job.id, self.msg_id, message)
            return False
        jobs.finish(self.job.id, JobState.FAILED, reason=reason, message=message, message_id=self.msg_id)
        return True

    def release(self, error: str, counted: bool) -> None:
        jobs.release_for_retry(self.job.id, self.msg_id, self.spec.accepts[0], error, outage=not counted)


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


def _skip(spec: JobStage, job_id: str, msg_id: str | None, error: str) -> None:
    """An optional stage failed for good: the job keeps its work and goes on to the next stage."""
    assert spec.optional is not None
    with outbox.sending():
        jobs.skip_stage(job_id, msg_id, spec.stage, mark=lambda r: spec.optional.mark(r, error),
                        warning=f"{spec.optional.warning}: {error}", detail=spec.optional.detail)


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


def run_media_stage(prepare: Callable[[Media, Settings, ObjectStore], PreparedMedia], media_id: str) -> None:
    """Run ``prepare`` for ``media_id`` as the current message, then start the jobs waiting for it.

    ``MediaError`` is final (the media and its jobs FAIL); anything else is retried by Dramatiq
    until the media's attempts reach ``max_attempts`` (an outage uncounted).
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
    supervise(_MediaUnit(prepare, media, msg_id, rt.store, s), s.cancel_poll_s)


class _MediaUnit(Unit):
    """Preparing an uploaded file as the supervisor runs it (workers.supervisor.Unit)."""

    stage = "prepare_media"
    # ffmpeg's own timeout (MP4T_PREPARE_TIME_LIMIT_S) comes first, with its own message; the rest
    # covers downloading the upload and storing the audio
    MARGIN_S = 600

    def __init__(self, prepare: Callable[[Media, Settings, ObjectStore], PreparedMedia], media: Media, msg_id: str,
                 store: ObjectStore, s: Settings) -> None:
        self.prepare, self.media, self.msg_id, self.store, self.s = prepare, media, msg_id, store, s
        self.started = time.monotonic()
        self.attempts, self.deadline = media.attempts, self.started + 2 * s.prepare_time_limit_s + self.MARGIN_S
        self.policy = Policy(
            what="preparing the media", max_attempts=s.max_attempts,
            time_limit=f"preparing the media exceeded its time limit of {2 * s.prepare_time_limit_s + self.MARGIN_S} s",
            exhausted=lambda exc, n: f"processing this file was attempted {n} times and never finished; "
                                     f"last error: {type(exc).__name__}: {exc}")

    def stop_reason(self) -> type[BaseException] | None:
        leases.heartbeat(Media, self.media.id, self.msg_id, self.s.lease_s / 3)
        return stop_reason(Media, self.media.id, self.msg_id)

    def run(self, _dog: Watchdog) -> PreparedMedia:
        return self.prepare(self.media, self.s, self.store)

    def succeeded(self, out: PreparedMedia) -> tuple[str, dict[str, Any]] | None:
        if jobs.media_ready(self.media.id, self.msg_id, duration_s=out.duration_s, format_name=out.format_name,
                            audio_codec=out.audio_codec, audio_key=out.audio_key):
            start_waiting_jobs(self.media.id)
        elif not jobs.media_exists(self.media.id):  # deleted while we prepared it: deleted means gone
            self.store.delete(out.audio_key)
            return "deleted", {}
        rtf = processed("prepare_media", "ffmpeg", out.duration_s, time.monotonic() - self.started)
        tracing.set_attributes(**{"mp4t.media.duration_s": round(out.duration_s, 3), "mp4t.rtf": round(rtf, 4)})
        return "ready", {"media_duration_s": round(out.duration_s, 3)}

    def failed(self, reason: str, message: str) -> bool:
        jobs.media_failed(self.media.id, message)
        return True

    def release(self, error: str, counted: bool) -> None:
        if not counted:  # a counted retry keeps the claim: Dramatiq redelivers the same message id
            jobs.release_media(self.media.id, self.msg_id)

    def gone(self) -> bool:
        """Deleted under us (its original is gone): nothing to retry."""
        try:
            deleted = not jobs.media_exists(self.media.id)
        except Exception:  # noqa: BLE001 - the database is out: the outage is handled as one
            return False
        if deleted:
            self.store.delete(audio_key(self.media.tenant_id, self.media.id))
        return deleted


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
