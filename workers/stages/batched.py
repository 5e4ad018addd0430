"""Long stretches of speech decoded with faster-whisper's BatchedInferencePipeline.

Silero VAD cuts the speech into chunks of up to 30 s, and ``Batching.size`` chunks go through
the encoder and the beam search at once. On a 2-core CPU this takes about 0.7 of the time of
the sequential decoder at the same word error rate (README "Benchmarks"); its chunks come back
as one segment each, which are split again at sentence ends on the word timestamps.
(workers.stages.transcribe chooses between this and the sequential decoder.)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
from faster_whisper import BatchedInferencePipeline

from mp4totext.contracts import Segment, Word
from workers.stages.media import SAMPLE_RATE

WINDOW = 30 * SAMPLE_RATE  # Whisper's own window
BOUNDARY_SEARCH = int(1.5 * SAMPLE_RATE)  # a cut moves to the quietest point this close
FRAME = SAMPLE_RATE // 10
QUIET_DB = 3.0  # frames this close to the quietest count as equally quiet


BATCH_PIECE = 20 * 60 * SAMPLE_RATE  # batched decoding holds the features of this much audio at most (~40 MB)
MIN_BATCHES = 8  # batches get smaller (down to 1 chunk) so that a stretch reports progress at least this often
SENTENCE_END = (".", "?", "!", "。", "？", "！")
SPLIT_GAP_S = 1.0  # a pause this long between two words also ends a segment of a batched chunk
SPLIT_MIN_S = 2.0  # ... but segments shorter than this are not split at sentence ends


@dataclasses.dataclass(frozen=True)
class Batching:
    """When to decode with BatchedInferencePipeline: stretches of at least ``min_s`` seconds, with
    VAD on, ``size`` chunks of up to 30 s at once (``size`` < 2: never)."""

    min_s: float = 0.0
    size: int = 0

    def applies(self, samples: int, options: Any) -> bool:
        return self.size >= 2 and options.vad_filter and samples >= self.min_s * SAMPLE_RATE

    def size_for(self, samples: int) -> int:
        """Chunks per batch for a stretch: ``size`` at most, fewer where that leaves under
        MIN_BATCHES batches (progress and a cancel land between batches; on a CPU most of the
        gain is the batched decoder itself, not the batch size: README "Benchmarks")."""
        chunks = -(-samples // WINDOW)
        return max(1, min(self.size, -(-chunks // MIN_BATCHES)))


SEQUENTIAL = Batching()



def quietest(audio: np.ndarray, at: int) -> int:
    """The middle of the quietest stretch of 100 ms frames near sample ``at`` (a cut never cuts a word).

    Frames within QUIET_DB of the quietest one count as quiet; the cut falls in the middle of the
    longest run of them, so a pause between two languages is shared: cut at its first frame, the
    next run started on a second of silence, which Whisper base decoded worse (issue 22: the
    Turkish half of a lecture, CER 0.36 cut at the pause's start, 0.33 cut in its middle).
    """
    lo, hi = max(0, at - BOUNDARY_SEARCH), min(len(audio), at + BOUNDARY_SEARCH)
    frames = (hi - lo) // FRAME
    if frames < 2:
        return at
    energy = np.square(audio[lo:lo + frames * FRAME].reshape(frames, FRAME)).mean(axis=1)
    quiet = energy <= energy.min() * 10 ** (QUIET_DB / 10) + 1e-10
    best, best_len, i = 0, 0, 0
    while i < frames:
        j = i
        while j < frames and quiet[j]:
            j += 1
        if j - i > best_len:
            best, best_len = i, j - i
        i = j + 1
    return lo + (best * FRAME + best_len * FRAME // 2 if best_len else FRAME // 2)



def to_segment(seg: Any, offset_s: float, seg_id: int, language: str) -> Segment:
    words = [Word(word=w.word, start=round(offset_s + w.start, 3), end=round(offset_s + w.end, 3),
                  probability=round(w.probability, 4)) for w in (seg.words or [])]
    return Segment(id=seg_id, start=round(offset_s + seg.start, 3), end=round(offset_s + seg.end, 3),
                   text=seg.text.strip(), avg_logprob=round(seg.avg_logprob, 4),
                   no_speech_prob=round(seg.no_speech_prob, 4), words=words, language=language)



def recognise(model: Any, audio: np.ndarray, options: Any, language: str | None,
                       offset_s: float, first_id: int, on_progress: Callable[[float], None] | None, total_s: float,
                       batch_size: int) -> tuple[list[Segment], Any]:
    """BatchedInferencePipeline over ``audio``, in pieces of at most BATCH_PIECE cut at quiet points.

    Segments come one batch at a time, so ``on_progress`` (and the stage's watchdog) can stop it
    between batches. A pipeline object per call: it keeps per-transcription state.
    """
    segments: list[Segment] = []
    infos: list[Any] = []
    cuts = [0]
    while len(audio) - cuts[-1] > BATCH_PIECE:
        cuts.append(quietest(audio, cuts[-1] + BATCH_PIECE))
    cuts.append(len(audio))
    for start, end in zip(cuts, cuts[1:]):
        piece_offset = offset_s + start / SAMPLE_RATE
        segments_iter, info = BatchedInferencePipeline(model).transcribe(
            audio[start:end],
            language=language or (infos[0].language if infos else None),
            beam_size=options.beam_size,
            vad_filter=True,
            word_timestamps=options.word_timestamps,
            condition_on_previous_text=False,
            task=options.task,
            initial_prompt=options.initial_prompt or None,
            hotwords=", ".join(options.hotwords) or None,
            batch_size=batch_size,
            # Timestamp tokens inside a chunk cost words here (WER 0.14 against 0.05 without, on
            # a 2-minute lecture): chunks are split at sentence ends on the word timestamps instead.
            without_timestamps=True,
        )
        infos.append(info)
        lang = language or info.language
        for seg in segments_iter:
            for part in split(to_segment(seg, piece_offset, 0, lang)):
                segments.append(part.model_copy(update={"id": first_id + len(segments)}))
            if on_progress:
                on_progress(min(piece_offset + seg.end, total_s))
    info = infos[0]
    if len(infos) > 1:
        info = dataclasses.replace(info, duration=len(audio) / SAMPLE_RATE,
                                   duration_after_vad=sum(i.duration_after_vad for i in infos))
    return segments, info


def split(segment: Segment) -> list[Segment]:
    """One batched chunk (up to 30 s of speech) as sentence-sized segments, on its word timestamps.

    A segment ends after a word that ends a sentence (once it is SPLIT_MIN_S long) or before a
    pause of SPLIT_GAP_S; without word timestamps the chunk stays one segment.
    """
    words = segment.words
    if len(words) < 2:
        return [segment]
    groups: list[list[Word]] = [[]]
    for i, w in enumerate(words):
        groups[-1].append(w)
        nxt = words[i + 1] if i + 1 < len(words) else None
        if nxt is None:
            break
        long_enough = w.end - groups[-1][0].start >= SPLIT_MIN_S
        if (long_enough and w.word.strip().endswith(SENTENCE_END)) or nxt.start - w.end >= SPLIT_GAP_S:
            groups.append([])
    if len(groups) == 1:
        return [segment]
    return [segment.model_copy(update={"start": g[0].start if i else segment.start,
                                       "end": g[-1].end if i < len(groups) - 1 else max(segment.end, g[-1].end),
                                       "text": "".join(w.word for w in g).strip(), "words": g})
            for i, g in enumerate(groups)]
