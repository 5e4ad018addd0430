"""Known speakers: recognised speakers take the names of reference voices.

A meeting app knows who takes part; each participant can give a few seconds of their voice
(``DiarizationConfig.known_speakers``). After speaker recognition, every speaker's voice
(the centroid of its embeddings, which the pipeline computes anyway) is compared with every
reference clip's embedding by cosine similarity; one optimal one-to-one assignment
(Hungarian, scipy) over the pairs at or above the threshold names speakers, so two speakers
never get one name and one speaker never gets two. Speakers left over keep generic labels.

``match`` is pure (vectors in, names out) and is what the unit tests check; ``voice_of``
needs the pipeline's embedding model (the optional ``diarize`` extra).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from workers.stages.media import SAMPLE_RATE

FRAME_S = 0.01  # the energy mask's frame (the embedding models pool masks at any frame rate)
SPEECH_WITHIN_DB = 35.0  # frames this close to the clip's loudest count as voice; the rest is pooled out


@dataclasses.dataclass(frozen=True)
class Match:
    name: str
    similarity: float


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).ravel()
    n = float(np.linalg.norm(v))
    return v / n if n > 0 and np.isfinite(n) else v * np.nan


def similarities(voices: dict[str, np.ndarray], references: dict[str, np.ndarray]) -> np.ndarray:
    """Cosine similarity, speakers x references (NaN where a vector is unusable)."""
    a = np.stack([_unit(v) for v in voices.values()]) if voices else np.zeros((0, 1))
    b = np.stack([_unit(v) for v in references.values()]) if references else np.zeros((0, 1))
    return a @ b.T if len(a) and len(b) else np.zeros((len(a), len(b)))


def match(voices: dict[str, np.ndarray], references: dict[str, np.ndarray], threshold: float) -> dict[str, Match]:
    """Speaker label -> the reference it is, for the one-to-one assignment of greatest total
    similarity among pairs at or above ``threshold``."""
    from scipy.optimize import linear_sum_assignment  # with pyannote.audio (the diarize extra)

    if not voices or not references:
        return {}
    labels, names = list(voices), list(references)
    sim = similarities(voices, references)
    usable = np.nan_to_num(sim, nan=-1.0) >= threshold
    if not usable.any():
        return {}
    # Pairs below the threshold cost more than any usable pair gains, so they are only ever
    # chosen where nothing usable is left, and then dropped.
    cost = np.where(usable, -sim, len(labels) + len(names) + 1.0)
    rows, cols = linear_sum_assignment(cost)
    return {labels[r]: Match(names[c], round(float(sim[r, c]), 4)) for r, c in zip(rows, cols) if usable[r, c]}


def speech_mask(audio: np.ndarray) -> np.ndarray:
    """Per 10 ms frame, 1.0 where the clip has voice (within SPEECH_WITHIN_DB of its loudest
    frame), else 0.0: silence and breaths between sentences do not dilute the voice."""
    hop = int(SAMPLE_RATE * FRAME_S)
    n = max(1, len(audio) // hop)
    frames = np.asarray(audio[: n * hop], dtype=np.float64).reshape(n, -1)
    db = 10 * np.log10(np.mean(frames ** 2, axis=1) + 1e-12)
    return (db >= db.max() - SPEECH_WITHIN_DB).astype(np.float32)


def voice_of(pipeline: Any, audio: np.ndarray) -> np.ndarray | None:
    """One embedding of a reference clip's voice with the pipeline's own embedding model (so it
    lives in the same space as the speakers' centroids); None when the clip is too short."""
    import torch

    embedding = getattr(pipeline, "_embedding", None)
    if embedding is None:
        raise TypeError(f"{type(pipeline).__name__} has no speaker-embedding model to compare voices with")
    mask = speech_mask(audio)
    if mask.sum() * FRAME_S < 1.0:
        return None
    waveform = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None, None]
    vec = np.asarray(embedding(waveform, masks=torch.from_numpy(mask)[None]))[0]
    return vec if np.all(np.isfinite(vec)) else None
