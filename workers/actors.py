"""Dramatiq actors: load state, call a pure stage, save state, enqueue the next stage.

Queues (fixed names; see workers.broker): critical = prepare_media, finalize;
high = transcribe; default = (later) enhancement; low = maintenance.
"""
from __future__ import annotations

import datetime as dt
import os
import pathlib
import tempfile
import time
from typing import Any, Callable

import structlog
from dramatiq.middleware import CurrentMessage
from dramatiq.middleware.time_limit import TimeLimitExceeded

from mp4totext import runtime
from observability import metrics, tracing
from storage.db import JobState, Media, MediaState, Stage, Transcription, WorkerInfo, database, utcnow
from workers import jobs
from workers.broker import PRIORITY_MAP
from workers.stages.media import MediaError, extract_audio, load_wav, probe
from workers.stages.transcribe import TranscribeOptions, load_model, transcribe

log = structlog.get_logger(__name__)


class JobFailed(Exception):
    """Permanent failure already recorded on the job: not retried, message dead-lettered."""


class Cancelled(Exception):
    pass


class JobTimeout(Exception):
    pass


def _message_id() -> str:
    msg = CurrentMessage.get_current_message()
    return msg.message_id if msg is not None else "local"


def enqueue(actor_name: str, job_or_media_id: str, priority: int = 5,
            trace_context: dict[str, str] | None = None) -> None:
    """Send a message; ``trace_context`` (a job's stored context) parents its PRODUCER span."""
    from workers.broker import get_actor

    with tracing.attached(trace_context):
        get_actor(actor_name).send_with_options(args=(job_or_media_id,), broker_priority=priority)


def start_waiting_jobs(media_id: str) -> None:
    # Each job continues the trace of the RPC that created it (the upload's, unless the
    # client sent its own context).
    for job in jobs.jobs_to_start(media_id):
        enqueue("transcribe", job.id, job.priority, job.trace_context)


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


def _stage_metrics(stage: str, outcome: str, started: float) -> None:
    metrics.STAGE_DURATION.labels(stage, outcome).observe(time.monotonic() - started)


def audio_key(media: Media) -> str:
    return f"media/{media.tenant_id}/{media.id}/audio.wav"


# ---------------------------------------------------------------- critical: prepare media


def prepare_media(media_id: str) -> None:
    rt = runtime.get()
    s = rt.settings
    msg_id = _message_id()
    structlog.contextvars.bind_contextvars(media_id=media_id, stage="prepare_media")
    claim = jobs.claim_media(media_id, msg_id, s.max_attempts, s.lease_s)
    if claim.outcome == "past":  # READY already (redelivery after a crash): make sure jobs are started
        start_waiting_jobs(media_id)
        return
    if claim.outcome == "exhausted":
        reason = f"processing this file was attempted {s.max_attempts} times and never finished"
        jobs.media_failed(media_id, reason)
        raise JobFailed(reason)
    if claim.outcome != "run":
        log.info("stage_skipped", outcome=claim.outcome)
        return
    media: Media = claim.job
    structlog.contextvars.bind_contextvars(tenant_id=media.tenant_id, attempt=media.attempts)
    tracing.set_attributes(**{"mp4t.media_id": media_id, "mp4t.tenant_id": media.tenant_id,
                              "mp4t.attempt": media.attempts, "mp4t.media.size_bytes": media.size_bytes})
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mp4t-") as tmp:
        src, wav = os.path.join(tmp, "original"), os.path.join(tmp, "audio.wav")
        try:
            with tracing.stage_span("download original", **{"mp4t.media.size_bytes": media.size_bytes}):
                rt.store.get_file(media.object_key, src)
            with tracing.stage_span("probe") as span:
                info = probe(src, s.ffprobe)
                span.set_attributes({"mp4t.media.duration_s": info.duration_s, "mp4t.media.format": info.format_name,
                                     "mp4t.media.audio_codec": info.audio_codec or ""})
            if info.duration_s > s.max_media_duration_s:
                raise MediaError(
                    f"the file is {info.duration_s / 3600:.1f} h long; the limit is "
                    f"{s.max_media_duration_s / 3600:.1f} h: split it into shorter parts"
                )
            with tracing.stage_span("extract audio", **{"mp4t.media.duration_s": info.duration_s}):
                duration = extract_audio(src, wav, s.ffmpeg, timeout=s.prepare_time_limit_s,
                                         expected_duration_s=info.duration_s)
            key = audio_key(media)
            with tracing.stage_span("store audio"):
                rt.store.put_file(key, wav, "audio/wav")
        except MediaError as exc:
            jobs.media_failed(media_id, str(exc))
            _stage_metrics("prepare_media", "media_invalid", started)
            tracing.set_attributes(**{"mp4t.error": str(exc)})
            log.info("stage_finished", outcome="media_invalid", error=str(exc),
                     duration_s=round(time.monotonic() - started, 3))
            raise JobFailed(str(exc)) from exc
    if jobs.media_ready(media_id, msg_id, duration_s=duration, format_name=info.format_name,
                        audio_codec=info.audio_codec, audio_key=key):
        start_waiting_jobs(media_id)
    elapsed = time.monotonic() - started
    _stage_metrics("prepare_media", "ready", started)
    metrics.REALTIME_FACTOR.labels("prepare_media", "ffmpeg").observe(elapsed / max(duration, 1e-6))
    metrics.MEDIA_SECONDS.labels("prepare_media", "ffmpeg").inc(duration)
    tracing.set_attributes(**{"mp4t.media.duration_s": round(duration, 3),
                              "mp4t.rtf": round(elapsed / max(duration, 1e-6), 4)})
    log.info("stage_finished", outcome="ready", media_duration_s=round(duration, 3),
             duration_s=round(elapsed, 3))


# ---------------------------------------------------------------- high: transcribe


def options_of(job: Transcription, default_beam: int) -> TranscribeOptions:
    cfg: dict[str, Any] = job.config or {}
    return TranscribeOptions(
        language=cfg.get("language") or None,
        beam_size=int(cfg.get("beam_size") or default_beam),
        vad_filter=bool(cfg.get("vad", True)),
        word_timestamps=bool(cfg.get("word_timestamps", True)),
        task=cfg.get("task") or "transcribe",
        initial_prompt=cfg.get("initial_prompt") or None,
        hotwords=tuple(cfg.get("hotwords") or ()),
    )


# Which actor runs a job that sits in a stage (recovery after a lost enqueue).
NEXT_ACTOR = {Stage.WAITING: "transcribe", Stage.TRANSCRIBING: "transcribe", Stage.DIARIZING: "diarize",
              Stage.FINALIZING: "finalize"}


def wants_speakers(job: Transcription) -> bool:
    return bool(((job.config or {}).get("diarization") or {}).get("enabled"))


def transcribe_job(job_id: str) -> None:
    rt = runtime.get()
    s = rt.settings
    msg_id = _message_id()
    structlog.contextvars.bind_contextvars(job_id=job_id, stage="transcribe")
    claim = jobs.claim_stage(job_id, (Stage.WAITING, Stage.TRANSCRIBING), Stage.TRANSCRIBING, msg_id,
                             s.max_attempts, s.lease_s)
    if claim.outcome == "past" and claim.job.stage in NEXT_ACTOR:
        enqueue(NEXT_ACTOR[claim.job.stage], job_id, claim.job.priority)  # crashed between commit and enqueue
        return
    if claim.outcome == "exhausted":
        raise JobFailed(claim.job.error_message)
    if claim.outcome != "run":
        log.info("stage_skipped", outcome=claim.outcome)
        return
    job: Transcription = claim.job
    structlog.contextvars.bind_contextvars(tenant_id=job.tenant_id, attempt=job.attempts)
    tracing.set_attributes(**{"mp4t.job_id": job_id, "mp4t.tenant_id": job.tenant_id, "mp4t.attempt": job.attempts,
                              "mp4t.model": s.model_label, "mp4t.media.duration_s": job.duration_s})
    started = time.monotonic()
    deadline = started + s.job_time_limit_s
    speakers = wants_speakers(job)
    pct_span = (jobs.STAGE_PERCENT[Stage.TRANSCRIBING],
                jobs.STAGE_PERCENT[Stage.DIARIZING if speakers else Stage.FINALIZING])
    on_progress = progress_hook(deadline, s.progress_interval_s, lambda processed_s: jobs.report_progress(
        job_id, msg_id, processed_s, duration, span=pct_span))

    opts = options_of(job, s.whisper_beam_size)
    try:
        with database.connection_context():
            media = Media.get_by_id(job.media_id)
        with tracing.stage_span("load audio"), tempfile.TemporaryDirectory(prefix="mp4t-") as tmp:
            wav = os.path.join(tmp, "audio.wav")
            rt.store.get_file(media.audio_key, wav)
            audio = load_wav(wav)
        duration = len(audio) / 16000
        model = load_model(s.whisper_model, s.whisper_device, s.whisper_compute_type, s.whisper_cpu_threads,
                           s.whisper_download_root, s.whisper_local_files_only)
        with tracing.stage_span("whisper transcribe", **{
                "mp4t.model": s.model_label, "mp4t.media.duration_s": round(duration, 3),
                "mp4t.beam_size": opts.beam_size, "mp4t.vad": opts.vad_filter,
                "mp4t.language": opts.language or "auto"}) as span:
            t0 = time.monotonic()
            result = transcribe(model, audio, opts, on_progress, s.model_label)
            whisper_s = time.monotonic() - t0
            span.set_attributes({"mp4t.rtf": round(whisper_s / max(duration, 1e-6), 4),
                                 "mp4t.segments": len(result.get("segments", [])),
                                 "mp4t.detected_language": result.get("language") or ""})
    except Cancelled:
        jobs.finish(job_id, JobState.CANCELLED, reason="CANCELLED", message="cancelled by the client")
        _stage_metrics("transcribe", "cancelled", started)
        log.info("stage_finished", outcome="cancelled", duration_s=round(time.monotonic() - started, 3))
        return
    except jobs.LostClaim:
        _stage_metrics("transcribe", "lost_claim", started)
        log.info("stage_finished", outcome="lost_claim")
        return
    except (JobTimeout, TimeLimitExceeded) as exc:
        msg = f"transcription exceeded the time limit of {s.job_time_limit_s} s"
        jobs.finish(job_id, JobState.FAILED, reason="TIME_LIMIT", message=msg, message_id=msg_id)
        _stage_metrics("transcribe", "time_limit", started)
        raise JobFailed(msg) from exc
    except MediaError as exc:
        jobs.finish(job_id, JobState.FAILED, reason="MEDIA_INVALID", message=str(exc), message_id=msg_id)
        _stage_metrics("transcribe", "media_invalid", started)
        raise JobFailed(str(exc)) from exc
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        _stage_metrics("transcribe", "error", started)
        if job.attempts >= s.max_attempts:
            jobs.finish(job_id, JobState.FAILED, reason="ATTEMPTS_EXHAUSTED", message_id=msg_id,
                        message=f"transcription failed {job.attempts} times; last error: {error}")
            raise JobFailed(error) from exc
        jobs.release_for_retry(job_id, msg_id, Stage.WAITING, error)
        log.warning("stage_retry", error=error)
        raise
    elapsed = time.monotonic() - started
    rtf = elapsed / max(result["duration"], 1e-6)
    if not speakers:
        result["diarization"] = {"state": "NOT_REQUESTED"}
    next_stage = Stage.DIARIZING if speakers else Stage.FINALIZING
    done = jobs.stage_done(job_id, msg_id, next_stage, result=result, processed_s=result["duration"])
    _stage_metrics("transcribe", "transcribed" if done else "lost_claim", started)
    metrics.REALTIME_FACTOR.labels("transcribe", s.model_label).observe(rtf)
    metrics.MEDIA_SECONDS.labels("transcribe", s.model_label).inc(result["duration"])
    tracing.set_attributes(**{"mp4t.rtf": round(rtf, 4)})
    log.info("stage_finished", outcome="transcribed" if done else "lost_claim", duration_s=round(elapsed, 3),
             media_duration_s=result["duration"], rtf=round(rtf, 4), model=s.model_label)
    if done is not None:
        enqueue("diarize" if speakers else "finalize", job_id, done.priority)


# ---------------------------------------------------------------- diarize: speaker recognition


def diarize_job(job_id: str) -> None:
    """Speakers for a transcribed job. Failing for good keeps the transcript (with a warning)."""
    from workers.stages.diarize import DiarizationUnavailable, load_pipeline, run_stage

    rt = runtime.get()
    s = rt.settings
    msg_id = _message_id()
    structlog.contextvars.bind_contextvars(job_id=job_id, stage="diarize")
    claim = jobs.claim_stage(job_id, (Stage.DIARIZING,), Stage.DIARIZING, msg_id, s.max_attempts, s.lease_s,
                             fail_when_exhausted=False)
    if claim.outcome == "past" and claim.job.stage == Stage.FINALIZING:
        enqueue("finalize", job_id, claim.job.priority)
        return
    if claim.outcome == "exhausted":
        last = claim.job.error_message or "a worker crashed or timed out each time"
        kept = jobs.keep_without_speakers(job_id, None, f"attempted {s.max_attempts} times ({last})")
        if kept is not None:
            enqueue("finalize", job_id, kept.priority)
        return
    if claim.outcome != "run":
        log.info("stage_skipped", outcome=claim.outcome)
        return
    job: Transcription = claim.job
    dia = (job.config or {}).get("diarization") or {}
    structlog.contextvars.bind_contextvars(tenant_id=job.tenant_id, attempt=job.attempts)
    tracing.set_attributes(**{"mp4t.job_id": job_id, "mp4t.tenant_id": job.tenant_id, "mp4t.attempt": job.attempts,
                              "mp4t.diarization.pipeline": s.diarization_pipeline})
    started = time.monotonic()
    deadline = started + s.diarization_time_limit_s
    pct_span = (jobs.STAGE_PERCENT[Stage.DIARIZING], jobs.STAGE_PERCENT[Stage.FINALIZING])
    on_progress = progress_hook(deadline, s.progress_interval_s, lambda fraction: jobs.report_progress(
        job_id, msg_id, job.processed_s, job.duration_s or 0.0, span=pct_span, fraction=fraction))

    def give_up(reason: str, outcome: str) -> None:
        kept = jobs.keep_without_speakers(job_id, msg_id, reason)
        _stage_metrics("diarize", outcome, started)
        log.warning("stage_finished", outcome=outcome, error=reason, duration_s=round(time.monotonic() - started, 3))
        if kept is not None:
            enqueue("finalize", job_id, kept.priority)

    try:
        with database.connection_context():
            media = Media.get_by_id(job.media_id)
        with tracing.stage_span("load audio"), tempfile.TemporaryDirectory(prefix="mp4t-") as tmp:
            wav = os.path.join(tmp, "audio.wav")
            rt.store.get_file(media.audio_key, wav)
            audio = load_wav(wav)
        pipeline = load_pipeline(s.diarization_pipeline, s.diarization_device, s.hf_token, s.diarization_batch_size)
        span_attrs = {"mp4t.media.duration_s": round(len(audio) / 16000, 3),
                      "mp4t.diarization.pipeline": s.diarization_pipeline}
        with tracing.stage_span("pyannote diarization", **span_attrs) as span:
            result = run_stage(pipeline, audio, job.result or {}, int(dia.get("min_speakers") or 0),
                               int(dia.get("max_speakers") or 0), on_progress, pipeline_label(s.diarization_pipeline))
            span.set_attributes({"mp4t.speaker_count": result["speaker_count"],
                                 "mp4t.rtf": round((time.monotonic() - started) / max(len(audio) / 16000, 1e-6), 4)})
    except Cancelled:
        jobs.finish(job_id, JobState.CANCELLED, reason="CANCELLED", message="cancelled by the client")
        _stage_metrics("diarize", "cancelled", started)
        return
    except jobs.LostClaim:
        _stage_metrics("diarize", "lost_claim", started)
        return
    except (JobTimeout, TimeLimitExceeded):
        give_up(f"speaker recognition exceeded its time limit of {s.diarization_time_limit_s} s", "time_limit")
        return
    except DiarizationUnavailable as exc:  # misconfigured worker: retrying here will not help
        give_up(str(exc), "unavailable")
        return
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        _stage_metrics("diarize", "error", started)
        if job.attempts >= s.max_attempts:
            give_up(f"failed {job.attempts} times; last error: {error}", "failed")
            return
        jobs.release_for_retry(job_id, msg_id, Stage.DIARIZING, error)
        log.warning("stage_retry", error=error)
        raise
    elapsed = time.monotonic() - started
    audio_s = len(audio) / 16000
    done = jobs.stage_done(job_id, msg_id, Stage.FINALIZING, result=result)
    _stage_metrics("diarize", "diarized" if done else "lost_claim", started)
    label = pipeline_label(s.diarization_pipeline)
    metrics.REALTIME_FACTOR.labels("diarize", label).observe(elapsed / max(audio_s, 1e-6))
    metrics.MEDIA_SECONDS.labels("diarize", label).inc(audio_s)
    log.info("stage_finished", outcome="diarized" if done else "lost_claim", duration_s=round(elapsed, 3),
             speakers=result["speaker_count"], rtf=round(elapsed / max(audio_s, 1e-6), 4))
    if done is not None:
        enqueue("finalize", job_id, done.priority)


def pipeline_label(source: str) -> str:
    """Short name of a pipeline source for results and metrics (a directory's name, or the HF id)."""
    p = pathlib.Path(source)
    return p.name if source.startswith(("/", ".", "~")) else source


# ---------------------------------------------------------------- critical: finalize


def finalize(job_id: str) -> None:
    structlog.contextvars.bind_contextvars(job_id=job_id, stage="finalize")
    started = time.monotonic()
    job = jobs.finish(job_id, JobState.SUCCEEDED, only_stage=Stage.FINALIZING)
    outcome = "succeeded" if job else "noop"
    if job is not None:
        tracing.set_attributes(**{"mp4t.job_id": job_id, "mp4t.tenant_id": job.tenant_id,
                                  "mp4t.processing_s": job.processing_s})
    _stage_metrics("finalize", outcome, started)
    log.info("stage_finished", outcome=outcome, duration_s=round(time.monotonic() - started, 3))


# ---------------------------------------------------------------- low: maintenance


def maintenance(_unused: str = "") -> None:
    """Abort stale multipart uploads and re-enqueue work whose message was lost.

    A message can be lost only if a process died between committing a state change and
    enqueueing the next stage; re-enqueueing is safe because every actor is idempotent.
    """
    rt = runtime.get()
    s = rt.settings
    structlog.contextvars.bind_contextvars(stage="maintenance")
    aborted = rt.store.abort_stale_uploads(dt.timedelta(seconds=s.stale_upload_s))
    cutoff = utcnow() - dt.timedelta(seconds=s.stuck_after_s)
    with database.connection_context():
        stuck_media = list(Media.select(Media.id, Media.trace_context).where(Media.state == MediaState.PROCESSING,
                                                        Media.update_time < cutoff))
        stuck_jobs = list(Transcription.select(Transcription.id, Transcription.priority, Transcription.stage,
                                               Transcription.trace_context).where(
            ((Transcription.state == JobState.QUEUED) & (Transcription.stage.in_([Stage.WAITING, Stage.DIARIZING]))
             & (Transcription.update_time < cutoff))
            | ((Transcription.state == JobState.RUNNING) & (Transcription.heartbeat_time < cutoff))
            | ((Transcription.stage == Stage.FINALIZING) & (Transcription.update_time < cutoff))))
    # Workers that died without deregistering (SIGKILL, OOM) are forgotten after a day.
    with database.connection_context():
        WorkerInfo.delete().where(WorkerInfo.heartbeat_time < utcnow() - dt.timedelta(days=1)).execute()
    # Recovered work continues the trace it belongs to.
    for m in stuck_media:
        enqueue("prepare_media", m.id, PRIORITY_MAP[0], m.trace_context)
    for j in stuck_jobs:
        enqueue(NEXT_ACTOR.get(j.stage, "transcribe"), j.id, j.priority, j.trace_context)
    log.info("stage_finished", outcome="maintenance", aborted_uploads=aborted,
             requeued=len(stuck_media) + len(stuck_jobs))
