"""Conversations of real recorded voices with exact speaker truth, generated (never committed).

The voices are recordings that Debian ships with two packages (the test extra installs both):

* ``pocketsphinx-testdata``: LibriVox read speech (one reader, five utterances) and the
  "cards" utterances (another speaker), 16 kHz;
* ``codec2-examples``: reference recordings of the Codec2 project (people reading test
  sentences and radio amateurs on the air), 8 kHz.

Each source is one person (``SPEAKERS``). Long recordings are cut into utterances at their
pauses; a conversation is a seeded sequence of turns (1-15 s, some short back-channels of
< 1 s, some 0.2-1 s overlaps with the previous turn, pauses between), mixed at one level. All of
it is brought to one 8 kHz band first (the codec2 sources have no more), so bandwidth is never
what tells two speakers apart; the ``telephone`` variant adds a 300-3400 Hz band-pass, G.711
mu-law and noise at 15 dB SNR.

The truth is exact by construction: every turn's start and end are where its samples were
placed (trimmed to the utterance's speech), and every reference word is a word of one
utterance heard alone (Whisper's word timings on the isolated utterance, shifted to where it
was placed), so its speaker is never in doubt.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
import random
import subprocess
import wave
from typing import Any, Callable, Iterable

import numpy as np

RATE = 16000
POCKETSPHINX = pathlib.Path("/usr/share/pocketsphinx/test/data")
CODEC2 = pathlib.Path("/usr/share/codec2")
INSTALL = "apt-get install pocketsphinx-testdata codec2-examples"

# speaker -> recordings of that one person (paths relative to the package's data directory)
SPEAKERS: dict[str, list[pathlib.Path]] = {
    "librivox": sorted((POCKETSPHINX / "librivox").glob("*.wav")),
    "cards": sorted((POCKETSPHINX / "cards").glob("*.wav")),
    "ve9qrp": [CODEC2 / "wav/ve9qrp.wav"],
    "vk5qi": [CODEC2 / "wav/vk5qi.wav"],
    "orig16k": [CODEC2 / "raw/speech_orig_16k.wav"],
    "hts1": [CODEC2 / "raw/hts1.raw"],
    "hts2": [CODEC2 / "raw/hts2.raw"],
    "cq_ref": [CODEC2 / "raw/cq_ref.raw"],
    "g3plx": [CODEC2 / "raw/g3plx.raw"],
}
# Not used: codec2's mmt1 and kristoff (under 4 s of speech each), david4 and vk2tpm_004 (no pauses:
# radio noise or data throughout). CAM++ cosine between the sources' utterances is 0.03-0.40 (0.54
# for kristoff/cq_ref), within one source 0.45-0.83: nine different people.


class VoicesMissing(RuntimeError):
    """The Debian packages that carry the recordings are not installed (the message says how)."""


@dataclasses.dataclass(frozen=True)
class Utterance:
    speaker: str
    audio: np.ndarray  # float32, 16 kHz, band-limited to 4 kHz, trimmed to its speech
    key: str  # stable id (source file + span), for caching its words

    @property
    def seconds(self) -> float:
        return len(self.audio) / RATE


@dataclasses.dataclass(frozen=True)
class RefWord:
    start: float
    end: float
    word: str
    speaker: str


@dataclasses.dataclass
class Conversation:
    name: str
    audio: np.ndarray  # float32, 16 kHz mono
    turns: list[tuple[float, float, str]]  # (start, end, speaker): the RTTM
    placed: list[tuple[float, Utterance]]  # each utterance and where it starts (s, on a sample)
    words: list[RefWord] = dataclasses.field(default_factory=list)

    @property
    def seconds(self) -> float:
        return len(self.audio) / RATE

    @property
    def speakers(self) -> list[str]:
        return sorted({s for _a, _b, s in self.turns})

    def rttm(self) -> str:
        return "".join(f"SPEAKER {self.name} 1 {a:.3f} {b - a:.3f} <NA> <NA> {s} <NA> <NA>\n"
                       for a, b, s in self.turns)


def require() -> None:
    missing = [s for s, files in SPEAKERS.items() if not files or not all(f.is_file() for f in files)]
    if missing:
        raise VoicesMissing(f"the real-voice recordings of {missing} are not installed: {INSTALL}")


def _ffmpeg_pcm(path: pathlib.Path, filters: str) -> np.ndarray:
    # codec2's .raw files are 8 kHz 16-bit mono without a header; pocketsphinx's are 16 kHz
    headerless = ["-f", "s16le", "-ar", "16000" if path.is_relative_to(POCKETSPHINX) else "8000", "-ac", "1"]
    cmd = ["ffmpeg", "-nostdin", "-v", "error", *(headerless if path.suffix == ".raw" else []), "-i", str(path),
           "-af", filters, "-ac", "1", "-ar", str(RATE), "-f", "s16le", "-"]
    pcm = subprocess.run(cmd, check=True, capture_output=True).stdout
    return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768


NARROWBAND = "aresample=8000,aresample=16000"  # one 4 kHz band for every source


def _retimed(audio: np.ndarray, factor: float) -> np.ndarray:
    """``audio`` spoken ``factor`` times as fast, at the same pitch (ffmpeg's atempo, WSOLA)."""
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-f", "f32le", "-ar", str(RATE), "-ac", "1", "-i", "-",
           "-af", f"atempo={factor:.4f}", "-f", "f32le", "-"]
    out = subprocess.run(cmd, input=np.ascontiguousarray(audio, "<f4").tobytes(), check=True, capture_output=True)
    return np.frombuffer(out.stdout, "<f4").astype(np.float32)


@functools.lru_cache(maxsize=None)
def _recording(path: pathlib.Path) -> np.ndarray:
    return _ffmpeg_pcm(path, NARROWBAND)


def _frame_db(audio: np.ndarray, frame: int) -> np.ndarray:
    n = len(audio) // frame
    rms = np.sqrt(np.mean(audio[:n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)
    return 20 * np.log10(rms)


def speech_spans(audio: np.ndarray, min_pause_s: float = 0.3, min_speech_s: float = 0.4,
                 max_s: float = 14.0) -> list[tuple[int, int]]:
    """Sample spans of speech: 20 ms frames above the recording's own noise floor + 15 dB, joined
    across pauses shorter than ``min_pause_s``, split at their quietest frame when over ``max_s``."""
    frame = RATE // 50
    db = _frame_db(audio, frame)
    floor = np.percentile(db, 10)
    loud = db > max(floor + 15, db.max() - 45)
    spans: list[list[int]] = []
    gap = int(min_pause_s * 50)
    for i in np.flatnonzero(loud):
        if spans and i - spans[-1][1] <= gap:
            spans[-1][1] = i + 1
        else:
            spans.append([i, i + 1])
    out: list[tuple[int, int]] = []

    def split(a: int, b: int) -> None:
        if (b - a) / 50 <= max_s:
            out.append((a, b))
            return
        lo, hi = a + int(2 * 50), b - int(2 * 50)
        cut = lo + int(np.argmin(db[lo:hi]))
        split(a, cut)
        split(cut + 1, b)

    for a, b in spans:
        if (b - a) / 50 >= min_speech_s:
            split(a, b)
    pad = 2  # 40 ms of context on each side, inside the recording
    return [(max(0, a - pad) * frame, min(len(db), b + pad) * frame) for a, b in out
            if (b - a) / 50 >= min_speech_s]


@functools.lru_cache(maxsize=1)
def utterances() -> dict[str, list[Utterance]]:
    """speaker -> their utterances, each at a common level (-20 dBFS RMS)."""
    require()
    out: dict[str, list[Utterance]] = {}
    for speaker, files in SPEAKERS.items():
        for path in files:
            audio = _recording(path)
            # utterances between pauses, and back-channel-sized pieces (0.3-1 s between micro-pauses)
            short = [(a, b) for a, b in speech_spans(audio, 0.08, 0.3) if b - a <= RATE]
            pieces = speech_spans(audio) + short
            for a, b in sorted(set(pieces)):
                piece = audio[a:b]
                piece = piece * (0.1 / max(1e-4, float(np.sqrt(np.mean(piece ** 2)))))
                out.setdefault(speaker, []).append(Utterance(speaker, piece.astype(np.float32),
                                                             f"{path.name}:{a}-{b}"))
    return out


@dataclasses.dataclass(frozen=True)
class Condition:
    name: str
    speakers: int
    seed: int
    seconds: float = 45.0
    telephone: bool = False
    holdout: bool = False  # keep each speaker's reference utterance (held_out) out of the conversation


def held_out(speaker: str) -> Utterance:
    """A speaker's reference voice for known-speaker tests: their longest utterance of 2-15 s
    (a conversation with ``Condition.holdout`` never uses it)."""
    utts = [u for u in utterances()[speaker] if 2.0 <= u.seconds <= 15.0] or utterances()[speaker]
    return max(utts, key=lambda u: (u.seconds, u.key))


def voice_sample(speaker: str, seconds: float = 8.0) -> np.ndarray:
    """About ``seconds`` of a speaker's utterances (longest first) with 0.3 s pauses: a reference
    clip for someone who is not in the conversation (so nothing needs holding out)."""
    parts: list[np.ndarray] = []
    for u in sorted(utterances()[speaker], key=lambda u: (-u.seconds, u.key)):
        if sum(len(x) for x in parts) >= seconds * RATE:
            break
        parts += [u.audio, np.zeros(int(0.3 * RATE), np.float32)]
    return np.concatenate(parts)


def outsider(cond: Condition) -> str:
    """A speaker who is not in ``cond``'s conversation (seeded), for a reference that must match nobody."""
    rng = random.Random(cond.seed)
    who = rng.sample(sorted(utterances()), cond.speakers)  # the same draw as conversation()
    return random.Random(cond.seed + 1).choice([s for s in sorted(utterances()) if s not in who])


def _pick(rng: random.Random, utts: list[Utterance], uses: dict[str, int]) -> Utterance:
    """One of ``utts``, an unused one while there are any; a reused one comes back 4-10 % faster or
    slower at the same pitch (as one person's pace varies), never as an identical copy. (Resampling,
    which shifts the pitch and the formants with the tempo, made a reused utterance sound like
    another person to the embedding model: the speaker count went up, not because of the voices.)"""
    fewest = min(uses.get(u.key, 0) for u in utts)
    utt = rng.choice([u for u in utts if uses.get(u.key, 0) == fewest])
    n = uses.get(utt.key, 0)
    uses[utt.key] = n + 1
    if n == 0:
        return utt
    factor = 1 + rng.choice((-1, 1)) * rng.uniform(0.04, 0.10)
    return Utterance(utt.speaker, _retimed(utt.audio, factor), f"{utt.key}@tempo{factor:.4f}")


def conversation(cond: Condition) -> Conversation:
    """A seeded conversation: turns of 1-15 s (one utterance, or two of one speaker with a breath
    between), about one turn in six a back-channel
    of < 1 s, about one in four starting 0.2-1 s before the previous turn ends (an overlap), otherwise
    a 0.1-0.8 s pause; it runs to about ``cond.seconds`` and everyone speaks at least twice."""
    pool = utterances()
    rng = random.Random(cond.seed)
    who = rng.sample(sorted(pool), cond.speakers)
    if cond.holdout:
        pool = {s: [u for u in pool[s] if u.key != held_out(s).key] for s in who}
    short = {s: [u for u in pool[s] if u.seconds < 1.0] for s in who}
    longer = {s: [u for u in pool[s] if 1.0 <= u.seconds <= 15.0] or pool[s] for s in who}
    placed: list[tuple[float, Utterance]] = []
    uses: dict[str, int] = {}
    t, prev, turns_of = 0.3, "", {s: 0 for s in who}
    while t < cond.seconds or any(n < 2 for n in turns_of.values()):
        # never the same speaker twice in a row; the least heard one more often than not
        choices = [s for s in who if s != prev] or who
        speaker = (min(choices, key=lambda s: (turns_of[s], rng.random())) if rng.random() < 0.6
                   else rng.choice(choices))
        backchannel = bool(placed) and bool(short[speaker]) and rng.random() < 1 / 6
        utt = _pick(rng, short[speaker] if backchannel else longer[speaker], uses)
        if placed:
            last_start, last = placed[-1]
            last_end = last_start + last.seconds
            if rng.random() < 0.25 and last.seconds > 1.5:
                t = last_end - rng.uniform(0.2, min(1.0, last.seconds / 2))
            else:
                t = last_end + rng.uniform(0.1, 0.8)
        placed.append((t, utt))
        if not backchannel and rng.random() < 0.3:  # a longer turn: two utterances, a breath between
            more = _pick(rng, longer[speaker], uses)
            t += utt.seconds + rng.uniform(0.15, 0.4)
            placed.append((t, utt := more))
        turns_of[speaker] += 1
        prev = speaker
    end = max(s + u.seconds for s, u in placed) + 0.5
    audio = np.zeros(int(end * RATE) + 1, np.float32)
    turns, at = [], []
    for start, utt in placed:
        i = int(round(start * RATE))
        audio[i:i + len(utt.audio)] += utt.audio
        turns.append((round(i / RATE, 3), round((i + len(utt.audio)) / RATE, 3), utt.speaker))
        at.append((round(i / RATE, 3), utt))
    conv = Conversation(cond.name, audio, sorted(turns), at)
    if cond.telephone:
        conv.audio = telephone(audio, rng)
    peak = float(np.max(np.abs(conv.audio)))
    if peak > 0.95:
        conv.audio = conv.audio * (0.95 / peak)
    return conv


SET = [Condition(f"{n} speakers #{seed}", n, seed=100 * n + seed, seconds=20.0 + 10 * n)
       for n in (2, 3, 4) for seed in (1, 2, 3)]
SET += [Condition(f"{n} speakers #1, telephone+noise", n, seed=100 * n + 1, seconds=20.0 + 10 * n, telephone=True)
        for n in (2, 3, 4)]
# Known speakers: each speaker's reference utterance held out of the conversation (clean references
# for the telephone variants too: a participant's clip is recorded apart from the meeting).
KNOWN_SET = [Condition(f"{n} speakers #{seed}, references held out", n, seed=100 * n + seed, seconds=20.0 + 10 * n,
                       holdout=True) for n in (2, 3, 4) for seed in (1, 2)]
KNOWN_SET += [Condition(f"{n} speakers #1, references held out, telephone+noise", n, seed=100 * n + 1,
                        seconds=20.0 + 10 * n, holdout=True, telephone=True) for n in (2, 3)]


def telephone(audio: np.ndarray, rng: random.Random, snr_db: float = 15.0) -> np.ndarray:
    """300-3400 Hz, G.711 mu-law at 8 kHz, then pink-ish noise at ``snr_db`` below the speech."""
    raw = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-f", "s16le", "-ar", str(RATE), "-ac", "1", "-i", "-",
           "-af", "highpass=f=300,lowpass=f=3400,aresample=8000", "-c:a", "pcm_mulaw", "-f", "mulaw", "-"]
    mulaw = subprocess.run(cmd, input=raw, check=True, capture_output=True).stdout
    back = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "mulaw", "-ar", "8000", "-ac", "1", "-i", "-",
                           "-ar", str(RATE), "-f", "s16le", "-"], input=mulaw, check=True, capture_output=True).stdout
    out = np.frombuffer(back, "<i2").astype(np.float32)[:len(audio)] / 32768
    speech = out[np.abs(out) > 0.01]
    level = float(np.sqrt(np.mean(speech ** 2))) if len(speech) else 0.05
    noise = np.random.default_rng(rng.randrange(1 << 30)).standard_normal(len(out)).astype(np.float32)
    noise = np.convolve(noise, np.ones(4, np.float32) / 4, mode="same")  # tilt toward low frequencies
    noise *= level / float(np.sqrt(np.mean(noise ** 2))) * 10 ** (-snr_db / 20)
    return (np.pad(out, (0, len(audio) - len(out))) + noise).astype(np.float32)


def write_wav(path: pathlib.Path | str, audio: np.ndarray) -> pathlib.Path:
    """16 kHz mono 16-bit WAV of ``audio`` (float32 in -1..1), for uploading."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(pcm)
    return pathlib.Path(path)


# ---------------------------------------------------------------- reference words


WordsOf = Callable[[np.ndarray], list[tuple[float, float, str]]]


def words_for(conv: Conversation, words_of: WordsOf, cache: pathlib.Path | None = None) -> list[RefWord]:
    """The reference words of ``conv``: ``words_of`` (a recogniser with word timings) on each placed
    utterance alone, shifted to where it was placed. Cached per utterance in ``cache`` (JSON)."""
    known: dict[str, Any] = {}
    if cache is not None and cache.exists():
        known = json.loads(cache.read_text())
    words, new = [], False
    for start, utt in conv.placed:
        key = hashlib.sha1(utt.key.encode()).hexdigest()[:16]
        if key not in known:
            known[key], new = words_of(utt.audio), True
        words += [RefWord(round(start + a, 3), round(start + b, 3), w, utt.speaker) for a, b, w in known[key]]
    if cache is not None and new:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known))
    conv.words = sorted(words, key=lambda w: w.start)
    return conv.words


def whisper_words(model: Any) -> WordsOf:
    """A ``WordsOf`` from a loaded faster-whisper model (English, word timestamps)."""
    def words_of(audio: np.ndarray) -> list[tuple[float, float, str]]:
        segments, _info = model.transcribe(audio, language="en", word_timestamps=True, beam_size=1,
                                           vad_filter=False, condition_on_previous_text=False)
        return [(round(w.start, 3), round(w.end, 3), w.word.strip()) for s in segments for w in s.words or []]
    return words_of


# ---------------------------------------------------------------- scores


def annotation(turns: Iterable[tuple[float, float, str]]) -> Any:
    """(start, end, speaker) turns as a pyannote Annotation (each turn its own track)."""
    from pyannote.core import Annotation, Segment

    ann = Annotation()
    for i, (a, b, s) in enumerate(turns):
        ann[Segment(a, b), i] = s
    return ann


def transcript(model: Any, audio: np.ndarray) -> Any:
    """tiny.en's transcript of the whole mix with word timings, as the speaker stage gets it."""
    from mp4totext.contracts import Segment, TranscriptResult, Word

    segments, _info = model.transcribe(audio, language="en", word_timestamps=True, vad_filter=True, beam_size=5)
    segs = [Segment(id=i, start=s.start, end=s.end, text=s.text.strip(),
                    words=[Word(word=w.word, start=w.start, end=w.end) for w in s.words or []])
            for i, s in enumerate(segments)]
    return TranscriptResult(language="en", duration=len(audio) / RATE, segments=segs,
                            text=" ".join(s.text for s in segs))


def words_on_right_speaker(conv: Conversation, hyp: Iterable[tuple[float, float, str | None]],
                           mapping: dict[str, str]) -> float:
    """Share of recognised words (start, end, hypothesis speaker) whose speaker, mapped to the
    truth's names by ``mapping`` (the DER's optimal one), is the speaker of the reference word
    they overlap most (in an overlap of two turns, either one's words count for it). Words that
    overlap no reference word (the recogniser's inventions) are not scored."""
    ref = conv.words
    right = total = 0
    for start, end, speaker in hyp:
        best, best_ov = None, 0.0
        for w in ref:
            if w.start > end:
                break
            ov = min(end, w.end) - max(start, w.start)
            if ov > best_ov:
                best, best_ov = w, ov
        if best is None:
            continue
        total += 1
        truth = {s for a, b, s in conv.turns if a <= (start + end) / 2 <= b} | {best.speaker}
        right += mapping.get(speaker or "", "") in truth
    return right / total if total else 0.0
