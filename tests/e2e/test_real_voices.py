"""Speaker recognition on real recorded voices (tests/support/realvoices.py: people from Debian's
pocketsphinx-testdata and codec2-examples, in generated conversations with exact truth), at the
product's settings, in process: the built-in offline pipeline's turns scored with pyannote.metrics
(DER with no collar, speaker count) and the words of tiny.en on the mix attributed by the product's
own merge, scored against each utterance's own words. bench/speakers.py prints the same figures
for the whole set and the settings around these.

Known speakers through the real stack are in tests/e2e/test_diarization.py (it owns the diarize worker).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest

from tests.support import need, realvoices

# Issue 23's targets are DER <= 0.10 (no collar) and >= 97 % of words on the right speaker; the
# built-in pipeline does not reach them yet on real voices (bench/speakers.py, 2026-12-07, at the
# tuned settings: 2 speakers #1 DER 0.124, words 0.891; 3 speakers #1 DER 0.213, words 0.778; the
# settings before tuning gave 0.192 / 0.238 mean DER and a wrong count on 3 of 3 three-speaker
# files). The bounds below hold today's level with a margin, so a regression fails CI; tighten
# them as the pipeline improves.
BOUNDS = {2: {"der": 0.16, "words_right": 0.85}, 3: {"der": 0.26, "words_right": 0.72}}


@pytest.fixture(scope="module")
def pipeline() -> Any:
    need(importlib.util.find_spec("pyannote.audio") is not None, "pyannote.audio (pip install -e '.[diarize]')")
    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
    from workers.stages import campplus, diarize

    try:
        campplus.model_files()
    except campplus.OfflineModelsMissing as exc:
        need(False, str(exc))
    try:
        realvoices.require()
    except realvoices.VoicesMissing as exc:
        need(False, str(exc))
    return diarize.load_pipeline(diarize.OFFLINE, "cpu", "", 8)


@pytest.fixture(scope="module")
def whisper() -> Any:
    from tests.support import ROOT
    from workers.stages.model_files import locate
    from workers.stages.transcribe import load_model

    return load_model(locate("tiny.en", ROOT / "data" / "models"), "cpu")


def scored(pipeline: Any, whisper: Any, cond: realvoices.Condition) -> dict[str, Any]:
    from pyannote.metrics.diarization import DiarizationErrorRate

    from workers.stages.diarize import assign_speakers, diarize

    conv = realvoices.conversation(cond)
    realvoices.words_for(conv, realvoices.whisper_words(whisper))
    turns = diarize(pipeline, conv.audio)
    ref, hyp = realvoices.annotation(conv.turns), realvoices.annotation([(t.start, t.end, t.speaker) for t in turns])
    metric = DiarizationErrorRate(collar=0.0)
    merged = assign_speakers(realvoices.transcript(whisper, conv.audio), turns)
    words = [(w.start, w.end, w.speaker) for s in merged.segments for w in s.words]
    return {"der": float(metric(ref, hyp)), "speakers": len({t.speaker for t in turns}), "truth": len(conv.speakers),
            "words_right": realvoices.words_on_right_speaker(conv, words, metric.optimal_mapping(ref, hyp)),
            "words": len(words)}


@pytest.mark.parametrize("cond", [realvoices.SET[0], realvoices.SET[3]], ids=["2 speakers", "3 speakers"])
def test_real_voices_hold_their_level(pipeline: Any, whisper: Any, cond: realvoices.Condition) -> None:
    got = scored(pipeline, whisper, cond)
    bound = BOUNDS[cond.speakers]
    assert got["speakers"] == got["truth"], got
    assert got["der"] <= bound["der"], got
    assert got["words"] > 40 and got["words_right"] >= bound["words_right"], got
