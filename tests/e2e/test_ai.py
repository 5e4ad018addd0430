"""The AI layer end to end: a real OpenAI-compatible server (llama-cpp-python + SmolLM2-135M on
loopback), workers of the default queue, the real stack (RabbitMQ, S3, PostgreSQL).

A 135M model writes poor prose: these tests check structure, the wire, resumption and failure
handling, never the quality of the text.
"""
from __future__ import annotations

import json
import pathlib
import time
import uuid
from typing import Any

import grpc
import jsonschema
import pytest
import srt
import webvtt

from mp4totext.client import Client, enhancement_requests
from mp4totext.v1 import transcription_pb2 as tpb
from tests.support import ROOT, Stack, wait_for

pytestmark = pytest.mark.slow

K = tpb.EnhancementKind
S = tpb.EnhancementState
# Small context windows so the long transcript needs several chunks; enough output for notes.
AI_ENV = {"MP4T_LLM_CONTEXT_TOKENS": "2048", "MP4T_LLM_MAX_OUTPUT_TOKENS": "700", "MP4T_LLM_TIMEOUT_S": "60",
          "MP4T_LLM_PRICE_PROMPT_PER_1K": "0.5", "MP4T_LLM_PRICE_COMPLETION_PER_1K": "1.5",
          "MP4T_CANCEL_POLL_S": "0.5", "MP4T_LLM_TEMPERATURE": "0"}


def llm_env(llm: Any, **extra: str) -> dict[str, str]:
    return {"MP4T_LLM_BASE_URL": llm.base_url, "MP4T_LLM_MODEL": llm.model, **AI_ENV, **extra}


def item(job: tpb.Transcription, kind: int, lang: str = "") -> tpb.Enhancement:
    found = [e for e in job.enhancements if e.kind == kind and e.target_language_code == lang]
    assert len(found) == 1, job.enhancements
    return found[0]


def transcribe(client: Client, path: pathlib.Path, **config: Any) -> tpb.Transcription:
    media = client.upload(str(path))
    job = client.create(media.name, **config)
    return job


# ---------------------------------------------------------------- no model configured


def test_no_model_configured_is_refused_with_how_to(client: Client, speech_mp4: pathlib.Path) -> None:
    """Runs before any default-queue worker with a model exists (file order)."""
    caps = client.capabilities()
    assert not caps.ai_available and "MP4T_LLM_MODEL" in caps.ai_unavailable_reason and not caps.enhancement_kinds
    media = client.upload(str(speech_mp4))
    with pytest.raises(grpc.RpcError) as err:
        client.create(media.name, enhancements=enhancement_requests(summary=True))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "MP4T_LLM_MODEL" in err.value.details()


# ---------------------------------------------------------------- with a model


@pytest.fixture(scope="module")
def ai_worker(stack: Stack, llm_server: Any) -> Any:
    proc = stack.start_worker("default", **llm_env(llm_server))
    yield proc
    proc.stop()
    current = stack.workers.pop("default", None)  # tests restart it: stop the one running now
    if current is not None:
        current.stop()


@pytest.fixture(scope="module")
def long_job(stack: Stack, key_a: str, long_speech: pathlib.Path, ai_worker: Any) -> tpb.Transcription:
    """A SUCCEEDED transcription of ~150 s of speech (several chunks at the workers' context size)."""
    with Client(stack.target, key_a) as c:
        job = c.wait(transcribe(c, long_speech).name)
    assert job.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED and len(job.result.segments) >= 15
    return job


def test_capabilities_list_the_model(client: Client, ai_worker: Any, llm_server: Any) -> None:
    caps = wait_for(lambda: (c := client.capabilities()).ai_available and c, 30, "ai capability")
    assert caps.ai_model == llm_server.model and not caps.ai_unavailable_reason
    assert set(caps.enhancement_kinds) == {K.ENHANCEMENT_KIND_CLEANUP, K.ENHANCEMENT_KIND_TRANSLATION,
                                           K.ENHANCEMENT_KIND_SUMMARY, K.ENHANCEMENT_KIND_LECTURE_NOTES}


def test_bad_requests_name_the_field(client: Client, ai_worker: Any, speech_mp4: pathlib.Path) -> None:
    media = client.upload(str(speech_mp4))
    cases = [([tpb.EnhancementRequest(kind=K.ENHANCEMENT_KIND_TRANSLATION)], "target_language_code is required"),
             ([tpb.EnhancementRequest(kind=K.ENHANCEMENT_KIND_CLEANUP, target_language_code="de")], "CLEANUP"),
             ([tpb.EnhancementRequest(kind=K.ENHANCEMENT_KIND_SUMMARY, target_language_code="not a tag")],
              "BCP-47"),
             ([tpb.EnhancementRequest(kind=99)], "not a known EnhancementKind")]
    for items, words in cases:
        with pytest.raises(grpc.RpcError) as err:
            client.create(media.name, enhancements=items)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details(), words


@pytest.mark.fast  # the fast tier's main path (scripts/test.sh --fast)
def test_every_item_at_creation(client: Client, ai_worker: Any, speech_mp4: pathlib.Path, db: Any) -> None:
    """A clean-up, a translation, a summary and lecture notes asked with the transcription:
    the job SUCCEEDS with its transcript, Watch goes on with the items' progress until each ends."""
    items = enhancement_requests(cleanup=True, translate=["tr"], summary=True, notes=True)
    job = transcribe(client, speech_mp4, enhancements=items)
    assert [e.state for e in job.enhancements] == [S.ENHANCEMENT_STATE_PENDING] * 4
    events = list(client.watch(job.name))
    done_at = next(i for i, ev in enumerate(events) if ev.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED)
    after = events[done_at:]
    assert any(s.state == S.ENHANCEMENT_STATE_RUNNING for ev in after for s in ev.enhancements), \
        "Watch showed no item running after the transcript was done"
    assert any(s.chunks_total >= 1 for ev in after for s in ev.enhancements)
    assert all(s.state == S.ENHANCEMENT_STATE_SUCCEEDED for s in events[-1].enhancements), events[-1]
    job = client.get(job.name)
    assert job.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED and job.result.text and not job.warnings
    segs = job.result.segments
    for e in job.enhancements:
        assert e.state == S.ENHANCEMENT_STATE_SUCCEEDED and e.model == "smollm2", e
        assert e.usage.prompt_tokens > 0 and e.usage.completion_tokens > 0 and e.usage.cost > 0
        assert e.chunks_done == e.chunks_total >= 1 and e.request_count >= 1
    # Clean-up and translation: same segments (ids, times, speakers), new text, each exactly once.
    for kind, lang in ((K.ENHANCEMENT_KIND_CLEANUP, ""), (K.ENHANCEMENT_KIND_TRANSLATION, "tr")):
        e = item(job, kind, lang)
        assert [(s.id, s.start_offset, s.end_offset, s.speaker_label) for s in e.segments] == \
               [(s.id, s.start_offset, s.end_offset, s.speaker_label) for s in segs]
        assert e.language_code == (lang or job.result.language_code)
    tr_srt = client.export(job.name, "srt", kind="translation", language="tr").decode()
    cues = list(srt.parse(tr_srt))
    assert cues and cues[0].start.total_seconds() == pytest.approx(segs[0].start_offset.ToTimedelta().total_seconds(),
                                                                   abs=0.01)
    vtt = client.export(job.name, "vtt", kind="cleanup").decode()
    assert len(webvtt.from_buffer(__import__("io").StringIO(vtt)).captions) >= len(segs)
    # Summary and notes: typed on the resource, schema-valid JSON, Markdown.
    assert item(job, K.ENHANCEMENT_KIND_SUMMARY).summary.abstract
    notes = item(job, K.ENHANCEMENT_KIND_LECTURE_NOTES).lecture_notes
    assert notes.title and all(o.start_offset.ToTimedelta().total_seconds() <= 60 for o in notes.outline)
    schema = json.loads((ROOT / "docs" / "schemas" / "lecture-notes.schema.json").read_text())
    jsonschema.validate(json.loads(client.export(job.name, "json", kind="lecture_notes")), schema)
    assert client.export(job.name, "md", kind="lecture_notes").decode().startswith("# ")
    assert client.export(job.name, "md", kind="summary").decode().startswith("# Summary")
    # Usage: per item, per job, per tenant and day (the ledger).
    total = sum(e.usage.prompt_tokens for e in job.enhancements)
    assert job.ai_usage.prompt_tokens == total and job.ai_usage.cost == pytest.approx(
        sum(e.usage.cost for e in job.enhancements))
    from storage.db import Enhancement, LlmUsage, connection
    with connection():
        tenant = Enhancement.get_by_id(job.enhancements[0].id).tenant_id
        ledger = sum(u.prompt_tokens for u in LlmUsage.select().where(LlmUsage.tenant == tenant))
    assert ledger >= total


def test_later_request_is_idempotent(client: Client, ai_worker: Any, speech_mp4: pathlib.Path) -> None:
    job = client.wait(transcribe(client, speech_mp4).name)
    assert job.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED and not job.enhancements
    with pytest.raises(grpc.RpcError) as err:
        client.export(job.name, "txt", kind="translation", language="de")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "EnhanceTranscription" in err.value.details()
    rid = str(uuid.uuid4())
    first = client.enhance(job.name, enhancement_requests(translate=["de"]), request_id=rid)
    again = client.enhance(job.name, enhancement_requests(translate=["de"]), request_id=rid)
    assert len(first.enhancements) == len(again.enhancements) == 1
    assert first.enhancements[0].id == again.enhancements[0].id
    client.wait(job.name)
    job = client.get(job.name)
    e = item(job, K.ENHANCEMENT_KIND_TRANSLATION, "de")
    assert e.state == S.ENHANCEMENT_STATE_SUCCEEDED, e.error_message
    assert e.language_code == "de" and e.request_id == rid and len(e.segments) == len(job.result.segments)
    assert client.export(job.name, "txt", kind="translation", language="de").strip()
    # Asking again for an item that succeeded changes nothing (no second bill).
    client.enhance(job.name, enhancement_requests(translate=["de"]))
    assert item(client.get(job.name), K.ENHANCEMENT_KIND_TRANSLATION, "de").usage == e.usage


def test_long_transcript_each_segment_handled_once(client: Client, long_job: tpb.Transcription, db: Any) -> None:
    """Clean-up in several batches, every segment in exactly one stored chunk (map-reduce of
    summaries over parts: tests/unit/test_enhance.py, same server)."""
    client.enhance(long_job.name, enhancement_requests(cleanup=True))
    client.wait(long_job.name, timeout=900)
    job = client.get(long_job.name)
    cleanup = item(job, K.ENHANCEMENT_KIND_CLEANUP)
    assert cleanup.state == S.ENHANCEMENT_STATE_SUCCEEDED, cleanup.error_message
    assert cleanup.chunks_total >= 2 and len(cleanup.segments) == len(job.result.segments)
    from storage.db import EnhancementChunk, connection
    with connection():
        outputs = [c.output for c in EnhancementChunk.select().where(EnhancementChunk.enhancement == cleanup.id)]
    ids = [int(k) for out in outputs for k in out]
    assert sorted(ids) == sorted(s.id for s in job.result.segments if s.text.strip()), "a segment twice or never"


def test_llm_server_down_fails_the_item_not_the_job(stack: Stack, client: Client, ai_worker: Any,
                                                    speech_mp4: pathlib.Path, llm_server: Any) -> None:
    stack.restart_worker("default", **llm_env(llm_server, MP4T_LLM_BASE_URL=f"http://127.0.0.1:{_closed_port()}/v1",
                                              MP4T_LLM_MAX_RETRIES="1", MP4T_LLM_TIMEOUT_S="5",
                                              MP4T_LLM_MAX_ATTEMPTS="3", MP4T_OUTAGE_BUDGET_S="4"))
    try:
        job = client.wait(transcribe(client, speech_mp4, enhancements=enhancement_requests(cleanup=True)).name)
    finally:
        stack.restart_worker("default", **llm_env(llm_server))
    assert job.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED and job.result.text
    e = item(job, K.ENHANCEMENT_KIND_CLEANUP)
    assert e.state == S.ENHANCEMENT_STATE_FAILED and e.error_reason == "ATTEMPTS_EXHAUSTED", e
    assert "could not be reached" in e.error_message and "Connection refused" in e.error_message, e.error_message
    assert e.attempt_count == 3  # tried MP4T_LLM_MAX_ATTEMPTS times, with backoff
    assert any("cleanup failed, the transcript is unaffected" in w for w in job.warnings), job.warnings
    with pytest.raises(grpc.RpcError) as err:
        client.export(job.name, "srt", kind="cleanup")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "FAILED" in err.value.details()
    # Asked again once the server is back: it runs again and succeeds.
    client.enhance(job.name, enhancement_requests(cleanup=True))
    client.wait(job.name)
    assert item(client.get(job.name), K.ENHANCEMENT_KIND_CLEANUP).state == S.ENHANCEMENT_STATE_SUCCEEDED


def test_invalid_json_is_repaired_once_then_fails_clearly(stack: Stack, client: Client, ai_worker: Any,
                                                          speech_mp4: pathlib.Path, llm_server: Any) -> None:
    """Answers cut off at 12 tokens are never valid JSON: one repair, then a clear failure."""
    stack.restart_worker("default", **llm_env(llm_server, MP4T_LLM_MAX_OUTPUT_TOKENS="12"))
    try:
        job = client.wait(transcribe(client, speech_mp4, enhancements=enhancement_requests(summary=True)).name)
    finally:
        stack.restart_worker("default", **llm_env(llm_server))
    e = item(job, K.ENHANCEMENT_KIND_SUMMARY)
    assert job.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED
    assert e.state == S.ENHANCEMENT_STATE_FAILED and e.error_reason == "LLM_OUTPUT_INVALID", e
    assert e.request_count == 2 and e.attempt_count == 1, e  # the answer, one repair; not retried
    assert "after one repair" in e.error_message and "cut off" in e.error_message


def test_cancel_stops_between_chunks(client: Client, long_job: tpb.Transcription) -> None:
    client.enhance(long_job.name, enhancement_requests(translate=["de"]))
    wait_for(lambda: item(client.get(long_job.name, basic=True), K.ENHANCEMENT_KIND_TRANSLATION, "de").chunks_done
             >= 1, 300, "a first chunk")
    cancelled = time.monotonic()
    client.call(client.transcriptions.CancelTranscription, tpb.CancelTranscriptionRequest(name=long_job.name))
    client.wait(long_job.name, timeout=120)
    took = time.monotonic() - cancelled
    job = client.get(long_job.name)
    e = item(job, K.ENHANCEMENT_KIND_TRANSLATION, "de")
    assert job.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED and job.result.text
    assert e.state == S.ENHANCEMENT_STATE_CANCELLED and e.chunks_done < e.chunks_total, e
    assert took < 60, f"cancel took {took:.0f} s"


def test_worker_killed_mid_item_resumes_without_redoing_chunks(stack: Stack, client: Client,
                                                               long_job: tpb.Transcription, llm_server: Any) -> None:
    from storage.db import EnhancementChunk, connection
    client.enhance(long_job.name, enhancement_requests(translate=["fr"]))
    wait_for(lambda: item(client.get(long_job.name, basic=True), K.ENHANCEMENT_KIND_TRANSLATION, "fr").chunks_done
             >= 1, 300, "a first chunk")
    stack.workers["default"].kill()
    e = item(client.get(long_job.name, basic=True), K.ENHANCEMENT_KIND_TRANSLATION, "fr")
    with connection():
        before = {c.key: (c.id, c.create_time) for c in EnhancementChunk.select().where(
            EnhancementChunk.enhancement == e.id)}
    assert before
    stack.workers.pop("default")
    stack.start_worker("default", **llm_env(llm_server))
    client.wait(long_job.name, timeout=600)
    e = item(client.get(long_job.name), K.ENHANCEMENT_KIND_TRANSLATION, "fr")
    assert e.state == S.ENHANCEMENT_STATE_SUCCEEDED, e.error_message
    with connection():
        after = {c.key: (c.id, c.create_time) for c in EnhancementChunk.select().where(
            EnhancementChunk.enhancement == e.id)}
    assert all(after[k] == v for k, v in before.items()), "a stored chunk was redone"
    # One request per chunk, plus the one in flight when the worker died (and a split, if any).
    assert e.request_count <= len(after) + 2, (e.request_count, len(after))
    with connection():
        stored = sum(c.prompt_tokens for c in EnhancementChunk.select().where(EnhancementChunk.enhancement == e.id))
    assert e.usage.prompt_tokens >= stored  # billed per response: stored chunks once, plus what was lost
    assert len(e.segments) == len(long_job.result.segments)


def _closed_port() -> int:
    from tests.support import free_port
    return free_port()
