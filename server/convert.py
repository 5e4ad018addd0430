"""Database rows and bus events -> protobuf messages (pure functions, but for the AI items of a
transcription that has some: read with it)."""
from __future__ import annotations

import datetime as dt
from typing import Any, Callable

from google.protobuf import duration_pb2, timestamp_pb2

from core import enhancements
from mp4totext.contracts import ItemStatus, JobConfig, JobState, ProgressEvent, Stage, TranscriptResult, api_priority
from mp4totext.enhancements import KINDS, EnhancementKind, EnhancementState, LectureNotes, Summary, TokenUsage
from mp4totext.v1 import media_pb2
from mp4totext.v1 import transcription_pb2 as tpb
from storage.db import Enhancement, Media, Transcription


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


def config_to_proto(cfg: JobConfig, priority: int) -> tpb.TranscriptionConfig:
    msg = tpb.TranscriptionConfig(
        language_code=cfg.language_code,
        beam_size=int(cfg.beam_size or 0),
        enable_vad=cfg.vad,
        enable_word_time_offsets=cfg.word_timestamps,
        priority=int(api_priority(priority)),
        task=TASKS.get(cfg.task, tpb.TRANSCRIPTION_TASK_TRANSCRIBE),
        initial_prompt=cfg.initial_prompt or "",
        hotwords=cfg.hotwords,
        model=cfg.model or "",
        expected_language_codes=cfg.expected_languages,
    )
    msg.enhancements.extend(tpb.EnhancementRequest(kind=KIND[a["kind"]], target_language_code=a.get("language", ""))
                            for a in cfg.ai)
    dia = cfg.diarization
    if dia.enabled:
        msg.diarization_config.CopyFrom(tpb.DiarizationConfig(
            enable_speaker_diarization=True, min_speaker_count=dia.min_speakers or 0,
            max_speaker_count=dia.max_speakers or 0,
            known_speakers=[_set(tpb.KnownSpeaker(display_name=k.name, media=f"media/{k.media_id}"),
                                 start_offset=dur(k.start_s), end_offset=dur(k.end_s)) for k in dia.known_speakers]))
    return msg


KIND = {k.value: tpb.EnhancementKind.Value(f"ENHANCEMENT_KIND_{k}") for k in EnhancementKind}
ITEM_STATE = {k.value: tpb.EnhancementState.Value(f"ENHANCEMENT_STATE_{k}") for k in EnhancementState}


def segments_to_proto(r: TranscriptResult) -> list[tpb.Segment]:
    segments = []
    for s in r.segments:
        words = [_set(tpb.Word(word=w.word, probability=w.probability, speaker_label=w.speaker or ""),
                      start_offset=dur(w.start), end_offset=dur(w.end)) for w in s.words]
        seg = tpb.Segment(id=s.id, text=s.text, words=words, avg_logprob=s.avg_logprob,
                          no_speech_probability=s.no_speech_prob, speaker_label=s.speaker or "",
                          language_code=s.language)
        segments.append(_set(seg, start_offset=dur(s.start), end_offset=dur(s.end)))
    return segments


def result_to_proto(r: TranscriptResult, processing_s: float | None) -> tpb.TranscriptionResult:
    segments = segments_to_proto(r)
    speakers = [_set(tpb.Speaker(speaker_label=sp.label, word_count=sp.words, identified=sp.identified,
                                 identification_similarity=sp.similarity or 0.0), speaking_duration=dur(sp.speaking_s))
                for sp in r.speakers]
    dia = r.diarization
    msg = tpb.TranscriptionResult(
        text=r.text,
        language_code=r.language,
        language_probability=r.language_probability,
        segments=segments,
        model=r.model,
        speakers=speakers,
        speaker_count=r.speaker_count,
        task=TASKS.get(r.task, tpb.TRANSCRIPTION_TASK_TRANSCRIBE),
        language_uncertain=r.language_uncertain,
        languages=[_set(tpb.LanguageShare(language_code=x.language, probability=x.probability),
                        duration=dur(x.duration)) for x in r.languages],
        diarization=_set(tpb.DiarizationInfo(state=DIARIZATION_STATE.get(dia.state, 0),
                                             error_message=dia.error_message, pipeline=dia.pipeline),
                         processing_duration=dur(dia.processing_s)),
    )
    return _set(msg, duration=dur(r.duration), speech_duration=dur(r.speech_duration),
                processing_duration=dur(processing_s))


STATE = {s.value: tpb.TranscriptionState.Value(f"TRANSCRIPTION_STATE_{s}") for s in JobState}
STAGE = {s.value: tpb.TranscriptionStage.Value(f"TRANSCRIPTION_STAGE_{s}") for s in Stage}


def _status(x: Transcription | ProgressEvent) -> dict[str, Any]:
    """The fields a Transcription and a Watch event share (a row and an event name them alike)."""
    return {"sequence": x.sequence, "state": STATE[x.state], "stage": STAGE[x.stage], "progress_percent": x.progress,
            "attempt_count": x.attempts, "error_message": x.error_message}


def usage_to_proto(u: TokenUsage) -> tpb.TokenUsage:
    return tpb.TokenUsage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, cost=u.cost)


def _summary(sm: Summary) -> tpb.Summary:
    return tpb.Summary(abstract=sm.abstract, key_points=sm.key_points, decisions=sm.decisions,
                       action_items=[tpb.ActionItem(description=a.description, owner=a.owner) for a in sm.action_items])


def _notes(n: LectureNotes) -> tpb.LectureNotes:
    return tpb.LectureNotes(
        title=n.title, examples=n.examples,
        outline=[_set(tpb.OutlineItem(title=o.title, points=o.points), start_offset=dur(o.start_s)) for o in n.outline],
        key_terms=[tpb.KeyTerm(term=t.term, definition=t.definition) for t in n.key_terms],
        review_questions=[tpb.ReviewQuestion(question=q.question, answer=q.answer) for q in n.review_questions])


# document kind -> (the Enhancement field that carries it, converter of its validated model)
DOCUMENT_FIELDS: dict[EnhancementKind, tuple[str, Callable[[Any], Any]]] = {
    EnhancementKind.SUMMARY: ("summary", _summary),
    EnhancementKind.LECTURE_NOTES: ("lecture_notes", _notes),
}


def _item_result(msg: tpb.Enhancement, kind: str, result: dict) -> None:
    spec = KINDS[EnhancementKind(kind)]
    if spec.segments:
        msg.segments.extend(segments_to_proto(TranscriptResult.from_json(result)))
        return
    assert spec.model is not None
    field, to_proto = DOCUMENT_FIELDS[spec.kind]
    getattr(msg, field).CopyFrom(to_proto(spec.model.model_validate(result)))


def enhancement_to_proto(e: Enhancement, full: bool = True) -> tpb.Enhancement:
    msg = tpb.Enhancement(
        id=e.id, kind=KIND[e.kind], target_language_code=e.language, state=ITEM_STATE[e.state],
        error_reason=e.error_reason, error_message=e.error_message, model=e.model,
        usage=usage_to_proto(TokenUsage(prompt_tokens=e.prompt_tokens, completion_tokens=e.completion_tokens,
                                        cost=e.cost)),
        chunks_done=e.chunks_done, chunks_total=e.chunks_total, attempt_count=e.attempts,
        language_code=e.output_language, request_id=e.request_id or "", request_count=e.requests)
    _set(msg, create_time=ts(e.create_time), start_time=ts(e.start_time), end_time=ts(e.end_time))
    if full and e.state == EnhancementState.SUCCEEDED and e.result is not None:
        _item_result(msg, e.kind, e.result)
    return msg


def _enhancements(j: Transcription, msg: tpb.Transcription, full: bool) -> None:
    if not j.ai_items:
        return
    total = TokenUsage()
    for e in enhancements.items(j.id, with_results=full):
        msg.enhancements.append(enhancement_to_proto(e, full))
        total = total + TokenUsage(prompt_tokens=e.prompt_tokens, completion_tokens=e.completion_tokens, cost=e.cost)
    msg.ai_usage.CopyFrom(usage_to_proto(total))


def transcription_to_proto(j: Transcription, full: bool = True) -> tpb.Transcription:
    msg = tpb.Transcription(
        name=f"transcriptions/{j.id}", media=f"media/{j.media_id}",
        config=config_to_proto(JobConfig.from_json(j.config), j.priority), error_reason=j.error_reason,
        request_id=j.request_id or "", cancel_requested=j.cancel_requested, warnings=j.warnings or [], **_status(j))
    _set(msg, processed_duration=dur(j.processed_s), create_time=ts(j.create_time), update_time=ts(j.update_time),
         start_time=ts(j.start_time), end_time=ts(j.end_time))
    if full and j.result is not None and j.state == JobState.SUCCEEDED:
        msg.result.CopyFrom(result_to_proto(TranscriptResult.from_json(j.result), j.processing_s))
    _enhancements(j, msg, full)
    return msg


def event_to_proto(ev: ProgressEvent) -> tpb.WatchTranscriptionResponse:
    msg = tpb.WatchTranscriptionResponse(heartbeat=ev.heartbeat, enhancements=[_item_status(i) for i in ev.items],
                                         **_status(ev))
    return _set(msg, processed_duration=dur(ev.processed_s), media_duration=dur(ev.duration_s),
                event_time=ts(ev.time))


def _item_status(i: ItemStatus) -> tpb.EnhancementStatus:
    return tpb.EnhancementStatus(id=i.id, kind=KIND.get(i.kind, 0), target_language_code=i.language,
                                 state=ITEM_STATE.get(i.state, 0), chunks_done=i.chunks_done,
                                 chunks_total=i.chunks_total, error_message=i.error_message)
