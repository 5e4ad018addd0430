"""Routing and re-decoding rules of issue 22 (workers.stages.language_choice, decode_checks), pure.

Decoding is replaced by a table of what each (model, language) decoding returns: the rules
under test are which decodings are asked for and which one is kept.
"""
from __future__ import annotations

import dataclasses

from core.models import ModelSet
from mp4totext.contracts import Segment, Word
from workers.stages import decode_checks, language_choice
from workers.stages.transcribe import Run, TranscribeOptions


@dataclasses.dataclass
class Window:
    start: int
    end: int
    language: str
    probs: dict
    speech: int = 16000


MODELS = ModelSet.of("base,tiny.en")


def seg(text: str, logprob: float = -0.3, words: list[str] | None = None) -> Segment:
    ws = [Word(word=f" {w}", start=i * 0.3, end=i * 0.3 + 0.3) for i, w in enumerate(words or [])]
    return Segment(id=0, start=0.0, end=3.0, text=text, avg_logprob=logprob, words=ws)


class Decoder:
    """decode(model, language=...) answering from a table; records what was asked."""

    def __init__(self, table: dict) -> None:
        self.table, self.asked, self.cold = table, [], []

    def __call__(self, model: str, language: str, fallback: bool = True) -> tuple[list[Segment], None]:
        (self.asked if fallback else self.cold).append((model, language))
        if fallback and (model, language, "hot") in self.table:
            return [self.table[(model, language, "hot")]], None
        return [self.table[(model, language)]], None

    @property
    def every(self) -> list[tuple[str, str]]:
        return sorted(self.asked + self.cold)


def decide(run: Run, windows: list[Window], decoder: Decoder, expected: tuple[str, ...] = ()) -> tuple:
    options = TranscribeOptions(expected_languages=expected)
    ev = language_choice.evidence(run, windows, expected)
    part, _, name = language_choice.decide(MODELS, lambda spec: spec.name, run, ev, options, decoder)
    return part[0].text, name, run.language


def test_loops_and_whispers_own_failures_are_failures() -> None:
    assert decode_checks.has_loop("Georga-fie Kee, Bie-bie-bie-bie, car")
    assert decode_checks.has_loop("gredini gredini gredini")
    assert not decode_checks.has_loop("I said no, and she said no.")
    assert decode_checks.failed(seg("fine words", logprob=-1.2))
    assert decode_checks.failed(seg("la " * 40))  # compresses far better than speech
    assert not decode_checks.failed(seg("Bugün Osmanlı İmparatorluğunun tarihini konuşacağız."))


def test_a_loop_that_survives_is_kept_once_in_text_and_words() -> None:
    looped = seg("go home go home go home go home now", words="go home go home go home go home now".split())
    out = decode_checks.collapse_loops([looped])[0]
    assert out.text == "go home now" and [w.word.strip() for w in out.words] == ["go", "home", "now"]


def test_sure_english_goes_to_the_english_only_model_and_is_not_redecoded() -> None:
    run = Run(0, 48000, "en", 0.97)
    decoder = Decoder({("tiny.en", "en"): seg("Good morning everyone.")})
    assert decide(run, [Window(0, 48000, "en", {"en": 0.97, "de": 0.01})], decoder) == (
        "Good morning everyone.", "tiny.en", "en")
    assert decoder.every == [("tiny.en", "en")]


def test_english_with_turkish_near_never_reaches_the_english_only_model() -> None:
    """The file of issue 22: detected en p 0.83 with tr close behind, hint tr,en."""
    run = Run(0, 48000, "en", 0.83)
    decoder = Decoder({("base", "en"): seg("Today we talk."), ("base", "tr"): seg("Bugün konuşacağız.")})
    text, name, _ = decide(run, [Window(0, 48000, "en", {"en": 0.6, "tr": 0.25})], decoder, ("tr", "en"))
    assert name == "base" and ("tiny.en", "en") not in decoder.every and text == "Today we talk."


def test_a_hinted_run_keeps_its_detected_language_over_a_fluent_hallucination() -> None:
    """Log-probability prefers fluent English nonsense: it may not overrule a hinted detection that holds up."""
    run = Run(0, 48000, "tr", 0.8)
    decoder = Decoder({("base", "tr"): seg("Bugün Osmanlı tarihini konuşacağız.", -0.6),
                       ("base", "en"): seg("I don't know if you know what I'm talking about.", -0.2)})
    assert decide(run, [Window(0, 48000, "tr", {"tr": 0.3, "en": 0.08})], decoder, ("tr", "en")) == (
        "Bugün Osmanlı tarihini konuşacağız.", "base", "tr")
    assert decoder.every == [("base", "tr")]


def test_a_failed_decoding_is_redecoded_in_the_other_candidates_and_never_kept() -> None:
    run = Run(0, 48000, "en", 0.7)
    decoder = Decoder({("base", "en"): seg("Bie-bie-bie-bie, car, car!", -0.9),
                       ("base", "tr"): seg("Bugün coğrafya dersinde dağları konuşacağız.", -0.7)})
    text, name, language = decide(run, [Window(0, 48000, "en", {"en": 0.5, "tr": 0.3})], decoder, ("tr", "en"))
    assert (text, name, language) == ("Bugün coğrafya dersinde dağları konuşacağız.", "base", "tr")
    assert 0 < run.probability < 1


def test_an_unsure_automatic_run_is_decided_by_decoding_among_its_likeliest_languages() -> None:
    """No hint, detected hu p 0.3 (espeak's Turkish): hu, tr and en are tried, the one that holds up is kept."""
    run = Run(0, 48000, "hu", 0.3)
    decoder = Decoder({("base", "hu"): seg("Bügün Oszmán tarihinit konusz kozdzsag", -1.3),
                       ("base", "tr"): seg("Bugün Osmanlı tarihini konuşacağız.", -0.5),
                       ("base", "en"): seg("Bugun Osmanli tahini conus a cause", -1.1)})
    windows = [Window(0, 48000, "hu", {"hu": 0.3, "tr": 0.25, "en": 0.1})]
    assert decide(run, windows, decoder) == ("Bugün Osmanlı tarihini konuşacağız.", "base", "tr")
    # compared at temperature 0; the one kept holds up, so no decoding with the fallback
    assert sorted(decoder.cold) == [("base", "en"), ("base", "hu"), ("base", "tr")] and decoder.asked == []


def test_a_rival_that_wins_but_still_fails_is_decoded_again_with_the_fallback() -> None:
    run = Run(0, 48000, "hu", 0.3)
    decoder = Decoder({("base", "hu"): seg("la la la la la la la la", -1.3),
                       ("base", "tr"): seg("Bugün Osmanlı tarihini konuşacağız.", -1.1),
                       ("base", "tr", "hot"): seg("Bugün Osmanlı tarihini konuşacağız efendim.", -0.9),
                       ("base", "en"): seg("na na na na na na na na", -1.2)})
    windows = [Window(0, 48000, "hu", {"hu": 0.3, "tr": 0.25, "en": 0.1})]
    assert decide(run, windows, decoder) == ("Bugün Osmanlı tarihini konuşacağız efendim.", "base", "tr")
    assert decoder.asked == [("base", "tr")]  # only the one kept, with the fallback


def test_a_fixed_language_is_never_second_guessed() -> None:
    run = Run(0, 48000, "tr", 1.0)
    decoder = Decoder({("base", "tr"): seg("la la la la la", -1.5)})
    options = TranscribeOptions(language="tr")
    part, _, name = language_choice.decide(MODELS, lambda s: s.name, run,
                                           language_choice.Evidence(False, ("tr",), {"tr": 1.0}), options, decoder)
    assert decoder.asked == [("base", "tr")] and name == "base" and part[0].text == "la"


def test_when_every_decoding_fails_detection_breaks_the_tie() -> None:
    """CI's failure: Turkish at -1.06 and a hallucinated English refrain at -1.00 both fail; tr was detected at 0.71."""
    run = Run(0, 48000, "tr", 0.71)
    decoder = Decoder({("base", "tr"): seg("Bu gün Osmanlı imparatorluğu nuntar dikini konusaklarız.", -1.06),
                       ("base", "en"): seg("I don't know if you know what I'm talking about, but I don't know if "
                                           "you know what I'm talking about.", -1.0)})
    assert decode_checks.has_loop(decoder.table[("base", "en")].text)
    text, name, language = decide(run, [Window(0, 48000, "tr", {"tr": 0.5, "en": 0.2})], decoder, ("tr", "en"))
    assert language == "tr" and text.startswith("Bu gün Osmanlı")
    assert sorted(decoder.cold) == [("base", "en"), ("base", "tr")] and decoder.asked == [("base", "tr")]


def test_ordinary_speech_is_not_a_loop() -> None:
    from mp4totext import samples
    texts = [*samples.SENTENCES, samples.DEMO_TEXT, *(t for _, t in samples.DIALOGUE + samples.DIALOGUE_3),
             "Bugün coğrafya dersinde Türkiye'nin dağlarını ve nehirlerini konuşacağız.",
             "No, no, I said we meet on Monday, not on Tuesday."]
    assert [t for t in texts if decode_checks.has_loop(t)] == []


def test_turkish_the_model_barely_believes_is_not_given_to_a_worse_english_decoding() -> None:
    """espeak's default Turkish voice with the hint tr,en: detected hu 0.71, en 0.035, tr 0.013.
    Both decodings mostly fail; English's tokens are far less likely (-1.85 against -1.004)."""
    run = Run(0, 48000, "en", 0.73)
    decoder = Decoder({("base", "en"): seg("Bogen, Zografia, M. Sinbeck, Xenin, Talakyn, Ömenni", -1.85),
                       ("base", "tr"): seg("Bugün zor tafya bensin ve köpkiyenin Tarlakan", -1.004)})
    windows = [Window(0, 48000, "en", {"hu": 0.71, "cs": 0.073, "la": 0.044, "en": 0.035, "tr": 0.013})]
    text, name, language = decide(run, windows, decoder, ("tr", "en"))
    assert (language, text) == ("tr", "Bugün zor tafya bensin ve köpkiyenin Tarlakan")


def test_decodings_that_mostly_fail_are_ranked_by_likelihood_not_by_failed_seconds() -> None:
    def part(*logprobs: float) -> list[Segment]:
        return [Segment(id=i, start=i * 3.0, end=i * 3.0 + 3.0, text=f"words {i}", avg_logprob=lp)
                for i, lp in enumerate(logprobs)]

    worse = part(-1.9, -1.8, -1.9, -0.9)  # 75 % failed, tokens far less likely
    better = part(-1.01, -1.02, -1.01, -1.01)  # 100 % failed by a hair
    assert decode_checks.rank(better, 0.5) > decode_checks.rank(worse, 0.5)
    assert decode_checks.rank(part(-0.5, -0.5, -0.5, -1.2), 0.5) > decode_checks.rank(part(-0.2, -1.2, -1.2, -0.2), 0.5)


def test_a_decoding_that_leaves_out_most_of_the_speech_is_failed_and_unlikely() -> None:
    """espeak's default Turkish voice decoded as English at temperature 0: one 1.4 s segment at
    -0.22 for 14.5 s of speech. Against Turkish at -1.004 over all of it, Turkish is kept."""
    short = [Segment(id=0, start=13.1, end=14.5, text="Buggenzorghafjabemzinbefövkihenin", avg_logprob=-0.22)]
    full = [Segment(id=i, start=i * 2.9, end=i * 2.9 + 2.9, text=f"Bugün {i}", avg_logprob=-1.004) for i in range(5)]
    assert decode_checks.failed_share(short) == 0 and decode_checks.failed_share(short, 14.5) > 0.9
    assert decode_checks.uncovered(full, 14.5) == 0
    assert decode_checks.rank(full, 0.44, 14.5) > decode_checks.rank(short, 0.56, 14.5)
    assert decode_checks.rank(short, 0.56) > decode_checks.rank(full, 0.44)  # what ranking saw before
