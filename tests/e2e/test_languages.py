"""Every language, offline, through the real stack: the default model set (Whisper base,
multilingual, + tiny.en), routing by language, expected-language hints, languages per segment on
mixed speech, uncertain detection reported, translation to English.

The speech is espeak-ng's. Its English and German are recognised well; its Turkish is robotic:
Whisper base detects the default Turkish voice as Hungarian (p~0.9). The "tr+f2" voice used here
is detected as Turkish but with low confidence (p~0.25), which is exactly what the uncertain
report is for; with the hint ["tr", "en"] it is Turkish with p~0.8. Its Turkish is bounded by
character error rate (measured ~0.2): word error rate punishes every split word and suffix of an
agglutinative language (0.6-0.9 on a five-word sentence whose letters are nearly all right).
"""
from __future__ import annotations

import pathlib
from typing import Any, Iterator

import grpc
import pytest

from mp4totext import samples
from mp4totext.samples import char_error_rate, word_error_rate
from mp4totext.v1 import transcription_pb2 as tpb
from tests.support import Stack

EN = "Today we will talk about the history of computing. The first computers filled entire rooms."
DE = "Guten Morgen. Heute sprechen wir über die Geschichte der Stadt und ihre Brücken."
TR = "Bugün Osmanlı İmparatorluğunun tarihini konuşacağız."
TR_VOICE = "tr+f2"
# The file of issue 22: a Turkish lecture opening, then English (and the reverse order).
TR_LECTURE = ("Bugün coğrafya dersinde Türkiye'nin dağlarını ve nehirlerini konuşacağız. Önce Karadeniz "
              "bölgesinin iklimini inceleyeceğiz. Sonra haritada büyük şehirleri bulacağız.")
EN_LECTURE = ("Now let us continue in English. Please open your books to chapter three and look at the map "
              "of the region.")


@pytest.fixture(scope="module")
def client(stack: Stack, key_a: str) -> Iterator[Any]:
    from mp4totext.client import Client

    with Client(stack.target, key_a) as c:
        yield c


@pytest.fixture(scope="module")
def uploaded(client: Any, media_dir: pathlib.Path) -> dict[str, str]:
    files = {"en": samples.make_media(EN, str(media_dir / "lang-en.m4a"), voice="en-us"),
             "de": samples.make_media(DE, str(media_dir / "lang-de.mp4"), voice="de"),
             "tr": samples.make_media(TR, str(media_dir / "lang-tr.m4a"), voice=TR_VOICE)}
    files["mixed"], _ = samples.make_dialogue(str(media_dir / "lang-mixed.m4a"), [
        (TR_VOICE, TR), ("en-us", EN), (TR_VOICE, TR), ("en-us", EN)], pause_s=1.0)
    return {k: client.upload(v).name for k, v in files.items()}


@pytest.fixture(scope="module")
def switching(client: Any, media_dir: pathlib.Path) -> dict[str, tuple[str, list[tuple[float, float, str, str]]]]:
    """The two files of issue 22: name -> (media, parts as (start, end, language, text))."""
    out = {}
    for name, turns in {"tr-en": [("tr", TR_LECTURE), ("en", EN_LECTURE)],
                        "en-tr": [("en", EN_LECTURE), ("tr", TR_LECTURE)]}.items():
        path, truth = samples.make_dialogue(str(media_dir / f"switch-{name}.m4a"), [
            (TR_VOICE if lang == "tr" else "en-us", text) for lang, text in turns], pause_s=1.0)
        out[name] = (client.upload(path).name,
                     [(a, b, lang, text) for (a, b, _), (lang, text) in zip(truth, turns)])
    return out


def run(client: Any, media: str, **config: Any) -> Any:
    job = client.wait(client.create(media, **config).name, timeout=600)
    assert job.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED, (job.state, job.error_message)
    return job


def test_capabilities_list_the_model_set(client: Any) -> None:
    caps = client.capabilities()
    assert caps.model == "base" and caps.multilingual and caps.translation_available
    models = {m.name: m for m in caps.models}
    assert set(models) == {"base", "tiny.en"}
    assert models["base"].multilingual and models["base"].translation_available
    assert {"tr", "en", "de"} <= set(models["base"].language_codes) and len(models["base"].language_codes) >= 99
    assert list(models["tiny.en"].language_codes) == ["en"] and not models["tiny.en"].translation_available


def test_english_is_detected_and_routed_to_the_english_model(client: Any, uploaded: dict[str, str]) -> None:
    r = run(client, uploaded["en"]).result
    assert r.model == "tiny.en" and r.language_code == "en" and r.language_probability > 0.9, r
    assert not r.language_uncertain and [x.language_code for x in r.languages] == ["en"]
    assert all(s.language_code == "en" for s in r.segments)
    assert word_error_rate(EN, r.text) < 0.25, r.text


def test_a_named_model_is_obeyed(client: Any, uploaded: dict[str, str]) -> None:
    job = run(client, uploaded["en"], model="base")
    assert job.config.model == "base" and job.result.model == "base" and job.result.language_code == "en"
    assert word_error_rate(EN, job.result.text) < 0.25, job.result.text


def test_german_runs_on_the_multilingual_model(client: Any, uploaded: dict[str, str]) -> None:
    r = run(client, uploaded["de"]).result
    assert r.model == "base" and r.language_code == "de" and r.language_probability > 0.9, r
    wer = word_error_rate(DE, r.text)
    print(f"\nGerman (espeak-ng, Whisper base): WER {wer:.2f}: {r.text}")
    assert wer < 0.35, r.text


def test_turkish_uncertain_detection_is_reported_and_a_hint_settles_it(client: Any, uploaded: dict[str, str]) -> None:
    auto = run(client, uploaded["tr"])
    assert auto.result.model == "base" and auto.result.language_uncertain, auto.result
    assert auto.result.language_probability < 0.5
    assert any("confidence" in w and "expected_language_codes" in w for w in auto.warnings), auto.warnings

    hinted = run(client, uploaded["tr"], expected_language_codes=["tr", "en"])
    r = hinted.result
    assert list(hinted.config.expected_language_codes) == ["tr", "en"]
    assert r.language_code == "tr" and r.model == "base" and not r.language_uncertain and not hinted.warnings, r
    wer, cer = word_error_rate(TR, r.text), char_error_rate(TR, r.text)
    print(f"\nTurkish (espeak-ng tr+f2, hint tr,en): p={r.language_probability:.2f} WER {wer:.2f} CER {cer:.2f}: {r.text}")
    assert cer < 0.35 and "osmanlı" in r.text.lower(), r.text


def test_mixed_turkish_and_english_get_a_language_per_segment(client: Any, uploaded: dict[str, str]) -> None:
    r = run(client, uploaded["mixed"], expected_language_codes=["tr", "en"]).result
    turns: list[str] = []
    for s in r.segments:
        if not turns or turns[-1] != s.language_code:
            turns.append(s.language_code)
    assert turns == ["tr", "en", "tr", "en"], [(s.language_code, s.text) for s in r.segments]
    assert r.model == "base+tiny.en" and {x.language_code for x in r.languages} == {"tr", "en"}
    assert r.language_code == r.languages[0].language_code  # the most spoken one
    english = " ".join(s.text for s in r.segments if s.language_code == "en")
    assert word_error_rate(f"{EN} {EN}", english) < 0.25, english
    starts = [s.start_offset.ToTimedelta().total_seconds() for s in r.segments]
    assert starts == sorted(starts)


# Issue 22's target: Turkish CER <= 0.35 (Whisper base, espeak-ng tr+f2). Measured 2026-12-07:
# 0.28 when the lecture opens in Turkish; 0.36 when Turkish followed English while the run boundary
# sat at the pause's first frame (the Turkish run began on a second of silence), 0.33 since the cut
# falls in the middle of the pause (batched.quietest). Base on espeak's Turkish moves 0.26-0.36 with
# where a cut falls, so the bound has little slack: a failure here is a real regression of routing
# or boundaries, not noise, when both files move.
TR_CER_BOUND = {"tr-en": 0.35, "en-tr": 0.35}


def _parts(result: Any, parts: list[tuple[float, float, str, str]]) -> list[list[Any]]:
    """The result's segments of each part (by the segment's middle; borders halfway between parts)."""
    bounds = [0.0] + [(a[1] + b[0]) / 2 for a, b in zip(parts, parts[1:])] + [float("inf")]
    mid = [(s, (s.start_offset.ToTimedelta() + s.end_offset.ToTimedelta()).total_seconds() / 2)
           for s in result.segments]
    return [[s for s, m in mid if lo <= m < hi] for lo, hi in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("hint", [["tr", "en"], []], ids=["hint", "auto"])
@pytest.mark.parametrize("order", ["tr-en", "en-tr"])
def test_a_lecture_switching_language_is_each_part_in_its_language(
        client: Any, switching: dict[str, Any], order: str, hint: list[str]) -> None:
    """Issue 22: the Turkish part came back from tiny.en as "Bie-bie-bie-bie" with 0.83 confidence in English.

    Each part in its language, Turkish CER <= 0.35 and English WER < 0.25, no repetition loop
    anywhere; without a hint the Turkish part is either right or the result says its language
    is uncertain (with the warning), never a confident wrong language.
    """
    from workers.stages.decode_checks import has_loop

    media, parts = switching[order]
    job = run(client, media, **({"expected_language_codes": hint} if hint else {}))
    r = job.result
    got = [(s.language_code, s.text) for s in r.segments]
    assert not any(has_loop(s.text) for s in r.segments), got
    for (_, _, lang, text), segs in zip(parts, _parts(r, parts)):
        said = " ".join(s.text for s in segs)
        print(f"\n{order} {hint or 'auto'} {lang}: {[s.language_code for s in segs]} {said}")
        assert segs, got
        if lang == "en":
            assert all(s.language_code == "en" for s in segs) and word_error_rate(text, said) < 0.25, got
        elif hint or not r.language_uncertain:
            assert all(s.language_code == "tr" for s in segs), got
            assert char_error_rate(text, said) <= TR_CER_BOUND[order], said
        else:
            assert any("confidence" in w for w in job.warnings), job.warnings
            assert all(x.probability < 0.9 for x in r.languages if x.language_code != "en"), r.languages


def test_translate_gives_english_text(client: Any, uploaded: dict[str, str]) -> None:
    job = run(client, uploaded["de"], task=tpb.TRANSCRIPTION_TASK_TRANSLATE)
    r = job.result
    assert r.task == tpb.TRANSCRIPTION_TASK_TRANSLATE and r.model == "base" and r.language_code == "de"
    words = set(r.text.lower().replace(".", " ").replace(",", " ").split())
    print(f"\nGerman -> English (Whisper base): {r.text}")
    assert {"morning", "today", "city", "history"} & words and not {"heute", "morgen", "stadt"} & words, r.text


@pytest.mark.parametrize("config, message", [
    ({"model": "large-v3"}, "not a model of this server"),
    ({"model": "tiny.en", "language_code": "tr"}, "only recognises English"),
    ({"model": "tiny.en", "task": tpb.TRANSCRIPTION_TASK_TRANSLATE}, "needs a multilingual model"),
    ({"expected_language_codes": ["tr", "xx"]}, "expected_language_codes[1]='xx'"),
    ({"language_code": "de", "expected_language_codes": ["tr", "en"]}, "not among"),
    ({"expected_language_codes": ["en"] * 11}, "at most 10"),
])
def test_requests_the_models_cannot_serve_are_refused(client: Any, uploaded: dict[str, str], config: dict,
                                                      message: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.create(uploaded["en"], **config)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details(), \
        err.value.details()
