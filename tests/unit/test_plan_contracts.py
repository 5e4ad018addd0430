"""The pipeline plan, the priority mapping and the typed contracts."""
from __future__ import annotations

import pytest
from faster_whisper.tokenizer import _LANGUAGE_CODES

from core import plan
from core.languages import WHISPER_LANGUAGES, whisper_language
from mp4totext.contracts import (
    JobConfig,
    Priority,
    ProgressEvent,
    Stage,
    TranscriptResult,
    api_priority,
    broker_priority,
    parse_event,
)
from mp4totext.v1 import transcription_pb2 as tpb


def test_plan_of_a_job_with_and_without_speakers() -> None:
    speakers = {"diarization": {"enabled": True}}
    assert plan.stages({}) == [Stage.PREPARING_MEDIA, Stage.WAITING, Stage.TRANSCRIBING, Stage.FINALIZING,
                               Stage.DONE]
    assert plan.next_stage(JobConfig(), Stage.WAITING) == Stage.FINALIZING
    assert plan.next_stage(speakers, Stage.TRANSCRIBING) == Stage.DIARIZING
    assert plan.next_stage(speakers, Stage.DIARIZING) == Stage.FINALIZING
    assert plan.percent_span({}, Stage.TRANSCRIBING) == (5.0, 95.0)
    assert plan.percent_span(speakers, Stage.TRANSCRIBING) == (5.0, 70.0)
    assert plan.percent_span(speakers, Stage.DIARIZING) == (70.0, 95.0)


def test_every_stage_a_job_waits_in_has_an_actor_on_a_declared_queue() -> None:
    for stage in (Stage.WAITING, Stage.TRANSCRIBING, Stage.DIARIZING, Stage.FINALIZING):
        assert plan.ROUTES[plan.actor_for(stage)] in plan.QUEUES


def test_one_priority_mapping_both_ways() -> None:
    assert [broker_priority(p) for p in (1, 2, 3, 4)] == [2, 5, 7, 10]
    assert broker_priority(0) == broker_priority(Priority.NORMAL)  # UNSPECIFIED
    for p in (tpb.PRIORITY_LOW, tpb.PRIORITY_NORMAL, tpb.PRIORITY_HIGH, tpb.PRIORITY_URGENT):
        assert api_priority(broker_priority(p)) == p
    assert {p.name: p.value for p in Priority} == {
        n.removeprefix("PRIORITY_"): v for n, v in tpb.Priority.items()}
    with pytest.raises(ValueError):
        broker_priority(9)


def test_states_and_stages_match_the_protos() -> None:
    assert {f"TRANSCRIPTION_STAGE_{s}" for s in Stage} <= set(tpb.TranscriptionStage.keys())


def test_our_language_table_is_faster_whispers() -> None:
    assert WHISPER_LANGUAGES == set(_LANGUAGE_CODES)
    assert whisper_language("tr-TR") == "tr" and whisper_language("auto") is None and whisper_language("") is None
    with pytest.raises(ValueError):
        whisper_language("xx")


def test_stored_result_round_trips_and_reads_old_rows() -> None:
    old = {"text": "hi", "language": "en", "duration": 1.0, "segments": [
        {"id": 0, "start": 0.0, "end": 1.0, "text": "hi", "words": [{"word": " hi", "start": 0.0, "end": 0.5}]}],
        "diarization": {"state": "NOT_REQUESTED"}, "unknown_future_key": 1}
    result = TranscriptResult.from_json(old)
    assert result.segments[0].words[0].speaker is None and result.diarization.state == "NOT_REQUESTED"
    assert TranscriptResult.from_json(result.to_json()) == result
    failed = result.without_speakers("no audio")
    assert failed.diarization.state == "FAILED" and failed.text == "hi" and result.diarization.state != "FAILED"


def test_progress_events_parse() -> None:
    ev = ProgressEvent(id="j", sequence=3, state="SUCCEEDED", stage="DONE")
    back = parse_event(ev.model_dump(mode="json"))
    assert back == ev and back.terminal
    assert parse_event({"id": "j", "sequence": 4, "deleted": True}).deleted
