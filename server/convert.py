"""Database rows and bus events -> protobuf messages (pure functions)."""
from __future__ import annotations

import datetime as dt
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from mp4totext.v1 import media_pb2, transcription_pb2 as tpb
from storage.db import Media, Transcription

PRIORITY_FROM_BROKER = {2: tpb.PRIORITY_LOW, 5: tpb.PRIORITY_NORMAL, 7: tpb.PRIORITY_HIGH, 10: tpb.PRIORITY_URGENT}


def ts(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value)
    return t


def dur(seconds: float | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(round(seconds * 1e9)))
    return d


def _set(msg: Any, **fields: Any) -> Any:
    for k, v in fields.items():
        if v is not None:
            getattr(msg, k).CopyFrom(v)
    return msg


def media_to_proto(m: Media) -> media_pb2.Media:
    msg = media_pb2.Media(
        name=f"media/{m.id}",
        filename=m.filename,
        content_type=m.content_type,
        size_bytes=m.size_bytes,
        sha256=m.sha256,
        state=media_pb2.MediaState.Value(f"MEDIA_STATE_{m.state}"),
        format_name=m.format_name,
        audio_codec=m.audio_codec,
        error_message=m.error_message,
        request_id=m.request_id or "",
    )
    return _set(msg, duration=dur(m.duration_s), create_time=ts(m.create_time), update_time=ts(m.update_time))


TASKS = {"transcribe": tpb.TRANSCRIPTION_TASK_TRANSCRIBE, "translate": tpb.TRANSCRIPTION_TASK_TRANSLATE}
DIARIZATION_STATE = {"NOT_REQUESTED": tpb.DIARIZATION_STATE_NOT_REQUESTED,
                     "SUCCEEDED": tpb.DIARIZATION_STATE_SUCCEEDED, "FAILED": tpb.DIARIZATION_STATE_FAILED}


def config_to_proto(cfg: dict[str, Any], priority: int) -> tpb.TranscriptionConfig:
    dia = cfg.get("diarization") or {}
    msg = tpb.TranscriptionConfig(
        language_code=cfg.get("language_code", ""),
        beam_size=int(cfg.get("beam_size") or 0),
        enable_vad=bool(cfg.get("vad", True)),
        enable_word_time_offsets=bool(cfg.get("word_timestamps", True)),
        priority=PRIORITY_FROM_BROKER.get(priority, tpb.PRIORITY_NORMAL),
        task=TASKS.get(cfg.get("task", "transcribe"), tpb.TRANSCRIPTION_TASK_TRANSCRIBE),
        initial_prompt=cfg.get("initial_prompt") or "",
        hotwords=cfg.get("hotwords") or [],
    )
    if dia.get("enabled"):
        msg.diarization_config.CopyFrom(tpb.DiarizationConfig(
            enable_speaker_diarization=True, min_speaker_count=int(dia.get("min_speakers") or 0),
            max_speaker_count=int(dia.get("max_speakers") or 0)))
    return msg


def result_to_proto(r: dict[str, Any], processing_s: float | None) -> tpb.TranscriptionResult:
    segments = []
    for s in r.get("segments", []):
        words = [
            _set(tpb.Word(word=w["word"], probability=w.get("probability", 0.0), speaker_label=w.get("speaker", "")),
                 start_offset=dur(w["start"]), end_offset=dur(w["end"]))
            for w in s.get("words", [])
        ]
        seg = tpb.Segment(id=s["id"], text=s["text"], words=words, avg_logprob=s.get("avg_logprob", 0.0),
                          no_speech_probability=s.get("no_speech_prob", 0.0), speaker_label=s.get("speaker", ""))
        segments.append(_set(seg, start_offset=dur(s["start"]), end_offset=dur(s["end"])))
    speakers = [_set(tpb.Speaker(speaker_label=sp["label"], word_count=sp.get("words", 0)),
                     speaking_duration=dur(sp.get("speaking_s", 0.0))) for sp in r.get("speakers", [])]
    dia = r.get("diarization") or {"state": "NOT_REQUESTED"}
    msg = tpb.TranscriptionResult(
        text=r.get("text", ""),
        language_code=r.get("language", ""),
        language_probability=r.get("language_probability", 0.0),
        segments=segments,
        model=r.get("model", ""),
        speakers=speakers,
        speaker_count=int(r.get("speaker_count", 0)),
        task=TASKS.get(r.get("task", "transcribe"), tpb.TRANSCRIPTION_TASK_TRANSCRIBE),
        diarization=_set(tpb.DiarizationInfo(state=DIARIZATION_STATE.get(dia.get("state"), 0),
                                             error_message=dia.get("error_message") or "",
                                             pipeline=dia.get("pipeline") or ""),
                         processing_duration=dur(dia.get("processing_s"))),
    )
    return _set(msg, duration=dur(r.get("duration")), speech_duration=dur(r.get("speech_duration")),
                processing_duration=dur(processing_s))


STATE = {s: tpb.TranscriptionState.Value(f"TRANSCRIPTION_STATE_{s}")
         for s in ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")}
STAGE = {s: tpb.TranscriptionStage.Value(f"TRANSCRIPTION_STAGE_{s}")
         for s in ("PREPARING_MEDIA", "WAITING", "TRANSCRIBING", "DIARIZING", "FINALIZING", "DONE")}


def transcription_to_proto(j: Transcription, full: bool = True) -> tpb.Transcription:
    msg = tpb.Transcription(
        name=f"transcriptions/{j.id}",
        media=f"media/{j.media_id}",
        config=config_to_proto(j.config or {}, j.priority),
        state=STATE[j.state],
        stage=STAGE[j.stage],
        progress_percent=j.progress,
        attempt_count=j.attempts,
        error_message=j.error_message,
        error_reason=j.error_reason,
        request_id=j.request_id or "",
        cancel_requested=j.cancel_requested,
        sequence=j.sequence,
        warnings=j.warnings or [],
    )
    _set(msg, processed_duration=dur(j.processed_s), create_time=ts(j.create_time), update_time=ts(j.update_time),
         start_time=ts(j.start_time), end_time=ts(j.end_time))
    if full and j.result is not None and j.state == "SUCCEEDED":
        msg.result.CopyFrom(result_to_proto(j.result, j.processing_s))
    return msg


def event_to_proto(ev: dict[str, Any]) -> tpb.WatchTranscriptionResponse:
    msg = tpb.WatchTranscriptionResponse(
        sequence=ev["sequence"],
        state=STATE[ev["state"]],
        stage=STAGE[ev["stage"]],
        progress_percent=ev.get("progress", 0.0),
        heartbeat=ev.get("heartbeat", False),
        error_message=ev.get("error_message", ""),
        attempt_count=ev.get("attempts", 0),
    )
    when = dt.datetime.fromisoformat(ev["time"].rstrip("Z")) if ev.get("time") else None
    return _set(msg, processed_duration=dur(ev.get("processed_s")), media_duration=dur(ev.get("duration_s")),
                event_time=ts(when))
