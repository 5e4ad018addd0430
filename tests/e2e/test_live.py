"""Live captions on the real stack: a paced stream gives interim and final results in order, the
recording becomes a READY media and a SUCCEEDED job, a killed replica behind HAProxy loses no
byte and repeats no segment, a full replica refuses with RetryInfo, another user cannot attach."""
from __future__ import annotations

import hashlib
import pathlib
import threading
import time
from typing import Any

import grpc
import jiwer
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mp4totext import samples
from mp4totext.client import Client
from mp4totext.live_cli import file_pcm
from mp4totext.live_client import LiveCaptions, pcm_chunks
from mp4totext.v1 import live_pb2 as lpb
from mp4totext.v1 import media_pb2
from mp4totext.v1 import live_pb2_grpc
from mp4totext.v1 import transcription_pb2 as tpb
from tests.support import wait_for

SENTENCES = ["Good morning everyone.", "Today we will talk about how computers changed the world.",
             "Please remember to submit your homework before Friday."]


def _norm(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


@pytest.fixture(scope="module")
def lecture(media_dir: pathlib.Path) -> tuple[bytes, str]:
    """16 kHz PCM16 of three sentences with a second of silence after each, and their text."""
    parts = []
    for i, text in enumerate(SENTENCES):
        wav = media_dir / f"live-{i}.wav"
        samples.speech_wav(text, str(wav))
        pcm = file_pcm(str(wav))
        parts.append(pcm + b"\0" * 32000)
    return b"".join(parts), " ".join(SENTENCES)


def _config(**kw: Any) -> lpb.LiveConfig:
    return lpb.LiveConfig(encoding=lpb.AUDIO_ENCODING_PCM16, sample_rate_hertz=16000, language_code="en", **kw)


def test_a_paced_stream_gives_interim_then_final_segments_and_becomes_the_job(
        stack: Any, key_a: str, lecture: tuple[bytes, str]) -> None:
    pcm, text = lecture
    events: list[tuple[float, lpb.StreamLiveResponse]] = []
    started = time.monotonic()
    with Client(stack.target, key_a) as client:
        ended = LiveCaptions(client, _config(transcription_config=tpb.TranscriptionConfig())).run(
            pcm_chunks(pcm), lambda e: events.append((time.monotonic() - started, e)), realtime=True)
        kinds = [e.WhichOneof("event") for _, e in events]
        assert kinds[0] == "session" and "interim" in kinds and "ack" in kinds
        assert kinds.index("interim") < kinds.index("segment"), kinds  # text shows before it is final
        segments = [e.segment for _, e in events if e.WhichOneof("event") == "segment"]
        assert [s.id for s in segments] == list(range(len(segments))) and len(segments) >= 2
        assert all(a.end_offset.ToTimedelta() <= b.start_offset.ToTimedelta() for a, b in zip(segments, segments[1:]))
        live_text = " ".join(s.text for s in segments)
        wer = jiwer.wer(_norm(text), _norm(live_text))
        assert wer <= 0.25, (wer, live_text)
        first_interim = next(t for t, e in events if e.WhichOneof("event") == "interim")
        assert first_interim < 3.0, first_interim  # the first words show while the first sentence is spoken
        # The recording: a READY media of exactly the bytes sent, and a normal job on it.
        assert ended.media and ended.transcription and ended.session.state == lpb.LIVE_SESSION_STATE_ENDED
        media = client.wait_media(ended.media)
        assert media.state == media_pb2.MEDIA_STATE_READY, media.error_message
        assert abs(media.duration.ToTimedelta().total_seconds() - len(pcm) / 32000) < 0.1
        job = client.wait(ended.transcription, timeout=300)
        assert job.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED, job.error_message
        assert jiwer.wer(_norm(text), _norm(job.result.text)) <= 0.25
        stored = client.call(live_pb2_grpc.LiveServiceStub(client.channel).GetLiveSession,
                             lpb.GetLiveSessionRequest(name=ended.session.name))
        assert [s.text for s in stored.segments] == [s.text for s in segments]  # the live transcript stays
        assert stored.committed_size == len(pcm)


def _kill_serving(edge: Any) -> int:
    """SIGKILL the replica that holds the live stream (the one with an active live stream)."""
    for i, proc in enumerate(edge.procs):
        if proc is not None and proc.alive() and any(
                ln.get("event") == "live_stream_started" for ln in _lines(proc)):
            proc.kill()
            return i
    raise AssertionError("no replica holds the stream")


def _lines(proc: Any) -> list[dict[str, Any]]:
    from tests.support import log_lines
    return log_lines(proc)


def test_a_killed_replica_loses_no_byte_and_repeats_no_segment(edge: Any, key_a: str,
                                                               lecture: tuple[bytes, str]) -> None:
    pcm, text = lecture
    segments: list[lpb.LiveSegment] = []
    killed: list[int] = []

    def on_event(e: lpb.StreamLiveResponse) -> None:
        if e.WhichOneof("event") == "segment":
            segments.append(e.segment)
            if len(segments) == 1 and not killed:  # mid-stream, after the first final segment
                killed.append(_kill_serving(edge))

    with Client(f"127.0.0.1:{edge.port}", key_a) as client:
        captions = LiveCaptions(client, _config())
        ended = captions.run(pcm_chunks(pcm), on_event, realtime=True)
        assert killed and captions.reconnects >= 1
        ids = [s.id for s in segments]
        assert ids == list(range(len(ids))), ids  # no gap, no duplicate
        assert jiwer.wer(_norm(text), _norm(" ".join(s.text for s in segments))) <= 0.3
        media = client.wait_media(ended.media)
        assert media.size_bytes == len(pcm) + 44
    from storage.db import Media, connection
    from storage.objects import make_store
    from mp4totext.config import from_env

    with connection():
        row = Media.get_by_id(ended.media.split("/", 1)[1])
    store = make_store(from_env(edge.stack.env))
    path = edge.tmp / "recording.wav"
    store.get_file(row.object_key, str(path))
    assert hashlib.sha256(path.read_bytes()[44:]).hexdigest() == hashlib.sha256(pcm).hexdigest()
    edge.start_server(killed[0])


def test_a_full_replica_refuses_with_retry_info(stack: Any, key_a: str, lecture: tuple[bytes, str]) -> None:
    proc, target = stack.launch_server(MP4T_LIVE_MAX_STREAMS="1")
    pcm, _ = lecture
    try:
        with Client(target, key_a) as client:
            hold = threading.Event()

            def first() -> Any:
                def chunks() -> Any:
                    yield from pcm_chunks(pcm[:64000])
                    hold.wait(30)
                return LiveCaptions(client, _config()).run(chunks(), realtime=True)

            t = threading.Thread(target=first, daemon=True)
            t.start()
            wait_for(lambda: any(ln.get("event") == "live_stream_started" for ln in _lines(proc)), 60,
                     "the first stream")
            stub = live_pb2_grpc.LiveServiceStub(client.channel)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.StreamLive(iter([lpb.StreamLiveRequest(start=lpb.StartLive(config=_config()))]),
                                     metadata=client._md(), timeout=30))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
            status = rpc_status.from_call(err.value)
            infos = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
            assert infos, "RetryInfo missing"
            hold.set()
            t.join(60)
    finally:
        proc.stop()


def test_another_user_cannot_attach(stack: Any, key_a: str, lecture: tuple[bytes, str]) -> None:
    pcm, _ = lecture
    with Client(stack.target, key_a) as admin:
        alice = admin.create_user_token("alice").token
        bob = admin.create_user_token("bob").token
    with Client(stack.target, alice) as a:
        ended = LiveCaptions(a, _config()).run(pcm_chunks(pcm[:96000]))
        name = ended.session.name
    with Client(stack.target, bob) as b:
        stub = live_pb2_grpc.LiveServiceStub(b.channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetLiveSession(lpb.GetLiveSessionRequest(name=name), metadata=b._md())
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            list(stub.StreamLive(iter([lpb.StreamLiveRequest(resume=lpb.ResumeLive(session=name))]),
                                 metadata=b._md(), timeout=30))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
