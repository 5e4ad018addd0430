"""Pure stages on real files: ffprobe/ffmpeg and faster-whisper tiny.en on espeak-ng speech."""
from __future__ import annotations

import os
import pathlib

import pytest

from mp4totext import config, samples
from tests.support import SPEECH_TEXT
from workers.stages.media import MediaError, extract_audio, load_wav, probe
from workers.stages.model_files import locate
from workers.stages.transcribe import TranscribeOptions, load_model, transcribe

TINY = locate("tiny.en", "")  # the package's own directory: nothing to assemble


def test_probe_and_extract(speech_mp4: pathlib.Path, tmp_path: pathlib.Path) -> None:
    info = probe(str(speech_mp4))
    assert info.audio_streams == 1 and info.video_streams == 1 and info.audio_codec == "aac"
    wav = tmp_path / "a.wav"
    duration = extract_audio(str(speech_mp4), str(wav), expected_duration_s=info.duration_s)
    assert abs(duration - info.duration_s) < 1.5  # the 5 fps video track rounds the container up
    audio = load_wav(str(wav))
    assert audio.dtype.name == "float32" and abs(len(audio) / 16000 - duration) < 0.01
    assert 0.01 < float(abs(audio).max()) <= 1.0


def test_bad_media_errors_are_readable(media_dir: pathlib.Path, speech_mp4: pathlib.Path,
                                       tmp_path: pathlib.Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        probe(str(empty))
    text = tmp_path / "doc.mp4"
    text.write_text("hello " * 100)
    with pytest.raises(MediaError, match="not a readable audio or video file"):
        probe(str(text))
    # An MP4 whose header (moov first) promises 60 s but whose data stops early: probe believes
    # the header, extraction finds the missing audio.
    full = tmp_path / "long.mp4"
    samples.make_media(samples.lecture_text(60), str(full), extra_args=["-movflags", "+faststart"])
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.3)])
    with pytest.raises(MediaError, match="truncated|decoded"):
        info = probe(str(cut))
        extract_audio(str(cut), str(tmp_path / "o.wav"), expected_duration_s=info.duration_s)
    assert not (tmp_path / "o.wav").exists() and not (tmp_path / "o.wav.part").exists()


def test_transcribe_real_speech_with_progress(speech_mp4: pathlib.Path, tmp_path: pathlib.Path) -> None:
    wav = tmp_path / "a.wav"
    extract_audio(str(speech_mp4), str(wav))
    model = load_model(TINY, "cpu", "int8")
    assert load_model(TINY, "cpu", "int8") is model  # loaded once per process
    seen: list[float] = []
    result = transcribe(model, load_wav(str(wav)), TranscribeOptions(), seen.append, "tiny.en").to_json()
    assert samples.word_error_rate(SPEECH_TEXT, result["text"]) < 0.35, result["text"]
    assert seen == sorted(seen) and seen[-1] <= result["duration"]
    assert result["language"] == "en"
    assert all(w["start"] <= w["end"] for s in result["segments"] for w in s["words"])


def test_cancellation_stops_between_segments(speech_mp4: pathlib.Path, tmp_path: pathlib.Path) -> None:
    wav = tmp_path / "a.wav"
    extract_audio(str(speech_mp4), str(wav))

    class Stop(Exception):
        pass

    calls = []

    def on_progress(t: float) -> None:
        calls.append(t)
        raise Stop()

    with pytest.raises(Stop):
        transcribe(load_model(TINY, "cpu", "int8"), load_wav(str(wav)), TranscribeOptions(), on_progress)
    assert len(calls) == 1


def test_default_models_are_packaged_base_and_tiny_en(tmp_path: pathlib.Path) -> None:
    s = config.Settings()
    assert s.model_label == "base,tiny.en"  # multilingual first: a Turkish file works out of the box
    for source in ("tiny.en", "base"):
        path = locate(source, tmp_path)
        assert os.path.isdir(path) and os.path.exists(os.path.join(path, "model.bin")), source
    assert config.Settings(whisper_model=TINY).model_label == "tiny.en"  # the single-model variable still works
    assert s.diarization_pipeline == "offline"  # speaker recognition on pretrained weights, no account needed


def test_config_from_env() -> None:
    s = config.from_env({"MP4T_MAX_UPLOAD_BYTES": "10", "MP4T_S3_SECURE": "true", "MP4T_WHISPER_MODEL": "small"})
    assert s.max_upload_bytes == 10 and s.s3_secure is True and s.whisper_model == "small"
    with pytest.raises(SystemExit, match="not a boolean"):
        config.from_env({"MP4T_S3_SECURE": "maybe"})
