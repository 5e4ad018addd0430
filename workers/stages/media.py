"""Probe a media file and extract 16 kHz mono audio with ffmpeg."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import wave

import numpy as np

from mp4totext.errors import WorkError

SAMPLE_RATE = 16000


class MediaError(WorkError):
    """The input is not usable media. The message is written for the uploader."""

    reason, retryable = "MEDIA_INVALID", False


class ToolMissing(RuntimeError):
    """ffmpeg/ffprobe is not installed (an operator problem, not the user's)."""


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    duration_s: float
    format_name: str
    audio_codec: str
    audio_streams: int
    video_streams: int


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise ToolMissing(f"{cmd[0]} is not installed or not on PATH: install ffmpeg") from exc


# An upload may be a playlist (HLS, concat...) naming URLs: ffmpeg would fetch them from inside
# our network. Inputs may only open local files.
LOCAL_ONLY = ["-protocol_whitelist", "file"]
_CONTEXT = re.compile(r"\[[^\]]* @ 0x[0-9a-fA-F]+\]\s*")  # "[mov,mp4 @ 0x55d1c2a3b4c0] "
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")


def _last_line(stderr: bytes) -> str:
    """ffmpeg's last error line as a reason for users: no file paths, no heap addresses."""
    lines = [ln.strip() for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    if not lines:
        return "no details"
    line = lines[-1]
    # ffprobe prefixes errors with the file path; keep the reason only.
    line = line.split(": ", 1)[1] if ": " in line and line.startswith(("/", ".")) else line
    line = _ADDRESS.sub("0x…", _CONTEXT.sub("", line))
    return line[:200] or "no details"


def probe(path: str, ffprobe: str = "ffprobe", timeout: float = 120.0) -> ProbeResult:
    if os.path.getsize(path) == 0:
        raise MediaError("the file is empty (0 bytes)")
    proc = _run(
        [ffprobe, *LOCAL_ONLY, "-v", "error", "-print_format", "json", "-show_format", "-show_streams", path],
        timeout,
    )
    if proc.returncode != 0:
        raise MediaError(
            f"not a readable audio or video file ({_last_line(proc.stderr)}); "
            "upload MP4, MOV, MKV, WebM, MP3, WAV, M4A or FLAC"
        )
    info = json.loads(proc.stdout or b"{}")
    streams = info.get("streams", [])
    fmt = info.get("format", {})
    audio = [s for s in streams if s.get("codec_type") == "audio"]
    video = [s for s in streams if s.get("codec_type") == "video" and s.get("disposition", {}).get("attached_pic") != 1]
    if not audio:
        raise MediaError("the file has no audio stream, so there is nothing to transcribe")
    duration = _float(fmt.get("duration")) or _float(audio[0].get("duration"))
    if not duration or duration <= 0:
        raise MediaError("the audio stream has zero length")
    return ProbeResult(
        duration_s=duration,
        format_name=fmt.get("format_name", ""),
        audio_codec=audio[0].get("codec_name", ""),
        audio_streams=len(audio),
        video_streams=len(video),
    )


def _float(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def extract_audio(src: str, dst_wav: str, ffmpeg: str = "ffmpeg", timeout: float = 3600.0,
                  expected_duration_s: float | None = None, max_duration_s: float | None = None) -> float:
    """Decode the first audio stream of ``src`` to 16 kHz mono s16le WAV; return its duration.

    Raises MediaError when nothing (or far less than the container claims) can be decoded,
    which is how truncated uploads show up, and when the decoded audio is longer than
    ``max_duration_s``: the limit holds for what is decoded, whatever the container declares
    (decoding stops one second past the limit).
    """
    tmp = dst_wav + ".part"
    limit = ["-t", f"{max_duration_s + 1:.3f}"] if max_duration_s else []
    proc = _run(
        [ffmpeg, "-nostdin", "-hide_banner", "-v", "error", "-y", *LOCAL_ONLY, "-i", src, "-map", "0:a:0", "-vn",
         "-ac", "1", "-ar", str(SAMPLE_RATE), "-c:a", "pcm_s16le", *limit, "-f", "wav", tmp],
        timeout,
    )
    if proc.returncode != 0 or not os.path.exists(tmp):
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise MediaError(f"the audio could not be decoded ({_last_line(proc.stderr)})")
    duration = wav_duration(tmp)
    if max_duration_s and duration > max_duration_s:
        os.unlink(tmp)
        raise MediaError(f"the audio is longer than the {_hours(max_duration_s)} limit: split it into shorter parts")
    if duration < 0.05:
        os.unlink(tmp)
        raise MediaError("no audio could be decoded from the file (truncated or empty audio stream)")
    if expected_duration_s and duration < 0.5 * expected_duration_s and expected_duration_s - duration > 2:
        os.unlink(tmp)
        raise MediaError(
            f"the file appears truncated: it declares {expected_duration_s:.1f} s but only "
            f"{duration:.1f} s of audio could be decoded; upload the complete file"
        )
    os.replace(tmp, dst_wav)
    return duration


def _data_offset(path: str) -> int:
    """Offset of the PCM data in a RIFF/WAVE file (ffmpeg may add a LIST chunk)."""
    with open(path, "rb") as fh:
        header = fh.read(4096)
    if header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        raise MediaError("internal audio file is not WAV")
    pos = 12
    while pos + 8 <= len(header):
        cid, size = header[pos : pos + 4], int.from_bytes(header[pos + 4 : pos + 8], "little")
        if cid == b"data":
            return pos + 8
        pos += 8 + size + (size & 1)
    raise MediaError("internal audio file has no data chunk")


def wav_duration(path: str) -> float:
    # Computed from the file size: the header's size field may be a placeholder.
    return max(0, os.path.getsize(path) - _data_offset(path)) / (SAMPLE_RATE * 2)


def load_wav(path: str) -> np.ndarray:
    """Read our 16 kHz mono s16le WAV into float32 [-1, 1] (what faster-whisper takes)."""
    with wave.open(path, "rb") as w:
        if w.getframerate() != SAMPLE_RATE or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise MediaError("internal audio file has an unexpected format")
    data = np.fromfile(path, dtype="<i2", offset=_data_offset(path))
    return data.astype(np.float32) / 32768.0


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:g} s"
