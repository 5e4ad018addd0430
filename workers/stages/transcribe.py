"""Speech recognition with faster-whisper: model loading and the transcribe stage."""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel

from mp4totext.contracts import JobConfig, Segment, TranscriptResult, Word
from workers.stages.media import SAMPLE_RATE


@dataclasses.dataclass(frozen=True)
class TranscribeOptions:
    language: str | None = None  # ISO 639-1, None = detect
    beam_size: int = 5
    vad_filter: bool = True
    word_timestamps: bool = True
    task: str = "transcribe"  # or "translate" (to English; multilingual models only)
    initial_prompt: str | None = None
    hotwords: tuple[str, ...] = ()

    @classmethod
    def of(cls, config: JobConfig, default_beam: int) -> "TranscribeOptions":
        """The recognizer options of a job's validated config."""
        return cls(language=config.language or None, beam_size=int(config.beam_size or default_beam),
                   vad_filter=config.vad, word_timestamps=config.word_timestamps, task=config.task or "transcribe",
                   initial_prompt=config.initial_prompt or None, hotwords=tuple(config.hotwords))

    def span_attributes(self) -> dict[str, Any]:
        """The options as trace attributes (what the recognizer was actually called with)."""
        return {"mp4t.beam_size": self.beam_size, "mp4t.vad": self.vad_filter, "mp4t.language": self.language or "auto",
                "mp4t.word_timestamps": self.word_timestamps, "mp4t.task": self.task,
                "mp4t.initial_prompt_chars": len(self.initial_prompt or ""), "mp4t.hotwords": len(self.hotwords)}


class ModelUnavailable(RuntimeError):
    """The configured model cannot be loaded (an operator problem)."""


@functools.lru_cache(maxsize=2)
def load_model(model: str, device: str = "auto", compute_type: str = "default", cpu_threads: int = 0,
               download_root: str = "", local_files_only: bool = True) -> Any:
    """Load a WhisperModel once per process (cached by its settings)."""
    on_cpu = device == "cpu" or (device == "auto" and ctranslate2.get_cuda_device_count() == 0)
    if compute_type == "default" and on_cpu and "float16" not in ctranslate2.get_supported_compute_types("cpu"):
        # What CTranslate2 does anyway with float16 weights on a CPU, without its warning on stderr.
        compute_type = "float32"
    try:
        return WhisperModel(model, device=device, compute_type=compute_type, cpu_threads=cpu_threads,
                            download_root=download_root or None, local_files_only=local_files_only)
    except Exception as exc:
        raise ModelUnavailable(
            f"cannot load whisper model {model!r} ({exc}); set MP4T_WHISPER_MODEL to a CTranslate2 "
            "model directory, or to a model name with MP4T_WHISPER_LOCAL_FILES_ONLY=false where "
            "downloads are allowed"
        ) from exc


ProgressCallback = Callable[[float], None]


def transcribe(model: Any, audio: np.ndarray, options: TranscribeOptions,
               on_progress: ProgressCallback | None = None, model_name: str = "") -> TranscriptResult:
    """Run recognition on 16 kHz mono float32 audio; return the result.

    ``on_progress(processed_seconds)`` is called after every segment; it may raise to stop
    (cancellation, time limit): segments are generated lazily, so stopping is immediate.
    """
    duration = len(audio) / SAMPLE_RATE
    started = time.monotonic()
    segments_iter, info = model.transcribe(
        audio,
        language=options.language,
        beam_size=options.beam_size,
        vad_filter=options.vad_filter,
        word_timestamps=options.word_timestamps,
        condition_on_previous_text=False,
        task=options.task,
        initial_prompt=options.initial_prompt or None,
        hotwords=", ".join(options.hotwords) or None,
    )
    segments: list[Segment] = []
    for seg in segments_iter:
        words = [Word(word=w.word, start=round(w.start, 3), end=round(w.end, 3), probability=round(w.probability, 4))
                 for w in (seg.words or [])]
        segments.append(Segment(id=len(segments), start=round(seg.start, 3), end=round(seg.end, 3),
                                text=seg.text.strip(), avg_logprob=round(seg.avg_logprob, 4),
                                no_speech_prob=round(seg.no_speech_prob, 4), words=words))
        if on_progress:
            on_progress(min(seg.end, duration))
    return TranscriptResult(
        text=" ".join(s.text for s in segments if s.text).strip(),
        language=info.language,
        language_probability=round(float(info.language_probability), 4),
        duration=round(duration, 3),
        speech_duration=round(float(getattr(info, "duration_after_vad", duration) or 0.0), 3),
        segments=segments,
        model=model_name,
        task=options.task,
        recognition_s=round(time.monotonic() - started, 3),
    )
