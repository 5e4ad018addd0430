"""Requests -> typed options: every check that answers INVALID_ARGUMENT naming the field.

Pure functions (no database, no settings object): what they need is passed in, so the unit
tests check them directly.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

from core.enhancements import MAX_ITEMS
from core.export import FORMATS, SubtitleOptions
from core.languages import whisper_language
from core.models import ModelSet
from mp4totext.contracts import DiarizationOptions, JobConfig, KnownSpeakerRef, broker_priority
from mp4totext.enhancements import BCP47, KINDS, EnhancementRequest
from mp4totext.v1 import media_pb2
from mp4totext.v1 import transcription_pb2 as tpb
from server.errors import clip, failed_precondition, invalid

_ID = re.compile(r"^[0-9a-f]{32}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
MAX_PROMPT = 1000
MAX_HOTWORDS = 50
MAX_EXPECTED_LANGUAGES = 10
MAX_SPEAKERS = 20
MAX_NAME = 64
MIN_REFERENCE_S = 2.0  # a known speaker's reference stretch: at least this long
MAX_REFERENCE_S = 60.0  # ... and at most this long (the default end: start + this, or the media's end)
_GENERIC_LABEL = re.compile(r"^SPEAKER_\d+$")
MAX_REQUEST_ID = 128
# The API's ExportFormat -> the renderer's format name (EXPORT_FORMAT_SRT -> "srt", ...).
EXPORT_FORMATS = {tpb.ExportFormat.Value(f"EXPORT_FORMAT_{fmt.upper()}"): fmt for fmt in FORMATS}


def parse_name(name: str, collection: str, field: str = "name") -> str:
    """The id in ``<collection>/<id>``."""
    prefix = collection + "/"
    if not name:
        raise invalid(f"{field} is required, e.g. {prefix}<id>")
    if not name.startswith(prefix) or not _ID.match(name[len(prefix):]):
        raise invalid(f"{field}={name!r} is not a valid resource name; expected {prefix}<32 hex characters>")
    return name[len(prefix):]


def is_id(value: object) -> bool:
    """A resource id as we issue them (32 lowercase hex characters)."""
    return isinstance(value, str) and bool(_ID.match(value))


def is_name(name: str, collection: str) -> bool:
    prefix = collection + "/"
    return name.startswith(prefix) and bool(_ID.match(name[len(prefix):]))


_CONTENT_TYPE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*;[\x20-\x7e]*)?$")


def enum_filter(value: int, enum: Any, prefix: str, field: str) -> str | None:
    """A list filter's enum value as our state name (None = no filter); unknown numbers are refused."""
    if not value:
        return None
    if value not in enum.values():
        names = ", ".join(n for n in enum.keys() if not n.endswith("_UNSPECIFIED"))
        raise invalid(f"{field}={value} is not a known value; use one of {names}")
    return enum.Name(value).removeprefix(prefix)


def content_type(value: str) -> str:
    """A MIME type such as ``video/mp4`` (it becomes an object-storage header): checked before any byte."""
    if value and (len(value) > 255 or not _CONTENT_TYPE.match(value)):
        raise invalid(f"metadata.content_type {clip(value)} is not a MIME type such as 'video/mp4' "
                      "(at most 255 printable ASCII characters); leave it empty if unknown")
    return value


def request_id(value: str, field: str = "request_id") -> str:
    if len(value) > MAX_REQUEST_ID:
        raise invalid(f"{field} must be at most {MAX_REQUEST_ID} characters")
    return value


@dataclasses.dataclass(frozen=True)
class UploadSpec:
    filename: str
    content_type: str
    size_bytes: int  # 0 = not declared
    sha256: str  # "" = not declared
    request_id: str


def upload_metadata(first: media_pb2.UploadMediaRequest | None, max_upload_bytes: int) -> UploadSpec:
    """The first message of an upload stream, checked."""
    if first is None or first.WhichOneof("payload") != "metadata":
        raise invalid("the first UploadMediaRequest must carry metadata (filename, size_bytes, sha256)")
    md = first.metadata
    if not md.filename or len(md.filename) > 1024:
        raise invalid("metadata.filename is required (at most 1024 characters)")
    if md.size_bytes < 0:
        raise invalid("metadata.size_bytes must not be negative")
    if md.size_bytes > max_upload_bytes:
        raise invalid(f"metadata.size_bytes={md.size_bytes} is over the upload limit of {max_upload_bytes} bytes")
    sha = md.sha256.lower()
    if sha and not _SHA.match(sha):
        raise invalid("metadata.sha256 must be 64 hex characters")
    return UploadSpec(md.filename, content_type(md.content_type), md.size_bytes, sha,
                      request_id(md.request_id, "metadata.request_id"))


def _language(code: str, field: str = "config.language_code") -> str | None:
    try:
        return whisper_language(code)
    except ValueError:
        raise invalid(f"{field}={code!r} is not a language Whisper knows; use a BCP-47 code "
                      "such as 'en' or 'tr-TR'" + (", or 'auto'" if field == "config.language_code" else "")) from None


language_of = _language  # for other request types (live captions)


def _expected(codes: list[str], language: str | None) -> list[str]:
    if len(codes) > MAX_EXPECTED_LANGUAGES:
        raise invalid(f"config.expected_language_codes has {len(codes)} entries; at most {MAX_EXPECTED_LANGUAGES}")
    out: list[str] = []
    for i, code in enumerate(codes):
        lang = _language(code, f"config.expected_language_codes[{i}]")
        if lang is None:
            raise invalid(f"config.expected_language_codes[{i}] is empty or 'auto'; list languages such as 'tr'")
        out.append(lang)
    out = list(dict.fromkeys(out))
    if language and out and language not in out:
        raise invalid(f"config.language_code={language!r} is not among config.expected_language_codes {out}; "
                      "set one of them, or leave language_code empty to detect")
    return out


def _hotwords(words: list[str]) -> list[str]:
    if len(words) > MAX_HOTWORDS:
        raise invalid(f"config.hotwords has {len(words)} entries; at most {MAX_HOTWORDS}")
    out = []
    for i, word in enumerate(words):
        word = " ".join(word.split())
        if not 1 <= len(word) <= 100:
            raise invalid(f"config.hotwords[{i}] must be 1..100 characters (got {len(word)})")
        out.append(word)
    return out


def _diarization(dia: tpb.DiarizationConfig, status: Callable[[], tuple[bool, str]]) -> DiarizationOptions:
    lo, hi = dia.min_speaker_count, dia.max_speaker_count
    for field, n in (("min_speaker_count", lo), ("max_speaker_count", hi)):
        if not 0 <= n <= MAX_SPEAKERS:
            raise invalid(f"config.diarization_config.{field}={n} is out of range; use 1..{MAX_SPEAKERS} "
                          "(0 = unknown)")
    if lo and hi and lo > hi:
        raise invalid(f"config.diarization_config.min_speaker_count={lo} is above max_speaker_count={hi}")
    if (lo or hi) and not dia.enable_speaker_diarization:
        raise invalid("config.diarization_config: speaker counts are set but enable_speaker_diarization is false")
    if dia.known_speakers and not dia.enable_speaker_diarization:
        raise invalid("config.diarization_config: known_speakers are set but enable_speaker_diarization is false")
    known = known_speakers(list(dia.known_speakers))
    if dia.enable_speaker_diarization:
        available, reason = status()
        if not available:
            raise failed_precondition(reason)
    return DiarizationOptions(enabled=bool(dia.enable_speaker_diarization), min_speakers=lo or None,
                              max_speakers=hi or None, known_speakers=known)


def _seconds(d: Any) -> float:
    return d.seconds + d.nanos / 1e9  # not ToTimedelta: that overflows on 2^62 s


def known_speakers(items: list[Any]) -> list[KnownSpeakerRef]:
    """Named reference voices: names unique and not generic labels, a media name each, a sane
    stretch. Whether each media exists, is the caller's and is long enough is checked by the
    service (:func:`check_reference`), which has the database."""
    if len(items) > MAX_SPEAKERS:
        raise invalid(f"config.diarization_config.known_speakers has {len(items)} entries; at most {MAX_SPEAKERS}")
    refs: list[KnownSpeakerRef] = []
    for i, item in enumerate(items):
        field = f"config.diarization_config.known_speakers[{i}]"
        name = item.display_name.strip()
        if not 1 <= len(name) <= MAX_NAME:
            raise invalid(f"{field}.display_name must have 1..{MAX_NAME} characters (it has {len(name)})")
        if _GENERIC_LABEL.match(name):
            raise invalid(f"{field}.display_name={name!r} looks like a generic label; use the person's name")
        if any(r.name.casefold() == name.casefold() for r in refs):
            raise invalid(f"{field}.display_name={clip(name)!r} is used twice; names must be unique")
        start = _seconds(item.start_offset) if item.HasField("start_offset") else 0.0
        end = _seconds(item.end_offset) if item.HasField("end_offset") else None
        if start < 0 or (end is not None and end < 0):
            raise invalid(f"{field}: start_offset and end_offset must not be negative")
        if end is not None and not MIN_REFERENCE_S <= end - start <= MAX_REFERENCE_S:
            raise invalid(f"{field}: the stretch {start:g}-{end:g} s is {end - start:g} s long; use "
                          f"{MIN_REFERENCE_S:g}..{MAX_REFERENCE_S:g} s of the reference media")
        refs.append(KnownSpeakerRef(name=name, media_id=parse_name(item.media, "media", f"{field}.media"),
                                    start_s=start, end_s=end))
    return refs


def check_reference(ref: KnownSpeakerRef, index: int, state: str, duration_s: float | None) -> KnownSpeakerRef:
    """A known speaker's media, found and visible to the caller, is usable: READY and long enough
    for its stretch. Returns the reference with its end resolved."""
    field = f"config.diarization_config.known_speakers[{index}].media"
    if state != "READY":
        raise failed_precondition(f"{field}: media/{ref.media_id} is {state}; a reference voice must be READY "
                                  "(wait for its preparation with GetMedia, then create the transcription)")
    duration = duration_s or 0.0
    end = min(duration, ref.start_s + MAX_REFERENCE_S) if ref.end_s is None else ref.end_s
    if end > duration + 0.05 or end - ref.start_s < MIN_REFERENCE_S:
        raise invalid(f"{field}: media/{ref.media_id} lasts {duration:.1f} s, so the stretch "
                      f"{ref.start_s:g}-{end:g} s does not hold the {MIN_REFERENCE_S:g} s of voice needed")
    return ref.model_copy(update={"end_s": round(min(end, duration), 3)})


KIND_NAMES = {tpb.EnhancementKind.Value(f"ENHANCEMENT_KIND_{k}"): k for k in KINDS}


def enhancement_requests(items: Any, field: str, ai_status: Callable[[], tuple[bool, str, str]] | None,
                         required: bool = False) -> list[EnhancementRequest]:
    """AI item requests: known kinds, BCP-47 target languages (required for translation, refused
    for clean-up), no duplicates; FAILED_PRECONDITION when no worker has a language model."""
    items = list(items)
    if not items:
        if required:
            raise invalid(f"{field} is required: at least one of {', '.join(KINDS)}")
        return []
    if len(items) > MAX_ITEMS:
        raise invalid(f"{field} has {len(items)} items; at most {MAX_ITEMS}")
    out: dict[tuple[str, str], EnhancementRequest] = {}
    for i, item in enumerate(items):
        kind = KIND_NAMES.get(item.kind)
        if kind is None:
            raise invalid(f"{field}[{i}].kind={item.kind} is not a known EnhancementKind; use {', '.join(KINDS)}")
        lang = item.target_language_code.strip()
        if lang and not BCP47.match(lang):
            raise invalid(f"{field}[{i}].target_language_code={clip(lang)!r} is not a BCP-47 language tag "
                          "(e.g. en, tr, pt-BR)")
        rule = KINDS[kind].target_language
        if rule == "required" and not lang:
            raise invalid(f"{field}[{i}].target_language_code is required for {kind} (e.g. en)")
        if rule == "forbidden" and lang:
            raise invalid(f"{field}[{i}].target_language_code must be empty for {kind} (it keeps the transcript's "
                          "language); ask for a TRANSLATION instead")
        req = EnhancementRequest(kind=kind, language=lang.lower())
        out.setdefault(req.key, req)
    if ai_status is not None:
        check_ai(ai_status)
    return list(out.values())


def check_ai(ai_status: Callable[[], tuple[bool, str, str]]) -> None:
    available, _model, reason = ai_status()
    if not available:
        raise failed_precondition(reason)


def job_config(cfg: tpb.TranscriptionConfig, models: ModelSet,
               diarization_status: Callable[[], tuple[bool, str]],
               ai_status: Callable[[], tuple[bool, str, str]] | None = None) -> tuple[JobConfig, int]:
    """Check every option and return the stored config and the broker priority.

    ``models`` is the server's model set; ``diarization_status`` says whether speaker
    recognition can run now (and why not).
    """
    language = _language(cfg.language_code)
    expected = _expected(list(cfg.expected_language_codes), language)
    if not 0 <= cfg.beam_size <= 10:
        raise invalid(f"config.beam_size={cfg.beam_size} is out of range; use 1..10 (0 = default)")
    try:
        priority = broker_priority(cfg.priority)
    except ValueError:
        raise invalid(f"config.priority={cfg.priority} is not a known Priority") from None
    if cfg.task not in (tpb.TRANSCRIPTION_TASK_UNSPECIFIED, tpb.TRANSCRIPTION_TASK_TRANSCRIBE,
                        tpb.TRANSCRIPTION_TASK_TRANSLATE):
        raise invalid(f"config.task={cfg.task} is not a known TranscriptionTask")
    task = "translate" if cfg.task == tpb.TRANSCRIPTION_TASK_TRANSLATE else "transcribe"
    problem = models.check(cfg.model or None, language, expected, task)
    if problem:
        raise invalid(problem)
    if len(cfg.initial_prompt) > MAX_PROMPT:
        raise invalid(f"config.initial_prompt has {len(cfg.initial_prompt)} characters; at most {MAX_PROMPT}")
    hotwords = _hotwords(list(cfg.hotwords))
    diarization = _diarization(cfg.diarization_config, diarization_status)
    ai = enhancement_requests(cfg.enhancements, "config.enhancements",
                              ai_status or (lambda: (False, "", "AI items are not available here")))
    config = JobConfig(
        language_code=cfg.language_code, language=language, beam_size=cfg.beam_size or None,
        vad=cfg.enable_vad if cfg.HasField("enable_vad") else True,
        word_timestamps=cfg.enable_word_time_offsets if cfg.HasField("enable_word_time_offsets") else True,
        task=task, initial_prompt=cfg.initial_prompt or None, hotwords=hotwords, model=cfg.model or None,
        expected_languages=expected, diarization=diarization, ai=[r.to_json() for r in ai])
    return config, priority


def export_options(request: tpb.ExportTranscriptionRequest) -> tuple[str, SubtitleOptions]:
    """(format, subtitle options) of an export request."""
    fmt = EXPORT_FORMATS.get(request.format)
    if request.format == tpb.EXPORT_FORMAT_MARKDOWN:
        fmt = "md"
    if fmt is None:
        raise invalid("format is required: one of TXT, SRT, VTT, JSON, TSV (MARKDOWN for summaries and notes)")
    line = request.max_line_length or 42
    lines = request.max_lines_per_caption or 2
    max_dur = (_seconds(request.max_caption_duration) if request.HasField("max_caption_duration") else 0.0) or 6.0
    if not 10 <= line <= 200:
        raise invalid(f"max_line_length={line} is out of range; use 10..200 (0 = 42)")
    if not 1 <= lines <= 3:
        raise invalid(f"max_lines_per_caption={lines} is out of range; use 1..3 (0 = 2)")
    if not 1.0 <= max_dur <= 30.0:
        raise invalid(f"max_caption_duration={max_dur:g}s is out of range; use 1..30 s (0 = 6 s)")
    return fmt, SubtitleOptions(max_line_length=line, max_lines=lines, max_duration_s=max_dur)

