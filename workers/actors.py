"""The pipeline's actors: each a short declaration the stage runner (workers.pipeline) executes.

A declaration names the actor (its queue is ``core.plan.ROUTES``), the job stage it runs in,
how it loads its inputs and calls its pure stage function (``workers.stages``), its time limit
and its failure policy. Adding a stage = a pure function + a declaration here + its place in
``core.plan`` + tests.
"""
from __future__ import annotations

import functools
import os
import tempfile
import time
from typing import Any, Callable

import ctranslate2
import dramatiq

from core.failures import outage_retries
from core.models import ModelSet, ModelSpec
from core.plan import ROUTES, time_limits_s
from mp4totext.config import Settings
from mp4totext.contracts import Stage, TranscriptResult
from observability import tracing
from storage.db import Media
from storage.objects import ObjectStore, audio_key
from workers import ai_runner, maintenance, retention, usage_reports, webhooks
from workers.pipeline import (
    JobFailed,
    JobStage,
    Output,
    PreparedMedia,
    Skip,
    StageRun,
    finalize,
    run_job_stage,
    run_media_stage,
)
from workers.stages.diarize import DiarizationUnavailable, load_pipeline, pipeline_label, run_stage
from workers.stages.known_speakers import voice_of
from workers.stages.media import SAMPLE_RATE, MediaError, extract_audio, probe
from workers.stages.model_files import ModelFilesMissing, locate
from workers.stages.transcribe import Batching, ModelUnavailable, TranscribeOptions, load_model, transcribe_routed

# ---------------------------------------------------------------- inputs -> pure function -> output


def prepare_audio(media: Media, s: Settings, store: ObjectStore) -> PreparedMedia:
    """Original upload -> probe -> duration limit -> 16 kHz mono WAV in the object store."""
    with tempfile.TemporaryDirectory(prefix="mp4t-") as tmp:
        src, wav = os.path.join(tmp, "original"), os.path.join(tmp, "audio.wav")
        with tracing.stage_span("download original", **{"mp4t.media.size_bytes": media.size_bytes}):
            store.get_file(media.object_key, src)
        with tracing.stage_span("probe") as span:
            info = probe(src, s.ffprobe)
            span.set_attributes({"mp4t.media.duration_s": info.duration_s, "mp4t.media.format": info.format_name,
                                 "mp4t.media.audio_codec": info.audio_codec or ""})
        with tracing.stage_span("extract audio", **{"mp4t.media.duration_s": info.duration_s}):
            duration = extract_audio(src, wav, s.ffmpeg, timeout=s.prepare_time_limit_s,
                                     expected_duration_s=info.duration_s, max_duration_s=s.max_media_duration_s)
        key = audio_key(media.tenant_id, media.id)
        with tracing.stage_span("store audio"):
            store.put_file(key, wav, "audio/wav")
    return PreparedMedia(duration, info.format_name, info.audio_codec, key)


@functools.lru_cache(maxsize=8)
def load_spec(s: Settings, spec: ModelSpec) -> Any:
    """One model of the set, loaded once per process: jobs do not re-check the model files."""
    try:
        path = locate(spec.source, s.resolved_models_dir)
    except ModelFilesMissing as exc:
        raise ModelUnavailable(f"cannot load whisper model {spec.name!r}: {exc}") from exc
    return load_model(path, s.whisper_device, s.whisper_compute_type, s.whisper_cpu_threads,
                      s.whisper_download_root, s.whisper_local_files_only, s.whisper_num_workers)


@functools.lru_cache(maxsize=8)
def load_detector(s: Settings, spec: ModelSpec) -> Any:
    """The language detector: the same model at MP4T_WHISPER_DETECT_COMPUTE_TYPE (when the device has it)."""
    if not s.whisper_detect_compute_type or s.whisper_detect_compute_type == s.whisper_compute_type:
        return load_spec(s, spec)
    device = load_spec(s, spec).model.device
    if s.whisper_detect_compute_type not in ctranslate2.get_supported_compute_types(device):
        return load_spec(s, spec)
    return load_model(locate(spec.source, s.resolved_models_dir), device, s.whisper_detect_compute_type,
                      s.whisper_cpu_threads, s.whisper_download_root, s.whisper_local_files_only, s.whisper_num_workers)


def whisper_model(s: Settings) -> dict[str, Any]:
    """Every model of the configured set (and the detector), loaded (a transcription worker does this at start)."""
    models = ModelSet.of(s.model_sources)
    loaded = {spec.name: load_spec(s, spec) for spec in models.specs}
    detector = models.detector(None)
    if detector is not None:
        load_detector(s, detector)
    return loaded


def _added_warnings(job: Any, *warnings: str) -> dict[str, Any]:
    """The job's ``warnings`` column with ``warnings`` added (each once), or nothing to save."""
    return {"warnings": list(dict.fromkeys([*(job.warnings or []), *warnings]))} if warnings else {}


def _warnings(result: Any, s: Settings, job: Any) -> dict[str, Any]:
    if not result.language_uncertain:
        return {}
    return _added_warnings(job, f"the spoken language was detected as {result.language!r} with only "
                           f"{result.language_probability:.0%} confidence (below {s.language_min_probability:.0%}); "
                           "if the transcript looks wrong, transcribe again with config.language_code or "
                           "expected_language_codes")


def run_transcription(run: StageRun) -> Output:
    s = run.settings
    audio = run.audio()
    opts = TranscribeOptions.of(run.config, s.whisper_beam_size)
    models = ModelSet.of(s.model_sources)
    with tracing.stage_span("whisper transcribe", **{"mp4t.models": models.label,
                                                     "mp4t.media.duration_s": round(run.audio_s or 0.0, 3),
                                                     **opts.span_attributes()}) as span:
        started = time.monotonic()
        result = transcribe_routed(models, functools.partial(load_spec, s), audio, opts, run.on_seconds,
                                   s.language_min_probability, Batching(s.whisper_batch_min_s, s.whisper_batch_size),
                                   functools.partial(load_detector, s))
        span.set_attributes({"mp4t.rtf": round((time.monotonic() - started) / max(result.duration, 1e-6), 4),
                             "mp4t.segments": len(result.segments), "mp4t.detected_language": result.language,
                             "mp4t.model": result.model})
    return Output(result, result.duration, fields={"processed_s": result.duration, **_warnings(result, s, run.job)},
                  log={"model": result.model, "language": result.language,
                       "language_probability": result.language_probability})


def diarization_pipeline(s: Settings) -> Any:
    return load_pipeline(s.diarization_pipeline, s.diarization_device, s.hf_token, s.diarization_batch_size)


def _reference_voices(run: StageRun, pipeline: Any) -> tuple[dict[str, Any], list[str]]:
    """The known speakers' voice embeddings, and a warning for each reference that cannot be
    used (its media deleted since the job was created, or too little voice in its stretch)."""
    voices: dict[str, Any] = {}
    problems: list[str] = []
    for ref in run.config.diarization.known_speakers:
        audio = run.media_audio(ref.media_id)
        clip = None if audio is None else audio[int(ref.start_s * SAMPLE_RATE):
                                                int((ref.end_s or len(audio) / SAMPLE_RATE) * SAMPLE_RATE)]
        voice = None if clip is None else voice_of(pipeline, clip)
        if voice is None:
            why = "was deleted" if audio is None else "holds too little voice in its stretch"
            problems.append(f"known speaker {ref.name!r} was not used: media/{ref.media_id} {why}")
        else:
            voices[ref.name] = voice
    return voices, problems


def run_diarization(run: StageRun) -> Output:
    s = run.settings
    audio = run.audio()
    dia = run.config.diarization
    pipeline = diarization_pipeline(s)
    label = pipeline_label(s.diarization_pipeline)
    with tracing.stage_span("pyannote diarization", **{"mp4t.media.duration_s": round(run.audio_s or 0.0, 3),
                                                       "mp4t.diarization.pipeline": s.diarization_pipeline}) as span:
        started = time.monotonic()
        references, problems = _reference_voices(run, pipeline)
        result = run_stage(pipeline, audio, run.result, dia.min_speakers or 0, dia.max_speakers or 0,
                           run.on_fraction, label, references, s.known_speaker_threshold)
        identified = sum(sp.identified for sp in result.speakers)
        span.set_attributes({"mp4t.speaker_count": result.speaker_count, "mp4t.speakers_identified": identified,
                             "mp4t.rtf": round((time.monotonic() - started) / max(run.audio_s or 0.0, 1e-6), 4)})
    return Output(result, run.audio_s or 0.0, fields=_added_warnings(run.job, *problems),
                  log={"speakers": result.speaker_count, "identified": identified})


# ---------------------------------------------------------------- the job stages

TRANSCRIBE = JobStage(
    actor="transcribe", stage=Stage.TRANSCRIBING, accepts=(Stage.WAITING, Stage.TRANSCRIBING),
    run=run_transcription, time_limit_s=lambda s: s.job_time_limit_s, model=lambda s: s.model_label,
    what="transcription", done="transcribed", permanent=((MediaError, "MEDIA_INVALID"),))

DIARIZE = JobStage(
    actor="diarize", stage=Stage.DIARIZING, accepts=(Stage.DIARIZING,),
    run=run_diarization, time_limit_s=lambda s: s.diarization_time_limit_s,
    model=lambda s: pipeline_label(s.diarization_pipeline), what="speaker recognition", done="diarized",
    # a misconfigured worker: retrying here will not help
    permanent=((DiarizationUnavailable, "UNAVAILABLE"),),
    optional=Skip(mark=TranscriptResult.without_speakers, detail="DIARIZATION_FAILED",
                  warning="speaker recognition failed, the transcript has no speaker labels"))


def _job_actor(spec: JobStage) -> Callable[[str], None]:
    def actor(job_id: str) -> None:
        run_job_stage(spec, job_id)

    actor.__name__ = actor.__qualname__ = spec.actor
    return actor


def _prepare_media(media_id: str) -> None:
    run_media_stage(prepare_audio, media_id)


def register(broker: dramatiq.Broker, s: Settings) -> dict[str, dramatiq.Actor]:
    """Declare every actor on ``broker`` with its queue, time limit and retry policy.

    Retries: Dramatiq's own, with backoff; the job's attempt counter decides when to stop
    (``max_attempts``). An outage (core.failures) is retried apart from it, long enough to
    wait out ``outage_budget_s``. ``JobFailed`` (recorded on the job already) is never retried.
    """
    # Enough retries to wait out an outage, plus the job's own attempts (its attempt counter, not
    # this bound, ends a crash loop with JobFailed).
    max_retries = outage_retries(s.outage_budget_s, s.retry_min_backoff_ms, s.retry_max_backoff_ms) + s.max_attempts + 2
    retry = {"max_retries": max_retries, "min_backoff": s.retry_min_backoff_ms, "max_backoff": s.retry_max_backoff_ms,
             "throws": (JobFailed,)}
    limits_s = {**time_limits_s(s), "maintenance": 600, "enhance": s.ai_time_limit_s + 60,
                "deliver_webhook": int(2 * s.webhook_timeout_s) + 60}
    functions: dict[str, Callable[[str], None]] = {
        "prepare_media": _prepare_media, "transcribe": _job_actor(TRANSCRIBE), "diarize": _job_actor(DIARIZE),
        "finalize": finalize, "maintenance": maintenance.sweep, "enhance": ai_runner.run_enhancement,
        "deliver_webhook": webhooks.deliver}
    functions[retention.ACTOR], limits_s[retention.ACTOR] = retention.sweep, 3600  # core.retention (low queue)
    retries = {name: retry for name in functions}
    retries[retention.ACTOR] = {"max_retries": 0}  # its next scheduled run is the retry
    functions[usage_reports.ACTOR], limits_s[usage_reports.ACTOR] = usage_reports.report, 600  # weekly report
    retries[usage_reports.ACTOR] = retry  # idempotent: a retry after an outage writes it once
    retries["enhance"] = {**retry, "max_retries": max_retries + max(0, s.llm_max_attempts - s.max_attempts)}
    return {name: dramatiq.actor(fn, actor_name=name, queue_name=ROUTES[name], broker=broker,
                                 time_limit=int(limits_s[name] * 1000), **retries[name])
            for name, fn in functions.items()}
