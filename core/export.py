"""Export a transcription result as TXT, SRT, WebVTT, JSON or TSV (pure functions).

Subtitles are built from word timestamps when present (captions break at speaker
changes, at the maximum caption duration and when the text no longer fits the lines),
else from segments (long segments are split in time proportionally to their text).
"""
from __future__ import annotations

import dataclasses
import json
import math
import textwrap
from typing import Any, Iterator, Mapping

from mp4totext.contracts import Segment, TranscriptResult, Word

FORMATS = {
    "txt": ("text/plain; charset=utf-8", "txt"),
    "srt": ("application/x-subrip; charset=utf-8", "srt"),
    "vtt": ("text/vtt; charset=utf-8", "vtt"),
    "json": ("application/json", "json"),
    "tsv": ("text/tab-separated-values; charset=utf-8", "tsv"),
}


@dataclasses.dataclass(frozen=True)
class SubtitleOptions:
    max_line_length: int = 42
    max_lines: int = 2
    max_duration_s: float = 6.0


@dataclasses.dataclass
class Cue:
    start: float
    end: float
    text: str
    speaker: str = ""
    label: bool = False  # show "[SPEAKER]" (first caption of a speaker's turn, if it fits)


Result = TranscriptResult | Mapping[str, Any]  # a stored (JSON) result is read as a TranscriptResult


def _has_speakers(result: TranscriptResult) -> bool:
    return bool(result.speakers)


def _clean(text: str) -> str:
    return " ".join(text.split())


def _fits(text: str, opts: SubtitleOptions, prefix: str) -> bool:
    return len(_wrap(prefix + text, opts.max_line_length)) <= opts.max_lines


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width=width, break_long_words=True, break_on_hyphens=False) or [""]


def cues(result: Result, opts: SubtitleOptions = SubtitleOptions()) -> list[Cue]:
    result = TranscriptResult.from_json(result)
    with_speakers = _has_speakers(result)
    out: list[Cue] = []
    for seg in result.segments:
        words = [w for w in seg.words if w.word.strip()]
        prev = out[-1].speaker if out else None
        if words:
            out.extend(_cues_from_words(words, opts, with_speakers, prev))
        elif _clean(seg.text):
            out.extend(_cues_from_segment(seg, opts, with_speakers, prev))
    # Strictly increasing, non-overlapping, positive durations (players and parsers demand it).
    fixed: list[Cue] = []
    for c in out:
        start = max(c.start, fixed[-1].end if fixed else 0.0)
        end = max(c.end, start + 0.05)
        fixed.append(Cue(round(start, 3), round(end, 3), c.text, c.speaker, c.label))
    return fixed


def _prefix(speaker: str, label: bool) -> str:
    return f"[{speaker}] " if label and speaker else ""


def _cues_from_words(words: list[Word], opts: SubtitleOptions, with_speakers: bool,
                     prev_speaker: str | None) -> list[Cue]:
    out: list[Cue] = []
    cur: list[Word] = []
    label = [False]

    def start_cue(w: Word) -> None:
        spk = w.speaker or ""
        before = out[-1].speaker if out else prev_speaker
        # Label the first caption of a speaker's turn, unless the label itself would not fit.
        label[0] = with_speakers and bool(spk) and spk != before and _fits(_clean(w.word), opts, _prefix(spk, True))
        cur.append(w)

    def flush() -> None:
        if cur:
            out.append(Cue(cur[0].start, cur[-1].end, _clean("".join(w.word for w in cur)), cur[0].speaker or "",
                           label[0]))
            cur.clear()

    for w in words:
        if cur:
            spk = cur[0].speaker or ""
            text = _clean("".join(x.word for x in cur) + w.word)
            if ((w.speaker or "") != spk or w.end - cur[0].start > opts.max_duration_s
                    or not _fits(text, opts, _prefix(spk, label[0]))):
                flush()
        if cur:
            cur.append(w)
        else:
            start_cue(w)
    flush()
    return out


def _cues_from_segment(seg: Segment, opts: SubtitleOptions, with_speakers: bool,
                       prev_speaker: str | None) -> list[Cue]:
    speaker = seg.speaker or ""
    words = _clean(seg.text).split(" ")
    label = (with_speakers and bool(speaker) and speaker != prev_speaker
             and _fits(words[0], opts, _prefix(speaker, True)))
    pieces: list[str] = []
    for word in words:
        prefix = _prefix(speaker, label and not pieces[1:])  # only the first piece carries the label
        if pieces and _fits(pieces[-1] + " " + word, opts, prefix):
            pieces[-1] += " " + word
        else:
            pieces.append(word)
    total = sum(len(p) for p in pieces) or 1
    start, span = seg.start, max(seg.end - seg.start, 0.05)
    out = []
    for i, p in enumerate(pieces):
        end = start + span * len(p) / total
        out.append(Cue(start, end, p, speaker, label and i == 0))
        start = end
    # a piece longer than max_duration is split evenly in time (its text already fits)
    final: list[Cue] = []
    for c in out:
        n = max(1, math.ceil((c.end - c.start) / opts.max_duration_s - 1e-9))
        if n == 1:
            final.append(c)
            continue
        ws = c.text.split(" ")
        per = max(1, -(-len(ws) // n))
        parts = [" ".join(ws[i:i + per]) for i in range(0, len(ws), per)]
        step = (c.end - c.start) / len(parts)
        final.extend(Cue(c.start + i * step, c.start + (i + 1) * step, t, speaker, c.label and i == 0)
                     for i, t in enumerate(parts))
    return final


def _lines(c: Cue, opts: SubtitleOptions) -> str:
    return "\n".join(_wrap(_prefix(c.speaker, c.label) + c.text, opts.max_line_length))


def _ts(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(result: TranscriptResult, opts: SubtitleOptions = SubtitleOptions()) -> Iterator[str]:
    for i, c in enumerate(cues(result, opts), start=1):
        yield f"{i}\n{_ts(c.start, ',')} --> {_ts(c.end, ',')}\n{_lines(c, opts)}\n\n"


def to_vtt(result: TranscriptResult, opts: SubtitleOptions = SubtitleOptions()) -> Iterator[str]:
    yield "WEBVTT\n\n"
    for i, c in enumerate(cues(result, opts), start=1):
        # Speaker as a WebVTT voice span; the prefix is kept out of the wrapped text.
        body = "\n".join(_wrap(c.text, opts.max_line_length))
        if c.speaker and _has_speakers(result):
            body = f"<v {c.speaker}>{body}"
        yield f"{i}\n{_ts(c.start, '.')} --> {_ts(c.end, '.')}\n{body}\n\n"


def to_txt(result: TranscriptResult) -> Iterator[str]:
    if not _has_speakers(result):
        for seg in result.segments:
            if _clean(seg.text):
                yield _clean(seg.text) + "\n"
        return
    speaker, parts = None, []
    for seg in result.segments:
        text = _clean(seg.text)
        if not text:
            continue
        if seg.speaker != speaker and parts:
            yield f"{speaker or 'UNKNOWN'}: {' '.join(parts)}\n\n"
            parts = []
        speaker = seg.speaker
        parts.append(text)
    if parts:
        yield f"{speaker or 'UNKNOWN'}: {' '.join(parts)}\n"


def to_tsv(result: TranscriptResult) -> Iterator[str]:
    yield "start_ms\tend_ms\tspeaker\ttext\n"
    for seg in result.segments:
        text = _clean(seg.text).replace("\t", " ")
        if text:
            start_ms, end_ms = int(round(seg.start * 1000)), int(round(seg.end * 1000))
            yield f"{start_ms}\t{end_ms}\t{seg.speaker or ''}\t{text}\n"


def to_json(document: dict[str, Any]) -> Iterator[str]:
    yield json.dumps(document, ensure_ascii=False, indent=2) + "\n"


def export(fmt: str, result: Result, opts: SubtitleOptions = SubtitleOptions(),
           document: dict[str, Any] | None = None) -> Iterator[str]:
    """Text pieces of the document in ``fmt`` (txt, srt, vtt, json, tsv).

    ``document`` is what JSON exports (the API's view of the transcription); without it,
    the result itself.
    """
    if fmt == "json":
        if document is None:
            document = result.to_json() if isinstance(result, TranscriptResult) else dict(result)
        return to_json(document)
    result = TranscriptResult.from_json(result)
    if fmt == "srt":
        return to_srt(result, opts)
    if fmt == "vtt":
        return to_vtt(result, opts)
    if fmt == "txt":
        return to_txt(result)
    if fmt == "tsv":
        return to_tsv(result)
    raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")


def chunks(pieces: Iterator[str], size: int = 64 * 1024) -> Iterator[bytes]:
    """Re-chunk text pieces into byte blocks of about ``size`` (for streaming)."""
    buf = bytearray()
    for piece in pieces:
        buf += piece.encode("utf-8")
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)
