"""Requests -> typed options: every bad field is INVALID_ARGUMENT naming the field."""
from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from core.export import SubtitleOptions
from mp4totext.contracts import JobConfig, Priority, broker_priority
from mp4totext.v1 import media_pb2
from mp4totext.v1 import transcription_pb2 as tpb
from server.errors import ApiError
from core.models import ModelSet
from server.validation import export_options, job_config, parse_name, upload_metadata

MULTI, ENGLISH = "base", "tiny.en"


def available() -> tuple[bool, str]:
    return True, ""


def unavailable() -> tuple[bool, str]:
    return False, "no diarization worker is running"


def check(model: str = MULTI, status: Any = available, **fields: Any) -> tuple[JobConfig, int]:
    return job_config(tpb.TranscriptionConfig(**fields), ModelSet.of(model), status)


def refused(code: grpc.StatusCode, fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ApiError) as err:
        fn(*args, **kwargs)
    assert err.value.code == code
    return err.value.message


def test_defaults() -> None:
    config, priority = check()
    assert config == JobConfig() and priority == broker_priority(Priority.NORMAL)


def test_every_option_is_kept_in_the_stored_form() -> None:
    config, priority = check(language_code="tr-TR", beam_size=3, enable_vad=False, enable_word_time_offsets=False,
                             task=tpb.TRANSCRIPTION_TASK_TRANSLATE, initial_prompt="ders", hotwords=["  a   b ", "c"],
                             priority=tpb.PRIORITY_URGENT,
                             diarization_config=tpb.DiarizationConfig(enable_speaker_diarization=True,
                                                                      min_speaker_count=2, max_speaker_count=3))
    assert (config.language, config.language_code, config.beam_size, config.vad, config.word_timestamps) == \
        ("tr", "tr-TR", 3, False, False)
    assert config.task == "translate" and config.initial_prompt == "ders" and config.hotwords == ["a b", "c"]
    assert config.diarization.enabled and (config.diarization.min_speakers, config.diarization.max_speakers) == (2, 3)
    assert priority == broker_priority(Priority.URGENT) == 10
    assert JobConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("fields, model, named", [
    ({"language_code": "xx-YY"}, MULTI, "config.language_code"),
    ({"language_code": "tr"}, ENGLISH, "config.language_code"),
    ({"task": tpb.TRANSCRIPTION_TASK_TRANSLATE}, ENGLISH, "config.task"),
    ({"task": 7}, MULTI, "config.task"),
    ({"beam_size": 11}, MULTI, "config.beam_size"),
    ({"priority": 9}, MULTI, "config.priority"),
    ({"initial_prompt": "x" * 1001}, MULTI, "config.initial_prompt"),
    ({"hotwords": ["w"] * 51}, MULTI, "config.hotwords"),
    ({"hotwords": ["ok", "y" * 101]}, MULTI, "config.hotwords[1]"),
    ({"diarization_config": tpb.DiarizationConfig(enable_speaker_diarization=True, min_speaker_count=3,
                                                  max_speaker_count=2)}, MULTI, "min_speaker_count"),
    ({"diarization_config": tpb.DiarizationConfig(min_speaker_count=2)}, MULTI, "enable_speaker_diarization"),
])
def test_bad_options_name_the_field(fields: dict[str, Any], model: str, named: str) -> None:
    assert named in refused(grpc.StatusCode.INVALID_ARGUMENT, check, model, **fields)


def test_speakers_without_a_worker_is_failed_precondition_saying_why() -> None:
    dia = tpb.DiarizationConfig(enable_speaker_diarization=True)
    message = refused(grpc.StatusCode.FAILED_PRECONDITION, check, MULTI, unavailable, diarization_config=dia)
    assert "no diarization worker" in message


def test_resource_names() -> None:
    assert parse_name("media/" + "a" * 32, "media") == "a" * 32
    assert "expected media/<32 hex" in refused(grpc.StatusCode.INVALID_ARGUMENT, parse_name, "media/x", "media")
    assert "media is required" in refused(grpc.StatusCode.INVALID_ARGUMENT, parse_name, "", "media", "media")


def test_upload_metadata() -> None:
    ok = upload_metadata(media_pb2.UploadMediaRequest(metadata=media_pb2.UploadMetadata(
        filename="a.mp4", size_bytes=10, sha256="A" * 64, request_id="r")), 100)
    assert (ok.filename, ok.size_bytes, ok.sha256, ok.request_id) == ("a.mp4", 10, "a" * 64, "r")
    for md, named in ((media_pb2.UploadMetadata(filename="a", size_bytes=101), "size_bytes"),
                      (media_pb2.UploadMetadata(filename=""), "filename"),
                      (media_pb2.UploadMetadata(filename="a", sha256="xyz"), "sha256"),
                      (media_pb2.UploadMetadata(filename="a", request_id="r" * 129), "request_id")):
        message = refused(grpc.StatusCode.INVALID_ARGUMENT, upload_metadata,
                          media_pb2.UploadMediaRequest(metadata=md), 100)
        assert named in message
    chunk_first = media_pb2.UploadMediaRequest(chunk=media_pb2.UploadChunk(data=b"x"))
    assert "must carry metadata" in refused(grpc.StatusCode.INVALID_ARGUMENT, upload_metadata, chunk_first, 100)


def test_export_options() -> None:
    fmt, opts = export_options(tpb.ExportTranscriptionRequest(format=tpb.EXPORT_FORMAT_SRT))
    assert fmt == "srt" and opts == SubtitleOptions()
    req = tpb.ExportTranscriptionRequest(format=tpb.EXPORT_FORMAT_VTT, max_line_length=30, max_lines_per_caption=1,
                                         max_caption_duration=duration_pb2.Duration(seconds=3))
    assert export_options(req) == ("vtt", SubtitleOptions(30, 1, 3.0))
    assert "format is required" in refused(grpc.StatusCode.INVALID_ARGUMENT, export_options,
                                           tpb.ExportTranscriptionRequest())
    assert "max_line_length" in refused(grpc.StatusCode.INVALID_ARGUMENT, export_options,
                                        tpb.ExportTranscriptionRequest(format=1, max_line_length=5))


MEDIA_A, MEDIA_B = "media/" + "a" * 32, "media/" + "b" * 32


def known(*speakers: tpb.KnownSpeaker, enabled: bool = True) -> dict[str, Any]:
    return {"diarization_config": tpb.DiarizationConfig(enable_speaker_diarization=enabled,
                                                        known_speakers=list(speakers))}


def span(start: float, end: float) -> dict[str, duration_pb2.Duration]:
    d0, d1 = duration_pb2.Duration(), duration_pb2.Duration()
    d0.FromNanoseconds(int(start * 1e9))
    d1.FromNanoseconds(int(end * 1e9))
    return {"start_offset": d0, "end_offset": d1}


def test_known_speakers_are_kept_with_their_stretch() -> None:
    config, _ = check(**known(tpb.KnownSpeaker(display_name=" Ayşe Yılmaz ", media=MEDIA_A),
                              tpb.KnownSpeaker(display_name="Bob", media=MEDIA_B, **span(3.5, 12))))
    refs = config.diarization.known_speakers
    assert [(r.name, r.media_id, r.start_s, r.end_s) for r in refs] == [
        ("Ayşe Yılmaz", "a" * 32, 0.0, None), ("Bob", "b" * 32, 3.5, 12.0)]
    assert JobConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("speakers, enabled, named", [
    ([tpb.KnownSpeaker(display_name="Ayşe", media=MEDIA_A)], False, "enable_speaker_diarization"),
    ([tpb.KnownSpeaker(display_name="", media=MEDIA_A)], True, "known_speakers[0].display_name"),
    ([tpb.KnownSpeaker(display_name="x" * 65, media=MEDIA_A)], True, "known_speakers[0].display_name"),
    ([tpb.KnownSpeaker(display_name="SPEAKER_01", media=MEDIA_A)], True, "generic label"),
    ([tpb.KnownSpeaker(display_name="Ayşe", media=MEDIA_A), tpb.KnownSpeaker(display_name="ayşe", media=MEDIA_B)],
     True, "known_speakers[1].display_name"),
    ([tpb.KnownSpeaker(display_name="Ayşe", media="transcriptions/" + "a" * 32)], True, "known_speakers[0].media"),
    ([tpb.KnownSpeaker(display_name="Ayşe", media=MEDIA_A, **span(5, 6))], True, "1 s long"),
    ([tpb.KnownSpeaker(display_name="Ayşe", media=MEDIA_A, **span(0, 90))], True, "90 s long"),
    ([tpb.KnownSpeaker(display_name=f"p{i}", media=MEDIA_A) for i in range(21)], True, "at most 20"),
])
def test_bad_known_speakers_name_the_field(speakers: list[tpb.KnownSpeaker], enabled: bool, named: str) -> None:
    assert named in refused(grpc.StatusCode.INVALID_ARGUMENT, check, MULTI, **known(*speakers, enabled=enabled))


def test_a_known_speakers_media_must_be_ready_and_long_enough() -> None:
    from mp4totext.contracts import KnownSpeakerRef
    from server.validation import check_reference

    ref = KnownSpeakerRef(name="Ayşe", media_id="a" * 32)
    assert check_reference(ref, 0, "READY", 80.0).end_s == 60.0  # at most a minute of it
    assert check_reference(ref, 0, "READY", 7.5).end_s == 7.5
    assert "wait for its preparation" in refused(grpc.StatusCode.FAILED_PRECONDITION, check_reference, ref, 0,
                                                 "PROCESSING", 10.0)
    assert "lasts 1.5 s" in refused(grpc.StatusCode.INVALID_ARGUMENT, check_reference, ref, 0, "READY", 1.5)
    late = ref.model_copy(update={"start_s": 20.0, "end_s": 30.0})
    assert "known_speakers[2].media" in refused(grpc.StatusCode.INVALID_ARGUMENT, check_reference, late, 2,
                                                "READY", 25.0)
