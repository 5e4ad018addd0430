"""Routing between the deployment's models and the language of every stretch of audio: the pure
rules, on hand-made detections (the real models run in tests/e2e/test_languages.py)."""
from __future__ import annotations

import numpy as np
import pytest

from core.models import ModelSet, parse
from workers.stages.media import SAMPLE_RATE
from workers.stages.transcribe import Detected, _spans, _utterances, constrain, language_runs

S = SAMPLE_RATE
BOTH = ModelSet.of("base,tiny.en")


def test_default_set_routes_english_to_the_english_model_and_the_rest_to_base() -> None:
    assert [m.name for m in BOTH.specs] == ["base", "tiny.en"] and BOTH.default.name == "base"
    assert BOTH.detector(None).name == "base"
    assert BOTH.for_language("en", "transcribe", None).name == "tiny.en"
    assert BOTH.for_language("tr", "transcribe", None).name == "base"
    assert BOTH.for_language("en", "translate", None).name == "base"  # translation needs the multilingual one
    assert BOTH.for_language("en", "transcribe", "base").name == "base"  # a named model is obeyed
    assert BOTH.detector("tiny.en") is None  # an English-only model has nothing to detect


def test_requests_a_model_cannot_serve_are_refused_with_the_reason() -> None:
    assert BOTH.check(None, "tr", ["tr", "en"], "translate") is None
    assert "not a model of this server" in BOTH.check("large-v3", None, [], "transcribe")
    assert "only recognises English, not tr" in BOTH.check("tiny.en", "tr", [], "transcribe")
    assert "only recognises English, not de" in BOTH.check("tiny.en", None, ["en", "de"], "transcribe")
    english = ModelSet.of("tiny.en")
    assert "TRANSLATE needs a multilingual model" in english.check(None, None, [], "translate")
    assert english.check(None, "en", ["en"], "transcribe") is None


def test_model_sources_parse_to_names() -> None:
    assert [m.name for m in parse(" base , tiny.en,base ")] == ["base", "tiny.en"]
    assert parse("/opt/models/whisper-small.en")[0].english_only
    assert parse("./models/large-v3")[0].name == "large-v3" and parse("./models/large-v3")[0].multilingual
    with pytest.raises(ValueError, match="names no model"):
        parse(" , ")


def test_a_hint_narrows_detection_and_renormalises() -> None:
    probs = {"hu": 0.6, "tr": 0.25, "en": 0.05, "de": 0.1}
    assert constrain(probs, ()) == ("hu", 0.6)
    lang, p = constrain(probs, ("tr", "en"))
    assert lang == "tr" and p == pytest.approx(0.25 / 0.30)


def w(a: float, b: float, lang: str | None, p: float = 0.95, speech: float | None = None) -> Detected:
    return Detected(int(a * S), int(b * S), lang, p, raw=p, speech=int((b - a if speech is None else speech) * S))


def test_runs_follow_confident_switches_and_keep_uncertain_long_stretches() -> None:
    runs = language_runs([w(0, 13, "tr", 0.3), w(13, 22, "en"), w(22, 36, "tr", 0.2), w(36, 45, "en")], 0.5, "en")
    assert [(r.start / S, r.end / S, r.language) for r in runs] == [(0, 13, "tr"), (13, 22, "en"), (22, 36, "tr"),
                                                                    (36, 45, "en")]
    assert runs[0].probability == pytest.approx(0.3)  # uncertain, and the result will say so


def test_silence_and_short_uncertain_blips_take_their_neighbours_language() -> None:
    runs = language_runs([w(0, 2, None, 0.0, 0), w(2, 30, "en"), w(30, 32, "cy", 0.2, speech=1.5), w(32, 60, "en", 0.9),
                          w(60, 62, None, 0.0, 0)], 0.5, "tr")
    assert [(r.start / S, r.end / S, r.language) for r in runs] == [(0, 62, "en")]
    assert runs[0].probability == pytest.approx((0.95 * 28 + 0.9 * 28) / 56)  # silence does not dilute it
    assert [r.language for r in language_runs([w(0, 30, None, 0.0, 0)], 0.5, "tr")] == ["tr"]  # nothing to go by


def test_utterances_are_cut_in_the_middle_of_pauses() -> None:
    mask = np.zeros(10 * S, dtype=bool)
    mask[0:3 * S] = mask[4 * S:6 * S] = mask[int(6.2 * S):9 * S] = True  # a 1 s pause, then a 0.2 s one
    assert [(a / S, b / S) for a, b in _utterances(0, 10 * S, mask)] == [(0, 3.5), (3.5, 10)]
    assert _spans([False, True, True, False]) == [(0, 1, False), (1, 3, True), (3, 4, False)]


def test_a_short_uncertain_opening_does_not_set_the_language_of_the_file() -> None:
    """Review finding: a cough detected as Welsh at the start made the first run Welsh."""
    runs = language_runs([w(0, 2, None, 0.0, 0), w(2, 4, "cy", 0.3, speech=1.5), w(4, 60, "en", 0.98)], 0.5, "en")
    assert [(r.start / S, r.end / S, r.language) for r in runs] == [(0, 60, "en")]
    assert runs[0].probability == pytest.approx(0.98) and runs[0].detected


def test_silence_is_not_reported_as_an_uncertain_language() -> None:
    from workers.stages.transcribe import TranscribeOptions, _result

    runs = language_runs([w(0, 30, None, 0.0, 0)], 0.5, "en")
    assert not runs[0].detected
    r = _result([], runs, np.zeros(30 * S, dtype=np.float32), TranscribeOptions(), "tiny.en", 0.0, 0.0, 0.5)
    assert r.language == "en" and not r.language_uncertain and r.languages == []


def test_languages_a_model_lacks_are_refused_and_unscored_hints_are_undecided() -> None:
    assert "yue" not in BOTH.by_name["base"].languages and len(BOTH.by_name["base"].languages) == 99
    assert "no model of this server recognises yue" in BOTH.check(None, None, ["yue", "zh"], "transcribe")
    assert "yue" in parse("/models/whisper-large-v3")[0].languages
    assert constrain({"en": 0.9}, ("tr", "de")) == ("tr", 0.0)
