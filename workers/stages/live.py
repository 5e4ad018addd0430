"""Live captions: Whisper on a growing audio buffer, with LocalAgreement-2 (pure: no gRPC, no queue).

The policy is whisper_streaming's ("Turning Whisper into a Real-Time Transcription System",
Machacek, Dabre and Bojar, 2023): the audio since the last final segment is decoded again each
time ``min_chunk_s`` of new audio has arrived; a word becomes stable when two consecutive
hypotheses agree on it (the longest common prefix of the two, after what is stable already).
Stable words are shown at once and never change; the rest of the latest hypothesis is shown as
interim text that may still change. Chosen over fixed windows (words cut at window edges,
no revision) and over per-chunk decoding with a VAD only (Whisper needs context: a 1 s chunk is
decoded far worse than the same second inside 10 s) because it keeps Whisper's accuracy at a
latency of about two chunks, on any faster-whisper model.

Endpointing: stable words become a final segment when the speaker pauses (no speech for
``pause_s`` after the last stable word, by energy VAD), at the end of a sentence, or when the
buffer reaches ``max_buffer_s`` (then the buffer is cut after the last stable word, so decoding
time stays bounded). Silence is not decoded at all (no hallucinated "Thank you." in pauses).
The buffer then starts at the end of the final segment, and the final text (only what is cut out
of the buffer: words still in it would be skipped) is Whisper's prompt, as in whisper_streaming.
"""
from __future__ import annotations

import dataclasses
import re
import threading
from typing import Any, Callable

import numpy as np
import structlog

log = structlog.get_logger(__name__)

SAMPLE_RATE = 16000
FRAME_S = 0.03
_WORD = re.compile(r"[^\w']+", re.UNICODE)


@dataclasses.dataclass(frozen=True)
class Word:
    start: float  # seconds from the start of the stream
    end: float
    text: str  # as Whisper wrote it, with its leading space
    probability: float = 0.0

    @property
    def key(self) -> str:
        return _WORD.sub("", self.text.lower())


@dataclasses.dataclass(frozen=True)
class Final:
    """A stable segment: its text never changes again."""

    start: float
    end: float
    text: str
    words: tuple[Word, ...]


@dataclasses.dataclass
class Update:
    """What one step produced: new final segments, and the interim text after them."""

    finals: list[Final] = dataclasses.field(default_factory=list)
    interim: str = ""  # stable-but-not-final words and the latest hypothesis' tail
    decoded: bool = False  # the model ran in this step (False: silence, nothing new)
    audio_end: float = 0.0  # seconds of audio the update has seen


@dataclasses.dataclass(frozen=True)
class Policy:
    min_chunk_s: float = 1.0  # decode again once this much new audio arrived (0.5: WER x2, CPU x1.5)
    first_chunk_s: float = 0.5  # the stream's first words are previewed after this much speech (shown, not agreed)
    max_buffer_s: float = 8.0  # cut the buffer after its stable words beyond this (decode time stays bounded)
    pause_s: float = 0.5  # no speech this long after the last stable word: the segment is final
    silence_rms: float = 0.006  # frames quieter than this (full scale 1.0) are silence
    edge_s: float = 0.3  # words ending this close to the buffer's end are not stable yet (cut mid-word)
    prompt_chars: int = 200  # stable text given to Whisper as context
    beam_size: int = 1  # greedy: latency first (the full job after the stream uses the batch settings)


def factory(s: Any) -> Callable[[str, str, float], "LiveDecoder"]:
    """What the composition root gives the live service: (model name, language, start) -> a
    decoder on that model of the configured set, loaded once per process (warm for the next stream)."""
    from core.models import ModelSet
    from workers.stages.model_files import locate
    from workers.stages.transcribe import load_model

    models = ModelSet.of(s.model_sources)
    paths: dict[str, str] = {}

    def make(name: str, language: str, start_s: float) -> LiveDecoder:
        if name not in paths:  # the files are checked once per process
            paths[name] = locate(models.by_name[name].source, s.resolved_models_dir)
        # one instance per process, decoding up to MP4T_LIVE_MAX_STREAMS streams at once
        model = load_model(paths[name], s.whisper_device, s.live_compute_type, s.live_model_threads,
                           s.whisper_download_root, s.whisper_local_files_only, max(1, s.live_max_streams))
        return LiveDecoder(model, language, start_s=start_s)

    def warm() -> None:  # in the background at start: the first stream does not wait for a model load
        for spec in models.specs:
            try:
                make(spec.name, "en", 0.0)
            except Exception as exc:  # noqa: BLE001 - the first stream on it reports the problem
                log.warning("live_model_not_loaded", model=spec.name, error=f"{type(exc).__name__}: {exc}")
        log.info("live_models_loaded", models=models.label)

    threading.Thread(target=warm, name="live-warm", daemon=True).start()
    return make


def speech_frames(audio: np.ndarray, threshold: float) -> np.ndarray:
    """One flag per FRAME_S frame: speech (louder than ``threshold``) or not."""
    n = int(FRAME_S * SAMPLE_RATE)
    frames = len(audio) // n
    if frames == 0:
        return np.zeros(0, dtype=bool)
    rms = np.sqrt(np.mean(np.square(audio[:frames * n].reshape(frames, n), dtype=np.float64), axis=1))
    return rms > threshold


class LiveDecoder:
    """Feed PCM as it arrives, call ``step()`` when ``ready()``, ``finish()`` at the end.

    ``model`` is a faster-whisper WhisperModel; ``language`` an ISO 639-1 code (the model the
    caller chose for it by the batch routing rules, core.models).
    """

    def __init__(self, model: Any, language: str, policy: Policy = Policy(), start_s: float = 0.0) -> None:
        self.model, self.language, self.p = model, language, policy
        self.buffer = np.zeros(0, dtype=np.float32)
        self.offset = start_s  # stream time of buffer[0] (a resumed stream starts after its last final)
        self.received = start_s  # stream time fed so far
        self.decoded_at = start_s  # stream time up to which the last decode saw audio
        self.stable: list[Word] = []  # agreed, not final yet
        self.tentative: list[Word] = []  # the latest hypothesis after the stable words
        self.context = ""  # final text so far (the prompt)
        self.previewed = False  # the stream's first words were shown early (a preview, not a hypothesis)

    def feed(self, pcm: np.ndarray) -> None:
        self.buffer = np.concatenate([self.buffer, pcm.astype(np.float32, copy=False)])
        self.received += len(pcm) / SAMPLE_RATE

    def ready(self) -> bool:
        new = self.received - self.decoded_at
        return new >= self.p.min_chunk_s or (not self.previewed and new >= self.p.first_chunk_s)

    def step(self) -> Update:
        """Decode the buffer if it holds speech; agree, endpoint, cut."""
        preview = not self.previewed and self.received - self.decoded_at < self.p.min_chunk_s
        speech = speech_frames(self.buffer, self.p.silence_rms)
        update = Update(audio_end=self.received)
        if not preview:
            self.decoded_at = self.received
        if not speech.any():  # nothing said since the last final: drop the silence, keep 0.2 s
            self._drop_silence()
            update.interim = self._interim()
            return update
        hypothesis = self._decode()
        if preview:  # the stream's first words, shown at once; agreement starts with the next decode
            self.previewed = True
            update.decoded, update.interim = True, "".join(w.text for w in hypothesis).strip()
            return update
        update.decoded = True
        agreed = [w for w in _common_prefix(self.tentative, hypothesis) if w.end <= self.received - self.p.edge_s]
        agreed = agreed[:next((i for i, w in enumerate(agreed) if w.end > self.received - self.p.edge_s), len(agreed))]
        self.stable += agreed
        self.tentative = hypothesis[len(agreed):]
        update.finals = self._endpoint(speech)
        update.interim = self._interim()
        return update

    def finish(self) -> Update:
        """The stream ended: what was heard last becomes final."""
        update = Update(audio_end=self.received)
        if speech_frames(self.buffer, self.p.silence_rms).any():
            self.tentative = self._decode()
        self.stable += self.tentative
        self.tentative = []
        update.finals = self._final(len(self.stable))
        return update

    # -- the steps

    def _decode(self) -> list[Word]:
        """The buffer's words after the stable ones, in stream time."""
        segments, _info = self.model.transcribe(
            self.buffer, language=self.language, beam_size=self.p.beam_size, word_timestamps=True,
            condition_on_previous_text=False, vad_filter=False, temperature=0.0,
            # a loop ("the the the ...") would run to 448 tokens: bounded by what the buffer can hold
            max_new_tokens=int(8 * len(self.buffer) / SAMPLE_RATE) + 16,
            # only text cut out of the buffer (whisper_streaming): words still in it would be skipped
            initial_prompt=self.context[-self.p.prompt_chars:] or None)
        words = [Word(self.offset + w.start, self.offset + w.end, w.word, w.probability)
                 for seg in segments for w in (seg.words or [])]
        words = [w for w in words if w.key]  # "..." alone is not a word
        done = self.stable[-1].end if self.stable else self.offset
        fresh = [w for w in words if w.end > done + 0.05]
        return _without_repeat(self.stable, fresh)

    def _quiet_after(self, word: Word, speech: np.ndarray) -> float:
        after = int((word.end - self.offset) / FRAME_S)
        return FRAME_S * (len(speech) - after) if not speech[after:].any() else 0.0

    def _endpoint(self, speech: np.ndarray) -> list[Final]:
        if self.tentative and self._quiet_after(self.tentative[-1], speech) >= self.p.pause_s:
            # the speaker stopped after the whole hypothesis: nothing more will change it (VAD
            # endpointing, whisper_streaming's VAC): all of it is stable now, one decode sooner
            self.stable += self.tentative
            self.tentative = []
        if not self.stable:
            return []
        paused = self._quiet_after(self.stable[-1], speech) >= self.p.pause_s and not self.tentative
        sentence = next((i + 1 for i in range(len(self.stable) - 1, -1, -1)
                         if self.stable[i].text.rstrip().endswith((".", "?", "!"))), 0)
        if paused:
            return self._final(len(self.stable))
        if sentence:
            return self._final(sentence)
        if len(self.buffer) / SAMPLE_RATE >= self.p.max_buffer_s:
            return self._final(len(self.stable))
        return []

    def _final(self, n: int) -> list[Final]:
        """The first ``n`` stable words as a final segment; the buffer starts after them."""
        words, self.stable = self.stable[:n], self.stable[n:]
        if not words:
            return []
        text = "".join(w.text for w in words).strip()
        self.context = (self.context + " " + text)[-self.p.prompt_chars:]
        self._cut(words[-1].end)
        return [Final(words[0].start, words[-1].end, text, tuple(words))] if text else []

    def _cut(self, at: float) -> None:
        drop = int(max(0.0, at - self.offset) * SAMPLE_RATE)
        self.buffer = self.buffer[drop:]
        self.offset += drop / SAMPLE_RATE

    def _drop_silence(self) -> None:
        keep = int(0.2 * SAMPLE_RATE)
        if not self.stable and len(self.buffer) > keep:
            self._cut(self.offset + (len(self.buffer) - keep) / SAMPLE_RATE)

    def _interim(self) -> str:
        return "".join(w.text for w in self.stable + self.tentative).strip()


def _common_prefix(previous: list[Word], current: list[Word]) -> list[Word]:
    """LocalAgreement-2: the words both hypotheses begin with (the current one's timings)."""
    n = 0
    while n < len(previous) and n < len(current) and previous[n].key == current[n].key and current[n].key:
        n += 1
    return current[:n]


def _without_repeat(stable: list[Word], fresh: list[Word], longest: int = 5) -> list[Word]:
    """Drop a start of ``fresh`` that repeats the end of ``stable`` (a word decoded again across the
    cut, as whisper_streaming's n-gram check)."""
    for n in range(min(longest, len(stable), len(fresh)), 0, -1):
        if [w.key for w in stable[-n:]] == [w.key for w in fresh[:n]]:
            return fresh[n:]
    return fresh
