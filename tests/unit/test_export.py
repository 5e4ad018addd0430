"""Exports: the SRT and WebVTT we write are parsed back with real parsers (srt, webvtt-py)."""
from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest
import srt
import webvtt

from core.export import SubtitleOptions, chunks, cues, export


def words_of(text: str, start: float, step: float, speaker: str | None = None) -> list[dict[str, Any]]:
    out = []
    for i, word in enumerate(text.split()):
        d = {"word": " " + word, "start": round(start + i * step, 3), "end": round(start + i * step + step * 0.8, 3),
             "probability": 0.9}
        if speaker:
            d["speaker"] = speaker
        out.append(d)
    return out


LONG = ("Today we talk about the design of reliable transcription systems and why every stage must be "
        "idempotent so that a crashed worker never produces a second result for the same job")


def result(speakers: bool = True, with_words: bool = True) -> dict[str, Any]:
    a = words_of(LONG, 0.0, 0.35, "SPEAKER_00" if speakers else None)
    b = words_of("Thanks. Can you explain priorities too?", a[-1]["end"] + 0.5, 0.3, "SPEAKER_01" if speakers else None)
    segs = []
    for i, ws in enumerate((a, b)):
        s = {"id": i, "start": ws[0]["start"], "end": ws[-1]["end"], "text": "".join(w["word"] for w in ws).strip(),
             "words": ws if with_words else []}
        if speakers:
            s["speaker"] = ws[0]["speaker"]
        segs.append(s)
    r: dict[str, Any] = {"text": " ".join(s["text"] for s in segs), "segments": segs, "duration": segs[-1]["end"] + 1}
    if speakers:
        r["speakers"] = [{"label": "SPEAKER_00", "speaking_s": 10.0, "words": len(a)},
                         {"label": "SPEAKER_01", "speaking_s": 2.0, "words": len(b)}]
        r["speaker_count"] = 2
    return r


def text(fmt: str, r: dict[str, Any], opts: SubtitleOptions = SubtitleOptions()) -> str:
    return "".join(export(fmt, r, opts))


def _visible(line: str) -> str:
    return re.sub(r"<[^>]+>", "", line)


@pytest.mark.parametrize("speakers", [True, False])
@pytest.mark.parametrize("with_words", [True, False])
@pytest.mark.parametrize("opts", [SubtitleOptions(),
                                  SubtitleOptions(max_line_length=20, max_lines=1, max_duration_s=2.0)])
def test_srt_parses_with_ordered_timing_and_line_limits(speakers: bool, with_words: bool,
                                                        opts: SubtitleOptions) -> None:
    r = result(speakers, with_words)
    subs = list(srt.parse(text("srt", r, opts)))
    assert len(subs) >= 3
    assert [s.index for s in subs] == list(range(1, len(subs) + 1))
    prev_end = 0.0
    for s in subs:
        start, end = s.start.total_seconds(), s.end.total_seconds()
        assert prev_end <= start < end, (prev_end, start, end)
        assert end - start <= opts.max_duration_s + 1e-6 or not with_words
        lines = s.content.split("\n")
        assert len(lines) <= opts.max_lines
        assert all(len(line) <= opts.max_line_length for line in lines), lines
        prev_end = end
    joined = " ".join(s.content.replace("\n", " ") for s in subs)
    for word in ("idempotent", "crashed", "priorities"):
        assert word in joined
    assert ("[SPEAKER_01]" in joined) == speakers
    assert subs[-1].end.total_seconds() <= r["duration"]


@pytest.mark.parametrize("speakers", [True, False])
def test_vtt_parses_with_voices_and_limits(speakers: bool, tmp_path: Any) -> None:
    r = result(speakers)
    opts = SubtitleOptions(max_line_length=32, max_lines=2, max_duration_s=4.0)
    doc = text("vtt", r, opts)
    assert doc.startswith("WEBVTT\n\n")
    captions = webvtt.from_buffer(io.StringIO(doc)).captions
    assert len(captions) >= 3
    prev_end = 0.0
    for c in captions:
        assert prev_end <= c.start_in_seconds < c.end_in_seconds
        assert c.end_in_seconds - c.start_in_seconds <= opts.max_duration_s + 1e-3
        lines = c.raw_text.split("\n") if hasattr(c, "raw_text") else c.text.split("\n")
        assert len(lines) <= opts.max_lines
        assert all(len(_visible(line)) <= opts.max_line_length for line in lines), lines
        prev_end = c.end_in_seconds
    voices = {getattr(c, "voice", None) for c in captions}
    if speakers:
        assert voices == {"SPEAKER_00", "SPEAKER_01"}
        assert "<v SPEAKER_01>" in doc
    else:
        assert "<v " not in doc


def test_captions_break_at_speaker_changes() -> None:
    for c in cues(result(True)):
        assert c.speaker in ("SPEAKER_00", "SPEAKER_01")
    first_b = next(i for i, c in enumerate(cues(result(True))) if c.speaker == "SPEAKER_01")
    assert cues(result(True))[first_b].text.startswith("Thanks.")


def test_txt_and_tsv() -> None:
    txt = text("txt", result(True))
    assert txt.startswith("SPEAKER_00: Today we talk") and "\n\nSPEAKER_01: Thanks." in txt
    assert text("txt", result(False)).splitlines()[1] == "Thanks. Can you explain priorities too?"
    rows = [line.split("\t") for line in text("tsv", result(True)).splitlines()]
    assert rows[0] == ["start_ms", "end_ms", "speaker", "text"]
    assert rows[1][0] == "0" and int(rows[1][1]) > 0 and rows[2][2] == "SPEAKER_01"
    assert int(rows[2][0]) >= int(rows[1][1])


def test_json_is_the_full_document() -> None:
    doc = {"name": "transcriptions/x", "result": result(True)}
    assert json.loads("".join(export("json", {}, document=doc))) == doc
    assert json.loads(text("json", result(True))) == result(True)  # no document: the result itself


def test_chunks_reassemble_exactly() -> None:
    pieces = ["héllo ", "wörld " * 50000, "end"]
    blocks = list(chunks(iter(pieces), size=1000))
    assert all(len(b) <= 1000 for b in blocks)
    assert b"".join(blocks).decode("utf-8") == "".join(pieces)
