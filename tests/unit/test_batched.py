"""Batched decoding (issue 14): BatchedInferencePipeline for long stretches, sequential for short
ones, with the real models on real (espeak-ng) speech: the mode chosen, word timestamps, the
word error rate against the sequential decoder, progress, and stopping between batches."""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from core.models import ModelSet
from mp4totext import config, samples
from mp4totext.contracts import Segment, Word
from workers.stages.batched import SEQUENTIAL, Batching, split
from workers.stages.media import SAMPLE_RATE, extract_audio, load_wav
from workers.stages.transcribe import TranscribeOptions, transcribe_routed

LECTURE_S = 75


@pytest.fixture(scope="module")
def lecture(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, str]:
    tmp = tmp_path_factory.mktemp("batched")
    text = samples.lecture_text(LECTURE_S)
    samples.make_media(text, str(tmp / "lecture.m4a"), video=False)
    extract_audio(str(tmp / "lecture.m4a"), str(tmp / "lecture.wav"), "ffmpeg")
    return load_wav(str(tmp / "lecture.wav")), text


@pytest.fixture(scope="module")
def models() -> tuple[ModelSet, Any]:
    from workers.actors import load_spec

    s = config.Settings()
    return ModelSet.of(s.model_sources), functools.partial(load_spec, s)


def run(models: tuple[ModelSet, Any], audio: np.ndarray, batching: Batching, on_progress: Any = None,
        **options: Any) -> tuple[Any, list[dict[str, Any]]]:
    model_set, load = models
    with capture_logs() as logs:
        result = transcribe_routed(model_set, load, audio, TranscribeOptions(**options), on_progress, 0.5, batching)
    return result, [e for e in logs if e["event"] == "whisper_decoding"]


def test_long_media_is_batched_and_short_media_sequential(models: Any, lecture: tuple[np.ndarray, str]) -> None:
    audio, _text = lecture
    batching = Batching(min_s=40, size=4)
    _result, lines = run(models, audio[:12 * SAMPLE_RATE], batching, language="en")
    assert [(e["mode"], e["batch_size"]) for e in lines] == [("sequential", 1)]
    progress: list[float] = []
    result, lines = run(models, audio, batching, progress.append)  # language detected (base), as without batching
    # 75 s = 3 chunks: one chunk per batch (at least MIN_BATCHES batches where the stretch allows)
    assert [(e["mode"], e["batch_size"]) for e in lines] == [("batched", 1)]
    assert result.language == "en" and result.language_probability > 0.8 and result.model == "tiny.en"
    assert result.speech_duration > 0.8 * LECTURE_S * 0.9
    # progress after every batched chunk, increasing, up to the end of the speech
    assert len(progress) >= 3 and progress == sorted(progress) and progress[-1] > len(audio) / SAMPLE_RATE - 5


def test_batched_words_are_timed_monotonic_and_segments_sentence_sized(models: Any,
                                                                       lecture: tuple[np.ndarray, str]) -> None:
    audio, _text = lecture
    result, _ = run(models, audio, Batching(min_s=0, size=4), language="en")
    words = [w for seg in result.segments for w in seg.words]
    assert len(words) > 100
    assert all(w.start <= w.end for w in words)
    assert all(a.start <= b.start for a, b in zip(words, words[1:])), "word start times go back"
    assert all(0 <= w.start and w.end <= len(audio) / SAMPLE_RATE + 0.5 for w in words)
    segs = result.segments
    assert [s.id for s in segs] == list(range(len(segs)))
    assert all(a.end <= b.start + 0.01 for a, b in zip(segs, segs[1:]))
    # chunks of up to 30 s come back split at sentence ends: ~1 sentence (a few seconds) each
    assert len(segs) > 2 * (LECTURE_S // 30)
    assert max(s.end - s.start for s in segs) < 20
    assert all(s.text == "".join(w.word for w in s.words).strip() for s in segs)


def test_batched_word_error_rate_is_that_of_sequential(models: Any, lecture: tuple[np.ndarray, str]) -> None:
    audio, text = lecture
    sequential, lines = run(models, audio, SEQUENTIAL, language="en")
    assert [e["mode"] for e in lines] == ["sequential"]
    batched, lines = run(models, audio, Batching(min_s=0, size=8), language="en")
    assert [e["mode"] for e in lines] == ["batched"]
    seq_wer = samples.word_error_rate(text, sequential.text)
    bat_wer = samples.word_error_rate(text, batched.text)
    print(f"\nWER sequential {seq_wer:.3f}, batched {bat_wer:.3f}")
    assert bat_wer <= seq_wer + 0.03 and bat_wer < 0.12


def test_batched_decoding_stops_between_batches(models: Any, lecture: tuple[np.ndarray, str]) -> None:
    """What the stage's progress hook does on a cancel: raise; nothing after the batch runs."""
    audio, _text = lecture

    class Stop(Exception):
        pass

    seen: list[float] = []

    def stop(done_s: float) -> None:
        seen.append(done_s)
        raise Stop

    with pytest.raises(Stop):
        run(models, audio, Batching(min_s=0, size=2), stop, language="en")
    assert len(seen) == 1 and seen[0] < len(audio) / SAMPLE_RATE / 2


def test_split_keeps_a_short_chunk_and_cuts_a_long_one_at_sentence_ends_and_pauses() -> None:
    def w(word: str, start: float, end: float) -> Word:
        return Word(word=word, start=start, end=end, probability=0.9)

    words = [w(" Hello", 10.0, 10.4), w(" there.", 10.5, 11.0), w(" This", 11.2, 11.5), w(" is", 11.6, 11.8),
             w(" long.", 11.9, 12.6), w(" After", 14.0, 14.3), w(" a", 14.4, 14.5), w(" pause", 14.6, 15.0)]
    seg = Segment(id=0, start=9.8, end=15.2, text="Hello there. This is long. After a pause", words=words,
                  language="en", avg_logprob=-0.2)
    parts = split(seg)
    # "there." ends a sentence only 1.2 s in (under SPLIT_MIN_S); "long." does; the 1.4 s gap would too
    assert [p.text for p in parts] == ["Hello there. This is long.", "After a pause"]
    assert (parts[0].start, parts[0].end, parts[1].start, parts[1].end) == (9.8, 12.6, 14.0, 15.2)
    assert all(p.language == "en" and p.avg_logprob == -0.2 for p in parts)
    assert split(seg.model_copy(update={"words": words[:2]})) == [seg.model_copy(update={"words": words[:2]})]
    assert split(seg.model_copy(update={"words": []})) == [seg.model_copy(update={"words": []})]


def test_settings_reach_the_stage() -> None:
    s = config.from_env({"MP4T_WHISPER_BATCH_MIN_S": "90", "MP4T_WHISPER_BATCH_SIZE": "6",
                         "MP4T_WHISPER_NUM_WORKERS": "2"})
    assert (s.whisper_batch_min_s, s.whisper_batch_size, s.whisper_num_workers) == (90.0, 6, 2)
    opts = TranscribeOptions()
    b = Batching(s.whisper_batch_min_s, s.whisper_batch_size)
    assert b.applies(90 * SAMPLE_RATE, opts) and not b.applies(89 * SAMPLE_RATE, opts)
    assert not b.applies(600 * SAMPLE_RATE, TranscribeOptions(vad_filter=False))  # batching needs VAD chunks
    assert not Batching(0, 1).applies(600 * SAMPLE_RATE, opts)
    # batches shrink so that a stretch reports progress at least MIN_BATCHES times
    assert [b.size_for(m * 60 * SAMPLE_RATE) for m in (1, 5, 8, 16, 60)] == [1, 2, 2, 4, 6]
    assert Batching(0, 4).size_for(3600 * SAMPLE_RATE) == 4


def test_a_cut_falls_in_the_middle_of_a_pause() -> None:
    """Issue 22: a cut at the first silent frame left the next run a second of leading silence."""
    from workers.stages.batched import quietest

    sr = 16000
    t = np.arange(sr * 2) / sr
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    pause = np.random.default_rng(0).normal(0, 1e-4, sr).astype(np.float32)  # 1 s of near-silence
    audio = np.concatenate([tone, pause, tone])
    cut = quietest(audio, int(2.1 * sr))  # detection put the boundary near the pause's start
    assert abs(cut / sr - 2.5) <= 0.1, cut / sr
    assert quietest(audio[:sr], sr // 2) == sr // 2  # too short to search: unchanged
