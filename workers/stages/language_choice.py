"""Which model and which language decode a run of speech (issue 22), given what detection saw.

The English-only model takes a run only when every stretch of it is English with at least
ENGLISH_ONLY_MIN among all languages and no other candidate within RIVAL_NEAR of English's
probability: robotic or accented Turkish that the multilingual model scores near English goes to
the multilingual model.

Detection is trusted unless the decoding shows it wrong. A run whose decoding Whisper itself
calls a failure (decode_checks.failed: low log-probability, a compression ratio of repeated
text, a repetition loop), or an automatic run (no expected languages) detected below DECIDED, is
decoded again on the multilingual model in each of its CANDIDATES languages and the decoding
that holds up best is kept. The decodings compared are at temperature 0 (Whisper's fallback to
higher temperatures, which a wrong language always triggers, doubled the cost of a doubtful run
and, sampling, made the choice between two failing languages differ from run to run); the one
kept is decoded again with the fallback where it still fails somewhere. Ranked by the fewest
failed seconds (all mostly-failed decodings equal), then detection's share of the language
(smoothed: SMOOTHING) and the decoding's token log-probability together (decode_checks.rank).
A run detected among the expected languages whose decoding holds up keeps its language:
Whisper's log-probability alone rates a fluent English hallucination ("I don't know if you know
what I'm talking about") as high as correct but unusual Turkish.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import structlog

from core.models import ModelSet, ModelSpec
from mp4totext.contracts import Segment
from workers.stages import decode_checks

ENGLISH_ONLY_MIN = 0.8
RIVAL_NEAR = 0.1
DECIDED = 0.9
CANDIDATES = 3
# Added to each candidate's mean detection probability before the shares are taken: where the
# model believes none of them (espeak's default Turkish voice: hu 0.71, en 0.035, tr 0.013) a
# ratio of two crumbs is no evidence; where one is clearly detected (0.5 against 0.2) it still is.
SMOOTHING = 0.05
log = structlog.get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What detection says about one run: may the English-only model take it, which languages to try."""

    english_ok: bool
    candidates: tuple[str, ...]  # the run's language first, then the likeliest others
    share: dict[str, float]  # each candidate's share of the detection probability over the run


def evidence(run: Any, windows: Sequence[Any], expected: tuple[str, ...]) -> Evidence:
    """Evidence over the detected stretches (``.probs``, ``.speech``) whose middle lies in ``run``."""
    inside = [w for w in windows if w.language and run.start <= (w.start + w.end) // 2 < run.end]
    totals: dict[str, float] = {}
    for w in inside:
        for lang, p in w.probs.items():
            if not expected or lang in expected:
                totals[lang] = totals.get(lang, 0.0) + p * max(w.speech, 1)

    def english(w: Any) -> bool:
        en = w.probs.get("en", 0.0)
        rival = max((p for lang, p in w.probs.items() if lang != "en" and (not expected or lang in expected)),
                    default=0.0)
        return en >= ENGLISH_ONLY_MIN and rival < RIVAL_NEAR * en

    ranked = sorted(totals, key=lambda lang: -totals[lang])
    candidates = tuple(dict.fromkeys([run.language, *ranked]))[:CANDIDATES] if run.language else ()
    weight = sum(max(w.speech, 1) for w in inside) or 1
    smoothed = {lang: totals.get(lang, 0.0) / weight + SMOOTHING for lang in candidates}
    total = sum(smoothed.values()) or 1.0
    return Evidence(bool(inside) and all(english(w) for w in inside), candidates,
                    {lang: p / total for lang, p in smoothed.items()})


def doubtful(run: Any, part: Sequence[Segment], hinted: bool, speech_s: float = 0.0) -> bool:
    """Whether a run's first decoding must be checked against the other candidate languages."""
    return decode_checks.failed_share(part, speech_s) > 0 or (not hinted and run.probability < DECIDED)


def _speech_s(info: Any, options: Any) -> float:
    """Seconds of speech VAD found in a decoded run (0, nothing to compare with, without VAD)."""
    return float(getattr(info, "duration_after_vad", 0.0) or 0.0) if options.vad_filter else 0.0


def decide(models: ModelSet, load: Callable[[ModelSpec], Any], run: Any, ev: Evidence, options: Any,
           decode: Callable[..., tuple[list[Segment], Any]]) -> tuple[list[Segment], Any, str]:
    """Decode one run on the model and in the language that hold up; returns (segments, info, model name).

    A loop that survives every decoding is kept once (decode_checks.collapse_loops).
    """
    spec = models.for_language(run.language or "en", options.task, options.model)
    routed = not options.language and not options.model and run.detected
    if spec.english_only and routed and not ev.english_ok and models.multilingual:
        spec = models.multilingual
    multi = models.by_name[options.model] if options.model else models.multilingual
    if options.language or not run.detected or multi is None or multi.english_only:
        part, info = decode(load(spec), language=run.language)
        return decode_checks.collapse_loops(part), info, spec.name
    # Every decoding that is compared is at temperature 0: the fallback's sampling made the choice
    # between two failing languages a coin toss from one run to the next. A decoding that does not
    # fail is what the fallback would have returned anyway (it re-decodes failed windows only).
    first = (run.language, spec.name)
    part, info = decode(load(spec), language=run.language, fallback=False)
    if not doubtful(run, part, bool(options.expected_languages), _speech_s(info, options)):
        return decode_checks.collapse_loops(part), info, spec.name
    tried = {first: (part, info)}
    for lang in ev.candidates:
        if (lang, multi.name) not in tried:
            tried[(lang, multi.name)] = decode(load(multi), language=lang, fallback=False)
    ranks = {k: decode_checks.rank(v[0], ev.share.get(k[0], 0.0), _speech_s(v[1], options)) for k, v in tried.items()}
    lang, name = max(ranks, key=ranks.__getitem__)
    part, info = tried[(lang, name)]
    if decode_checks.failed_share(part, _speech_s(info, options)) > 0:  # kept: with Whisper's temperature fallback
        part, info = decode(load(spec if (lang, name) == first else multi), language=lang)
    log.info("language_decided_by_decoding", detected=run.language, chosen=lang, model=name,
             tried={f"{k[0]}/{k[1]}": [round(r[1], 3), -r[0]] for k, r in ranks.items()})
    if lang != run.language:
        run.language, run.probability = lang, round(ev.share.get(lang, 0.0), 4)
    return decode_checks.collapse_loops(part), info, name
