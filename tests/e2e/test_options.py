"""Transcription options (validated at creation) and the export RPC / CLI against the real stack."""
from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
from typing import Any, Iterator

import grpc
import pytest
import srt
import webvtt

from mp4totext import samples
from mp4totext.v1 import transcription_pb2 as tpb
from tests.support import CLI, ROOT, SPEECH_TEXT, Stack, wait_for


@pytest.fixture(scope="module")
def client(stack: Stack, key_a: str) -> Iterator[Any]:
    from mp4totext.client import Client

    with Client(stack.target, key_a) as c:
        yield c


@pytest.fixture(scope="module")
def media(client: Any, speech_mp4: pathlib.Path) -> Any:
    return client.upload(str(speech_mp4), content_type="video/mp4")


@pytest.mark.parametrize("config, field", [
    ({"task": tpb.TRANSCRIPTION_TASK_TRANSLATE, "model": "tiny.en"}, "config.task"),
    ({"language_code": "tr", "model": "tiny.en"}, "config.language_code"),
    ({"model": "nope"}, "config.model"),
    ({"expected_language_codes": ["tr", "zz"]}, "config.expected_language_codes[1]"),
    ({"language_code": "xx-YY"}, "config.language_code"),
    ({"beam_size": 11}, "config.beam_size"),
    ({"initial_prompt": "x" * 1001}, "config.initial_prompt"),
    ({"hotwords": ["w"] * 51}, "config.hotwords"),
    ({"hotwords": ["ok", "y" * 101]}, "config.hotwords[1]"),
    ({"hotwords": ["   "]}, "config.hotwords[0]"),
    ({"diarization_config": tpb.DiarizationConfig(enable_speaker_diarization=True, min_speaker_count=3,
                                                  max_speaker_count=2)}, "min_speaker_count"),
    ({"diarization_config": tpb.DiarizationConfig(enable_speaker_diarization=True, max_speaker_count=21)},
     "max_speaker_count"),
    ({"diarization_config": tpb.DiarizationConfig(min_speaker_count=2)}, "enable_speaker_diarization"),
])
def test_bad_options_are_invalid_argument_naming_the_field(client: Any, media: Any, config: dict[str, Any],
                                                           field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.create(media.name, **config)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    if field == "config.task":
        assert "English-only" in err.value.details()


def test_options_reach_the_recognizer_and_are_kept(client: Any, media: Any, otlp: Any) -> None:
    job = client.create(media.name, initial_prompt="A lecture about Dramatiq and RabbitMQ.",
                        hotwords=["Dramatiq", "RabbitMQ"], enable_vad=False, beam_size=2, language_code="en-US",
                        task=tpb.TRANSCRIPTION_TASK_TRANSCRIBE, enable_word_time_offsets=False)
    done = client.wait(job.name, timeout=300)
    assert done.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED, done.error_message
    cfg = done.config
    assert list(cfg.hotwords) == ["Dramatiq", "RabbitMQ"] and cfg.initial_prompt.startswith("A lecture")
    assert not cfg.enable_vad and cfg.beam_size == 2 and cfg.task == tpb.TRANSCRIPTION_TASK_TRANSCRIBE
    r = done.result
    assert r.task == tpb.TRANSCRIPTION_TASK_TRANSCRIBE and r.language_code == "en"
    assert r.diarization.state == tpb.DIARIZATION_STATE_NOT_REQUESTED
    assert all(not s.words for s in r.segments)  # word timestamps off
    assert samples.word_error_rate(SPEECH_TEXT, r.text) < 0.35, r.text
    # What the worker called faster-whisper with (its "whisper transcribe" span records the options).
    job_id = job.name.split("/")[1]

    def recognizer_span() -> dict[str, Any] | None:
        consumers = {sp["span_id"] for sp in otlp.find(**{"mp4t.job_id": job_id}) if sp["name"] == "transcribe process"}
        spans = [sp for sp in otlp.find() if sp["name"] == "whisper transcribe" and sp["parent_id"] in consumers]
        return spans[0] if spans else None

    called = wait_for(recognizer_span, 30, "the worker's whisper transcribe span")["attributes"]
    assert (called["mp4t.beam_size"], called["mp4t.vad"], called["mp4t.language"]) == (2, False, "en")
    assert (called["mp4t.word_timestamps"], called["mp4t.task"], called["mp4t.hotwords"]) == (False, "transcribe", 2)
    assert called["mp4t.initial_prompt_chars"] == len("A lecture about Dramatiq and RabbitMQ.")


@pytest.fixture(scope="module")
def finished(client: Any, media: Any) -> Any:
    job = client.create(media.name)
    return client.wait(job.name, timeout=300)


def test_export_formats(client: Any, finished: Any) -> None:
    name = finished.name
    subs = list(srt.parse(client.export(name, "srt", max_line_length=30, max_lines_per_caption=1,
                                        max_caption_s=3).decode()))
    assert len(subs) >= 5 and all(len(s.content) <= 30 and "\n" not in s.content for s in subs)
    assert all(s.end.total_seconds() - s.start.total_seconds() <= 3.0 + 1e-6 for s in subs)
    vtt = webvtt.from_buffer(io.StringIO(client.export(name, "vtt").decode()))
    assert len(vtt.captions) >= 3
    doc = json.loads(client.export(name, "json"))
    assert doc["name"] == name and doc["result"]["segments"]
    tsv = client.export(name, "tsv").decode().splitlines()
    assert tsv[0] == "start_ms\tend_ms\tspeaker\ttext" and len(tsv) == len(finished.result.segments) + 1
    txt = client.export(name, "txt").decode()
    assert samples.word_error_rate(SPEECH_TEXT, txt) < 0.35


def test_export_refusals(client: Any, finished: Any, media: Any) -> None:
    cases = [
        (tpb.ExportTranscriptionRequest(name=finished.name), grpc.StatusCode.INVALID_ARGUMENT, "format"),
        (tpb.ExportTranscriptionRequest(name=finished.name, format=tpb.EXPORT_FORMAT_SRT, max_line_length=5),
         grpc.StatusCode.INVALID_ARGUMENT, "max_line_length"),
        (tpb.ExportTranscriptionRequest(name="transcriptions/" + "0" * 32, format=tpb.EXPORT_FORMAT_SRT),
         grpc.StatusCode.NOT_FOUND, "not found"),
    ]
    queued = client.create(media.name, priority=tpb.PRIORITY_LOW)
    client.call(client.transcriptions.CancelTranscription, tpb.CancelTranscriptionRequest(name=queued.name))
    cases.append((tpb.ExportTranscriptionRequest(name=queued.name, format=tpb.EXPORT_FORMAT_TXT),
                  grpc.StatusCode.FAILED_PRECONDITION, "only a SUCCEEDED"))
    for req, code, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            list(client.transcriptions.ExportTranscription(req, metadata=client.metadata, timeout=30))
        assert err.value.code() == code and text in err.value.details(), (req, err.value.details())


def test_large_export_is_streamed_in_chunks(client: Any, long_speech: pathlib.Path) -> None:
    media = client.upload(str(long_speech))
    done = client.wait(client.create(media.name).name, timeout=600)
    parts = list(client.transcriptions.ExportTranscription(
        tpb.ExportTranscriptionRequest(name=done.name, format=tpb.EXPORT_FORMAT_JSON), metadata=client.metadata))
    assert len(parts) >= 2, "a long JSON export should arrive in several messages"
    assert parts[0].content_type == "application/json" and parts[0].filename.endswith(".json")
    assert all(not p.content_type for p in parts[1:]) and all(len(p.data) <= 64 * 1024 for p in parts)
    doc = json.loads(b"".join(part.data for part in parts))
    assert float(doc["result"]["duration"].rstrip("s")) > 100 and len(doc["result"]["segments"]) > 20


def test_cli_export_writes_any_format(stack: Stack, key_a: str, finished: Any, tmp_path: pathlib.Path) -> None:
    env = {**os.environ, "MP4T_SERVER": stack.target, "MP4T_API_KEY": key_a}
    for fmt in ("srt", "vtt", "txt", "json", "tsv"):
        out = tmp_path / f"t.{fmt}"
        proc = subprocess.run([*CLI, "export", finished.name, "--format", fmt,
                               "-o", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert out.stat().st_size > 50
    assert list(srt.parse(pathlib.Path(tmp_path / "t.srt").read_text()))
    assert webvtt.read(str(tmp_path / "t.vtt")).captions
