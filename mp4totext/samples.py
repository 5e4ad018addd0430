"""Generate speech media with known text (espeak-ng + ffmpeg) for the demo, tests and benchmarks."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import wave

import numpy as np

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Today we will talk about the history of computers and how they changed the world.",
    "Please remember to submit your homework before the end of the week.",
    "The weather this morning was cold, but the afternoon was warm and sunny.",
    "Machine learning models need a lot of data to learn useful patterns.",
    "She opened the window and listened to the birds singing in the garden.",
    "Our next meeting will be on Monday at ten in the morning.",
    "Reading books every day is a good way to improve your vocabulary.",
    "The train to the city leaves from platform number four.",
    "Thank you all for coming, and see you next time.",
]

# What `mp4totext embedded --demo` (`bash scripts/run.sh`) speaks: the first transcript a newcomer
# reads, so it is text that tiny.en transcribes word for word from espeak-ng's en-us voice
# (tests/e2e/test_cli_embedded.py asserts a WER of 0). SENTENCES[0]'s "brown fox" came back as
# "roundfuck", and espeak's "of" as "on"; keep both out of this text.
DEMO_TEXT = ("Good morning everyone. Today we will talk about how computers changed the world. "
             "Please remember to submit your homework before Friday.")


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"{tool} is not installed: apt-get install espeak-ng ffmpeg")
    return path


def speech_wav(text: str, path: str, voice: str = "en-us", speed: int = 150) -> None:
    subprocess.run([require("espeak-ng"), "-v", voice, "-s", str(speed), "-w", path, text],
                   check=True, capture_output=True)


def make_media(text: str, path: str, voice: str = "en-us", video: bool = True, speed: int = 150,
               extra_args: list[str] | None = None) -> str:
    """Speak ``text`` into ``path``; the container/codec follow the extension (.mp4 adds a video track)."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "speech.wav")
        speech_wav(text, wav, voice, speed)
        cmd = [require("ffmpeg"), "-nostdin", "-v", "error", "-y"]
        ext = os.path.splitext(path)[1].lower()
        if video and ext in (".mp4", ".mov", ".mkv", ".webm"):
            cmd += ["-f", "lavfi", "-i", "color=c=navy:s=160x120:r=5", "-i", wav, "-shortest"]
            vcodec = ["-c:v", "libvpx", "-b:v", "50k"] if ext == ".webm" else ["-c:v", "libx264", "-preset",
                                                                                 "ultrafast", "-tune", "stillimage"]
            acodec = ["-c:a", "libopus"] if ext == ".webm" else ["-c:a", "aac", "-b:a", "64k"]
            cmd += [*vcodec, *acodec, "-pix_fmt", "yuv420p"]
        else:
            cmd += ["-i", wav]
        cmd += [*(extra_args or []), path]
        subprocess.run(cmd, check=True, capture_output=True)
    return path


# Distinct espeak-ng voices (a male and a female variant; "en-gb+f4" is not one: espeak-ng
# silently falls back to the default en-gb voice for it, a male voice close to en-us+m3).
DIALOGUE = [
    ("en-us+m3", "Good morning everyone. Today we look at how a transcription service stays reliable."),
    ("en-us+f2", "Thank you. Could you start with what happens when a worker crashes in the middle of a job?"),
    ("en-us+m3", "The message is not acknowledged, so the broker delivers it again to another worker."),
    ("en-us+f2", "And how do you make sure the same job is not finished twice?"),
    ("en-us+m3", "Every stage is claimed in the database first, so a duplicate message simply stops."),
    ("en-us+f2", "That makes sense. Thank you for explaining it so clearly."),
]

# Three voices; the third (en-us+m7) is a second male voice, the harder case for clustering.
DIALOGUE_3 = [
    ("en-us+m3", "Welcome back. Three of us are here today to talk about speaker recognition."),
    ("en-us+f2", "I will start with the segmentation model, which finds who speaks in each short window."),
    ("en-us+m7", "And I will explain how the speaker embeddings are compared and grouped together."),
    ("en-us+m3", "Good. What happens when two people have very similar voices?"),
    ("en-us+f2", "Then the distance between their embeddings is small, and the threshold decides."),
    ("en-us+m7", "That is why we measured the threshold on many dialogues before choosing it."),
    ("en-us+m3", "Thank you both. That is all for today."),
]

def _speech_bounds(data: bytes, width: int, rate: int, level: float = 0.01) -> tuple[float, float]:
    """Seconds from the start of a 16-bit espeak-ng clip to its first and last audible sample.

    espeak-ng pads each clip with silence; the true turns should cover the speech only, as a
    human annotation would."""
    samples = np.abs(np.frombuffer(data, dtype=np.int16).astype(np.float32)) / 32768 if width == 2 else None
    if samples is None or not samples.size:
        return 0.0, len(data) / (rate * width)
    loud = np.flatnonzero(samples > level)
    if not loud.size:
        return 0.0, 0.0
    return float(loud[0]) / rate, float(loud[-1] + 1) / rate


def make_dialogue(path: str, turns: list[tuple[str, str]] | None = None, pause_s: float = 0.6,
                  repeat: int = 1, ffmpeg_filter: str = "",
                  speed: int = 150) -> tuple[str, list[tuple[float, float, str]]]:
    """Two (or more) espeak-ng voices taking turns; returns the path and the true turns
    (start, end, voice) in seconds, from each turn's first to its last audible sample.

    ``ffmpeg_filter`` (an ``-af`` filter chain, e.g. an echo) degrades the audio without
    moving it in time."""
    turns = (turns or DIALOGUE) * repeat
    truth: list[tuple[float, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        frames, rate, pos = bytearray(), 0, 0.0
        for i, (voice, text) in enumerate(turns):
            part = os.path.join(tmp, f"{i}.wav")
            speech_wav(text, part, voice, speed)
            with wave.open(part, "rb") as w:
                rate, width = w.getframerate(), w.getsampwidth()
                data = w.readframes(w.getnframes())
            seconds = len(data) / (rate * width)
            first, last = _speech_bounds(data, width, rate)
            truth.append((round(pos + first, 3), round(pos + last, 3), voice))
            silence = bytes(int(rate * pause_s) * width)
            frames += data + silence
            pos += seconds + pause_s
        wav = os.path.join(tmp, "dialogue.wav")
        with wave.open(wav, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(rate)
            out.writeframes(bytes(frames))
        filters = ["-af", ffmpeg_filter] if ffmpeg_filter else []
        subprocess.run([require("ffmpeg"), "-nostdin", "-v", "error", "-y", "-i", wav, *filters, "-c:a", "aac",
                        "-b:a", "64k", path], check=True, capture_output=True)
    return path, truth


def lecture_text(seconds: float) -> str:
    """About ``seconds`` of speech at espeak's default rate (~2.6 words/s)."""
    words_needed = int(seconds * 2.6)
    out: list[str] = []
    i = 0
    while sum(len(s.split()) for s in out) < words_needed:
        out.append(SENTENCES[i % len(SENTENCES)])
        i += 1
    return " ".join(out)


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over normalised words / reference length."""
    def norm(s: str) -> list[str]:
        return re.sub(r"[^a-z0-9' ]+", " ", s.lower()).split()

    ref, hyp = norm(reference), norm(hypothesis)
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / max(len(ref), 1)


def char_error_rate(reference: str, hypothesis: str) -> float:
    """Edit distance over letters (case, spaces and punctuation ignored) / reference letters.

    For Turkish, an agglutinative language, one wrong suffix or a split word ("Bu gün") fails a
    whole word: a five-word sentence with two such slips has a word error rate near 1 while
    nearly every letter is right.
    """
    a, b = ("".join(ch for ch in t.lower() if ch.isalpha()) for t in (reference, hypothesis))
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1] / max(len(a), 1)
