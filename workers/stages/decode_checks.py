"""Whether a decoded stretch is to be trusted, and which of several decodings of it to keep (pure).

Whisper marks its own failures: a segment whose text compresses too well (gzip ratio above 2.4:
the same words over and over) or whose tokens average a log-probability below -1.0 is what
openai-whisper and faster-whisper re-decode at a higher temperature. On robotic or accented
speech the wrong language, or the English-only model on non-English speech, produces exactly
these: "Bie-bie-bie-bie", "gredini gredini", text in a third language. The stage therefore
decodes a doubtful stretch once per candidate language on the multilingual model and keeps the
one ``rank`` puts first (fewest failed seconds, then detection's share + token log-probability);
a word or short phrase looping three times or more is kept once (``collapse_loops``).
"""
from __future__ import annotations

import math
import re
import zlib
from typing import Sequence

from mp4totext.contracts import Segment

FAILED_COMPRESSION = 2.4  # Whisper's compression_ratio_threshold
FAILED_LOGPROB = -1.0  # Whisper's logprob_threshold
LOOP_REPEATS = 3  # the same word or phrase this many times in a row is a loop
LONG_PHRASE = 5  # ... and a phrase of this many words twice in one segment ("I don't know if you know ...")
MIN_PRIOR = 0.01
UNCOVERED_SHARE = 0.5  # segments covering less than this share of the speech leave the rest failed
MOSTLY_FAILED = 0.5  # decodings failed over this share of their time are ranked as equally failed
_LOOP = re.compile(r"(\b.{1,40}?)(?:[\s,.!?;:-]*\1){%d,}" % (LOOP_REPEATS - 1), re.IGNORECASE | re.DOTALL)


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / max(len(zlib.compress(data)), 1) if data else 0.0


def has_loop(text: str) -> bool:
    """A word or short phrase repeated LOOP_REPEATS times or more in a row ("bie-bie-bie"), or a
    phrase of LONG_PHRASE words or more said twice in one segment (Whisper's hallucinated refrain)."""
    if any(len(m.group(1).strip(" ,.-")) >= 2 for m in _LOOP.finditer(text)):
        return True
    words = [w for w in (_norm(x) for x in text.split()) if w]
    grams = [tuple(words[i:i + LONG_PHRASE]) for i in range(len(words) - LONG_PHRASE + 1)]
    return any(grams.index(g) + LONG_PHRASE <= i for i, g in enumerate(grams))


def failed(segment: Segment) -> bool:
    """What Whisper itself calls a failed decoding, or a repetition loop."""
    return (segment.avg_logprob < FAILED_LOGPROB or compression_ratio(segment.text) > FAILED_COMPRESSION
            or has_loop(segment.text))


def _seconds(segment: Segment) -> float:
    """A segment's weight: its duration, never zero."""
    return max(segment.end - segment.start, 0.01)


def uncovered(segments: Sequence[Segment], speech_s: float) -> float:
    """Seconds of speech a decoding leaves out, when its segments cover under UNCOVERED_SHARE of it.

    Whisper may jump its timestamps over most of a window in a wrong language (espeak's Turkish
    decoded as English: one 1.4 s segment for 14.5 s of speech, at a log-probability of -0.22).
    """
    covered = sum(map(_seconds, segments))
    return speech_s - covered if covered < UNCOVERED_SHARE * speech_s else 0.0


def failed_share(segments: Sequence[Segment], speech_s: float = 0.0) -> float:
    """Share of the decoded time (segment durations) in failed segments; left-out speech is failed."""
    total = sum(map(_seconds, segments))
    bad = sum(_seconds(s) for s in segments if failed(s))
    gap = uncovered(segments, speech_s)
    return (bad + gap) / (total + gap) if total + gap else 0.0


def score(segments: Sequence[Segment], speech_s: float = 0.0) -> float:
    """Duration-weighted mean log-probability per token (higher: the model finds it likelier).

    Comparable between decodings of the same audio in different languages; an empty decoding of
    speech, and speech a decoding left out, score as twice a failure.
    """
    weights = [_seconds(s) for s in segments]
    gap = uncovered(segments, speech_s)
    if not segments:
        return FAILED_LOGPROB * 2
    logprob = sum(w * s.avg_logprob for w, s in zip(weights, segments)) + gap * FAILED_LOGPROB * 2
    return logprob / (sum(weights) + gap)


def rank(segments: Sequence[Segment], prior: float = 1.0, speech_s: float = 0.0) -> tuple[float, float]:
    """Order of decodings of the same audio (max is kept): the fewest failed seconds, then the likeliest.

    Likeliest combines what detection said of the language (``prior``, its share of the detection
    probability) with what decoding says (``score``): log prior + mean token log-probability. A
    fluent English hallucination scores a token log-probability as good as unusual but correct
    Turkish, so without the prior decoding alone would overrule a clear detection. Between two
    decodings that both mostly fail (MOSTLY_FAILED), the failed share says nothing (espeak's default
    Turkish voice: Turkish 100 % failed at -1.004 a token, English 93 % failed at -1.85): the
    likeliest is kept.
    """
    failed = failed_share(segments, speech_s)
    likeliest = math.log(max(prior, MIN_PRIOR)) + score(segments, speech_s)
    return -(1.0 if failed >= MOSTLY_FAILED else round(failed, 1)), likeliest


def _norm(word: str) -> str:
    return re.sub(r"[\W_]+", "", word.lower())


def _dedupe(items: list, key) -> list:
    """``items`` with every n-gram (n <= 6) repeated LOOP_REPEATS+ times in a row kept once."""
    out, i = [], 0
    while i < len(items):
        for n in range(1, 7):
            gram = [key(x) for x in items[i:i + n]]
            reps = 1
            while [key(x) for x in items[i + reps * n:i + (reps + 1) * n]] == gram and len(gram) == n:
                reps += 1
            if reps >= LOOP_REPEATS and any(len(g) >= 2 for g in gram):
                out += items[i:i + n]
                i += reps * n
                break
        else:
            out.append(items[i])
            i += 1
    return out


def collapse_loops(segments: list[Segment]) -> list[Segment]:
    """A loop that survives every re-decoding is kept once, not N times (its words too)."""
    out = []
    for s in segments:
        if not has_loop(s.text):
            out.append(s)
        elif s.words:
            words = _dedupe(list(s.words), lambda w: _norm(w.word))
            out.append(s.model_copy(update={"text": "".join(w.word for w in words).strip(), "words": words}))
        else:
            out.append(s.model_copy(update={"text": _LOOP.sub(lambda m: m.group(1), s.text).strip()}))
    return out
