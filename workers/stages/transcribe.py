"""Speech recognition with faster-whisper: model loading, language detection per window, routing
between the deployment's models, and the transcribe stage.

Peers detect the language once, on the first 30 s, and then force it on the whole file: a
lecture that starts with an English greeting comes out as English gibberish, and one that
switches language is recognised in one of them. Here an automatic-language job is cut into
30-second windows; the multilingual model detects each window's language (only among the
expected languages when the request lists them), low-confidence windows keep their
neighbour's language, runs of one language are recognised with that language fixed, each on
the model the routing rules choose (English on the English-only model), and every segment
carries its language.

Long stretches are recognised with faster-whisper's BatchedInferencePipeline
(workers.stages.batched, ``Batching``), short ones with the sequential decoder.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import ctranslate2
import numpy as np
import structlog
from faster_whisper import WhisperModel
from faster_whisper.audio import pad_or_trim
from faster_whisper.vad import VadOptions, get_speech_timestamps

from core.models import ModelSet, ModelSpec
from mp4totext.contracts import JobConfig, LanguageShare, Segment, TranscriptResult
from workers.stages import batched, language_choice
from workers.stages.batched import SEQUENTIAL, Batching  # noqa: F401 - re-exported
from workers.stages.media import SAMPLE_RATE

WINDOW = 30 * SAMPLE_RATE  # Whisper's own window: one encoder pass detects its language
MIN_SPEECH = SAMPLE_RATE  # a window with less speech than this takes its neighbour's language
FRAME = SAMPLE_RATE // 10
REFINE_BELOW = 0.9  # a window detected less surely than this is detected again utterance by utterance
PAUSE = SAMPLE_RATE // 2  # a silence this long separates utterances
SHORT_SPEECH = 3 * SAMPLE_RATE  # an uncertain stretch with less speech than this takes its neighbour's language
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # faster-whisper's own: a failed window is decoded again hotter
log = structlog.get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class TranscribeOptions:
    language: str | None = None  # ISO 639-1, None = detect
    beam_size: int = 5
    vad_filter: bool = True
    word_timestamps: bool = True
    task: str = "transcribe"  # or "translate" (to English; multilingual models only)
    initial_prompt: str | None = None
    hotwords: tuple[str, ...] = ()
    model: str | None = None  # a model of the set; None = route by language
    expected_languages: tuple[str, ...] = ()  # detection chooses among these (all when empty)

    @classmethod
    def of(cls, config: JobConfig, default_beam: int) -> "TranscribeOptions":
        """The recognizer options of a job's validated config."""
        return cls(language=config.language or None, beam_size=int(config.beam_size or default_beam),
                   vad_filter=config.vad, word_timestamps=config.word_timestamps, task=config.task or "transcribe",
                   initial_prompt=config.initial_prompt or None, hotwords=tuple(config.hotwords),
                   model=config.model or None, expected_languages=tuple(config.expected_languages))

    def span_attributes(self) -> dict[str, Any]:
        """The options as trace attributes (what the recognizer was actually called with)."""
        return {"mp4t.beam_size": self.beam_size, "mp4t.vad": self.vad_filter, "mp4t.language": self.language or "auto",
                "mp4t.word_timestamps": self.word_timestamps, "mp4t.task": self.task,
                "mp4t.initial_prompt_chars": len(self.initial_prompt or ""), "mp4t.hotwords": len(self.hotwords),
                "mp4t.model_requested": self.model or "auto",
                "mp4t.expected_languages": ",".join(self.expected_languages)}


class ModelUnavailable(RuntimeError):
    """The configured model cannot be loaded (an operator problem)."""


@functools.lru_cache(maxsize=8)  # every model of a configured set stays loaded
def load_model(model: str, device: str = "auto", compute_type: str = "default", cpu_threads: int = 0,
               download_root: str = "", local_files_only: bool = True, num_workers: int = 1) -> Any:
    """Load a WhisperModel once per process (cached by its settings).

    ``cpu_threads`` is CTranslate2's intra_threads (threads one decoding uses) and
    ``num_workers`` its inter_threads (decodings that run at once on this one model instance,
    for a worker with several threads).
    """
    on_cpu = device == "cpu" or (device == "auto" and ctranslate2.get_cuda_device_count() == 0)
    if compute_type == "default" and on_cpu and "float16" not in ctranslate2.get_supported_compute_types("cpu"):
        # What CTranslate2 does anyway with float16 weights on a CPU, without its warning on stderr.
        compute_type = "float32"
    try:
        return WhisperModel(model, device=device, compute_type=compute_type, cpu_threads=cpu_threads,
                            num_workers=max(1, num_workers), download_root=download_root or None,
                            local_files_only=local_files_only)
    except Exception as exc:
        raise ModelUnavailable(
            f"cannot load whisper model {model!r} ({exc}); set MP4T_WHISPER_MODEL to a CTranslate2 "
            "model directory, or to a model name with MP4T_WHISPER_LOCAL_FILES_ONLY=false where "
            "downloads are allowed"
        ) from exc


ProgressCallback = Callable[[float], None]


@dataclasses.dataclass
class Run:
    """A stretch of audio recognised in one language (samples [start, end))."""

    start: int
    end: int
    language: str | None
    probability: float  # detection probability (duration-weighted over its windows); 1 when given
    detected: bool = True  # False: no stretch of it was detected (silence, or only borrowed stretches)


def _recognise(model: Any, audio: np.ndarray, options: TranscribeOptions, language: str | None,
               offset_s: float, first_id: int, on_progress: ProgressCallback | None,
               total_s: float, batching: Batching = SEQUENTIAL, fallback: bool = True) -> tuple[list[Segment], Any]:
    """Recognise ``audio`` (which starts ``offset_s`` into the file) with ``language`` fixed or detected.

    ``fallback=False``: temperature 0 only, no re-decoding of failed windows at higher temperatures
    (sequential decoding; the batched pipeline decodes as it always does).
    """
    use_batched = batching.applies(len(audio), options)
    batch_size = batching.size_for(len(audio)) if use_batched else 1
    log.info("whisper_decoding", mode="batched" if use_batched else "sequential", batch_size=batch_size,
             seconds=round(len(audio) / SAMPLE_RATE, 3), offset_s=round(offset_s, 3))
    if use_batched:
        return batched.recognise(model, audio, options, language, offset_s, first_id, on_progress, total_s,
                                  batch_size)
    segments_iter, info = model.transcribe(
        audio,
        language=language,
        beam_size=options.beam_size,
        vad_filter=options.vad_filter,
        word_timestamps=options.word_timestamps,
        condition_on_previous_text=False,
        task=options.task,
        temperature=FALLBACK_TEMPERATURES if fallback else (0.0,),
        initial_prompt=options.initial_prompt or None,
        hotwords=", ".join(options.hotwords) or None,
    )
    segments: list[Segment] = []
    for seg in segments_iter:  # lazy: stopping (cancel, time limit) from on_progress is immediate
        segments.append(batched.to_segment(seg, offset_s, first_id + len(segments), language or info.language))
        if on_progress:
            on_progress(min(offset_s + seg.end, total_s))
    return segments, info


def _result(segments: list[Segment], runs: list[Run], audio: np.ndarray, options: TranscribeOptions, model: str,
            speech_s: float, started: float, min_probability: float) -> TranscriptResult:
    shares: dict[str, list[float]] = {}
    for r in runs:
        if r.language and r.detected:  # silence alone says nothing about the language
            seconds = (r.end - r.start) / SAMPLE_RATE
            d, p = shares.setdefault(r.language, [0.0, 0.0])
            shares[r.language] = [d + seconds, p + r.probability * seconds]
    languages = sorted((LanguageShare(language=lang, duration=round(d, 3), probability=round(p / max(d, 1e-9), 4))
                        for lang, (d, p) in shares.items()), key=lambda x: -x.duration)
    # No speech detected anywhere: the language it was recognised in, not reported as uncertain.
    top = languages[0] if languages else LanguageShare(language=runs[0].language or "" if runs else "", probability=0.0)
    return TranscriptResult(
        text=" ".join(s.text for s in segments if s.text).strip(),
        language=top.language, language_probability=top.probability,
        language_uncertain=bool(languages) and top.probability < min_probability, languages=languages,
        duration=round(len(audio) / SAMPLE_RATE, 3), speech_duration=round(speech_s, 3), segments=segments,
        model=model, task=options.task, recognition_s=round(time.monotonic() - started, 3))


def transcribe(model: Any, audio: np.ndarray, options: TranscribeOptions,
               on_progress: ProgressCallback | None = None, model_name: str = "",
               batching: Batching = SEQUENTIAL) -> TranscriptResult:
    """Run recognition with one model on 16 kHz mono float32 audio (language fixed or detected once).

    ``on_progress(processed_seconds)`` is called after every segment; it may raise to stop
    (cancellation, time limit): segments are generated lazily, so stopping is immediate.
    """
    started = time.monotonic()
    duration = len(audio) / SAMPLE_RATE
    segments, info = _recognise(model, audio, options, options.language, 0.0, 0, on_progress, duration, batching)
    run = Run(0, len(audio), info.language, 1.0 if options.language else float(info.language_probability))
    speech = float(getattr(info, "duration_after_vad", duration) or 0.0)
    return _result(segments, [run], audio, options, model_name, speech, started, 0.0)


# ---------------------------------------------------------------- language per window, routing


def _speech_mask(audio: np.ndarray, vad: bool) -> np.ndarray | None:
    """Boolean per sample: inside speech (Silero VAD), or None when VAD is off (all counts)."""
    if not vad:
        return None
    mask = np.zeros(len(audio), dtype=bool)
    # Short pauses count as pauses here (the recognizer's own VAD keeps 2 s): utterance borders.
    for chunk in get_speech_timestamps(audio, VadOptions(min_silence_duration_ms=300, speech_pad_ms=100)):
        mask[chunk["start"]:chunk["end"]] = True
    return mask


def _window_probs(model: Any, audio: np.ndarray) -> dict[str, float]:
    """Language probabilities of one window (at most 30 s of audio) from one encoder pass."""
    features = model.feature_extractor(audio)[..., :model.feature_extractor.nb_max_frames]
    encoded = model.encode(pad_or_trim(features))
    return {token[2:-2]: float(p) for token, p in model.model.detect_language(encoded)[0]}


def constrain(probs: dict[str, float], expected: tuple[str, ...]) -> tuple[str, float]:
    """Most probable language, among ``expected`` when given (renormalised over them)."""
    if expected:
        total = sum(probs.get(lang, 0.0) for lang in expected)
        best = max(expected, key=lambda lang: probs.get(lang, 0.0))
        return best, (probs.get(best, 0.0) / total if total > 0 else 0.0)  # none of them scored: undecided
    best = max(probs, key=probs.__getitem__)
    return best, probs[best]


@dataclasses.dataclass
class Detected(Run):
    raw: float = 0.0  # the language's probability among all languages (a mixed window scores low)
    speech: int = 0  # samples of speech it holds
    probs: dict[str, float] = dataclasses.field(default_factory=dict)  # the likeliest languages, raw


def _detect(model: Any, audio: np.ndarray, start: int, end: int, mask: np.ndarray | None,
            expected: tuple[str, ...]) -> Detected:
    speech = audio[start:end] if mask is None else audio[start:end][mask[start:end]]
    if len(speech) < min(MIN_SPEECH, max(end - start, 1)):
        return Detected(start, end, None, 0.0, raw=0.0, speech=len(speech))
    probs = _window_probs(model, speech[:WINDOW])
    language, p = constrain(probs, expected)
    top = dict(sorted(probs.items(), key=lambda kv: -kv[1])[:language_choice.CANDIDATES])
    top.update({lang: probs.get(lang, 0.0) for lang in (*expected, "en")})
    return Detected(start, end, language, p, raw=probs.get(language, 0.0), speech=len(speech), probs=top)


def _utterances(start: int, end: int, mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) cut in the middle of every pause of at least PAUSE (the pieces cover it all)."""
    cuts, gap_from = [start], None
    for i in range(start, end, FRAME):
        if not mask[i:i + FRAME].any():
            gap_from = i if gap_from is None else gap_from
        elif gap_from is not None:
            if i - gap_from >= PAUSE and gap_from > cuts[-1]:
                cuts.append((gap_from + i) // 2)
            gap_from = None
    return list(zip(cuts, cuts[1:] + [end]))


def _spans(flags: list[bool]) -> list[tuple[int, int, bool]]:
    """Consecutive equal flags as (first index, last index + 1, flag)."""
    out: list[tuple[int, int, bool]] = []
    for i, f in enumerate(flags):
        if out and out[-1][2] == f:
            out[-1] = (out[-1][0], i + 1, f)
        else:
            out.append((i, i + 1, f))
    return out


def detect_windows(model: Any, audio: np.ndarray, expected: tuple[str, ...], vad: bool) -> list[Detected]:
    """Language of every stretch of the audio, finest where it matters.

    First one detection per 30-second window (one encoder pass each). Windows that are not
    clearly one language (the language's probability among all languages below REFINE_BELOW:
    a window holding two languages scores low even when a hint narrows the choice) or that
    differ from a neighbour hold a switch or a hard passage: those stretches are detected
    again utterance by utterance (pieces between pauses, across window borders), so that a
    language switch lands on a pause. Stretches with too little speech get language None.
    """
    mask = _speech_mask(audio, vad)
    windows = [_detect(model, audio, start, min(start + WINDOW, len(audio)), mask, expected)
               for start in range(0, max(len(audio), 1), WINDOW)]
    known = [w.language for w in windows]
    refine = [w.language is not None and (w.raw < REFINE_BELOW or any(
        k not in (None, w.language) for k in known[max(i - 1, 0):i + 2])) for i, w in enumerate(windows)]
    if not any(refine):
        return windows
    speech = mask if mask is not None else _speech_mask(audio, True)
    out: list[Detected] = []
    for first, last, again in _spans(refine):
        start, end = windows[first].start, windows[last - 1].end
        pieces = _utterances(start, end, speech) if again else []
        out += ([_detect(model, audio, a, b, speech, expected) for a, b in pieces] if len(pieces) > 1
                else windows[first:last])
    return out


def language_runs(windows: list[Detected], min_probability: float, fallback: str) -> list[Run]:
    """Merge detected stretches into runs of one language.

    A stretch without speech takes the language of the run before it (or of the first stretch
    with a language; ``fallback`` when none has one), and so does a short one (under
    SHORT_SPEECH of speech) detected below ``min_probability``: a cough or a name must not
    switch the recognizer's language. Longer uncertain stretches keep their own language and
    their low probability, which the result reports.
    """
    def own(w: Detected) -> str | None:
        return w.language if w.language and (w.probability >= min_probability or w.speech >= SHORT_SPEECH) else None

    first = next((own(w) for w in windows if own(w)), next((w.language for w in windows if w.language), fallback))
    runs: list[Run] = []
    weights: list[int] = []  # samples each run's probability is averaged over (its own stretches)
    for w in windows:
        language = own(w) or (runs[-1].language if runs else first)
        weight = (w.end - w.start) if own(w) else 0  # borrowed stretches do not change the run's confidence
        if not runs or runs[-1].language != language:
            runs.append(Run(w.start, w.end, language, 0.0))
            weights.append(0)
        prev = runs[-1]
        if weight:
            prev.probability = (prev.probability * weights[-1] + w.probability * weight) / (weights[-1] + weight)
            weights[-1] += weight
        prev.end = w.end
    for run, weight in zip(runs, weights):
        run.detected = weight > 0
    return runs


def _move_boundaries(runs: list[Run], audio: np.ndarray) -> list[Run]:
    for before, after in zip(runs, runs[1:]):
        cut = batched.quietest(audio, after.start)
        if before.start < cut < after.end:
            before.end = after.start = cut
    return runs


def transcribe_routed(models: ModelSet, load: Callable[[ModelSpec], Any], audio: np.ndarray,
                      options: TranscribeOptions, on_progress: ProgressCallback | None = None,
                      min_probability: float = 0.5, batching: Batching = SEQUENTIAL,
                      load_detector: Callable[[ModelSpec], Any] | None = None) -> TranscriptResult:
    """The stage: find the language(s), recognise each run on the model routing chooses.

    ``load(spec)`` returns the loaded model of a spec (loaded once per process by the caller),
    ``load_detector(spec)`` the one detection runs on (default ``load``); runs of at least
    ``batching.min_s`` are decoded batched.
    """
    started = time.monotonic()
    duration = len(audio) / SAMPLE_RATE
    detector = models.detector(options.model)
    windows: list[Detected] = []
    if options.language:
        runs = [Run(0, len(audio), options.language, 1.0)]
    elif detector is None:  # an English-only model: nothing to detect
        runs = [Run(0, len(audio), "en", 1.0)]
    else:
        windows = detect_windows((load_detector or load)(detector), audio, options.expected_languages,
                                 options.vad_filter)
        fallback = options.expected_languages[0] if options.expected_languages else "en"
        runs = _move_boundaries(language_runs(windows, min_probability, fallback), audio)
    segments: list[Segment] = []
    used: list[str] = []
    speech = 0.0
    progress = _monotonic(on_progress)
    for run in runs:
        decode = functools.partial(_recognise, audio=audio[run.start:run.end], options=options,
                                   offset_s=run.start / SAMPLE_RATE, first_id=len(segments), on_progress=progress,
                                   total_s=duration, batching=batching)
        ev = language_choice.evidence(run, windows, options.expected_languages)
        part, info, name = language_choice.decide(models, load, run, ev, options, decode)
        used.append(name)
        segments += part
        speech += float(getattr(info, "duration_after_vad", 0.0) or 0.0)
    model = "+".join(dict.fromkeys(used))
    return _result(segments, runs, audio, options, model, speech, started, min_probability)


def _monotonic(on_progress: ProgressCallback | None) -> ProgressCallback | None:
    """Progress that never goes back (a stretch decoded again reports its seconds again)."""
    if on_progress is None:
        return None
    done = [0.0]

    def report(seconds: float) -> None:
        done[0] = max(done[0], seconds)
        on_progress(done[0])  # may raise to stop (cancel, time limit) on every segment
    return report
