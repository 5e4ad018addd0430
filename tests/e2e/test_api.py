"""The public API end to end against the distributed stack (2 servers, workers, RabbitMQ, S3, PostgreSQL)."""
from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from typing import Any, Iterator

import grpc
import pytest

from mp4totext import samples
from mp4totext.client import Client
from mp4totext.v1 import media_pb2
from mp4totext.v1 import transcription_pb2 as tpb
from tests.support import SPEECH_TEXT, PeakRss, Stack, dead_letters, metric, wait_for

MiB = 1024 * 1024


def raw_upload(client: Client, chunks: list[bytes], filename: str = "f.mp4", size: int = 0, sha: str = "",
               request_id: str = "", first: Any = None) -> media_pb2.UploadMediaResponse:
    def reqs() -> Iterator[media_pb2.UploadMediaRequest]:
        yield first or media_pb2.UploadMediaRequest(metadata=media_pb2.UploadMetadata(
            filename=filename, size_bytes=size, sha256=sha, request_id=request_id))
        for c in chunks:
            yield media_pb2.UploadMediaRequest(chunk=media_pb2.UploadChunk(data=c))

    return client.media.UploadMedia(reqs(), metadata=client.metadata, timeout=120)


def tenant_keys(s3_client: Any, stack: Stack, tenant_id: str) -> list[str]:
    return [o.object_name for o in s3_client.list_objects(stack.s3["bucket"], prefix=f"media/{tenant_id}/",
                                                          recursive=True)]


def incomplete_uploads(s3_client: Any, stack: Stack) -> list[Any]:
    return list(s3_client._list_multipart_uploads(stack.s3["bucket"]).uploads)  # noqa: SLF001


def tenant_of(key: str) -> str:
    from server.auth import Authenticator

    return Authenticator().tenant_for(f"Bearer {key}")


def wait_state(client: Client, name: str, states: tuple[int, ...], timeout: float = 120) -> tpb.Transcription:
    return wait_for(lambda: (j := client.get(name)).state in states and j, timeout, f"{name} in {states}", 0.2)


# ---------------------------------------------------------------- happy path


@pytest.mark.fast  # the fast tier's main path (scripts/test.sh --fast)
def test_transcribe_end_to_end(client: Client, speech_mp4: Any) -> None:
    media = client.upload(str(speech_mp4), content_type="video/mp4")
    assert media.name.startswith("media/") and media.size_bytes == os.path.getsize(speech_mp4)
    assert media.sha256 == hashlib.sha256(speech_mp4.read_bytes()).hexdigest()
    job = client.create(media.name, language_code="auto", priority=tpb.PRIORITY_HIGH)
    assert job.state == tpb.TRANSCRIPTION_STATE_QUEUED and job.create_time.seconds > 0
    events = list(client.watch(job.name))
    assert events[-1].state == tpb.TRANSCRIPTION_STATE_SUCCEEDED
    seqs = [e.sequence for e in events if not e.heartbeat]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    progress = [e.progress_percent for e in events if not e.heartbeat]
    assert progress == sorted(progress) and progress[-1] == 100.0
    assert any(e.stage == tpb.TRANSCRIPTION_STAGE_TRANSCRIBING for e in events)

    done = client.get(job.name)
    r = done.result
    assert samples.word_error_rate(SPEECH_TEXT, r.text) < 0.35, r.text
    assert r.language_code == "en" and 0.5 < r.language_probability <= 1.0
    assert abs(r.duration.ToTimedelta().total_seconds() - 20) < 10
    assert r.model == "tiny.en"
    assert r.processing_duration.ToNanoseconds() > 0 and done.processed_duration.seconds > 0
    words = [w for s in r.segments for w in s.words]
    assert len(words) >= 40
    for s in r.segments:
        assert s.start_offset.ToNanoseconds() <= s.end_offset.ToNanoseconds()
    for a, b in zip(words, words[1:]):
        assert a.start_offset.ToNanoseconds() <= b.start_offset.ToNanoseconds()
        assert 0.0 <= a.probability <= 1.0
    assert client.get_media(media.name).state == media_pb2.MEDIA_STATE_READY
    basic = client.get(job.name, basic=True)
    assert not basic.HasField("result") and basic.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED


@pytest.mark.parametrize("ext", [".mov", ".mkv", ".webm", ".mp3", ".wav", ".flac"])
def test_formats_are_accepted(client: Client, media_dir: Any, ext: str) -> None:
    path = samples.make_media("Good morning everyone, welcome to the lecture.", str(media_dir / f"fmt{ext}"))
    media = client.upload(path)
    ready = wait_for(lambda: (m := client.get_media(media.name)).state != media_pb2.MEDIA_STATE_PROCESSING and m,
                     60, "media validation")
    assert ready.state == media_pb2.MEDIA_STATE_READY, ready.error_message
    assert ready.duration.ToTimedelta().total_seconds() > 1


def test_list_paging_and_filters(client: Client, speech_mp4: Any) -> None:
    names = {client.upload(str(speech_mp4)).name for _ in range(3)}
    seen: list[str] = []
    token = ""
    while True:
        resp = client.call(client.media.ListMedia, media_pb2.ListMediaRequest(page_size=2, page_token=token))
        assert len(resp.media) <= 2
        seen += [m.name for m in resp.media]
        token = resp.next_page_token
        if not token:
            break
    assert names <= set(seen) and len(seen) == len(set(seen))
    with pytest.raises(grpc.RpcError) as exc:
        client.call(client.media.ListMedia, media_pb2.ListMediaRequest(page_token="garbage"))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------- bad input at upload


def orphans(s3_client: Any, stack: Stack, db: Any, tenant: str) -> list[str]:
    """Objects under the tenant's prefix that no media row owns (what a half upload would leave)."""
    from storage.db import Media

    with db.connection_context():
        owned = {m.id for m in Media.select(Media.id).where(Media.tenant == tenant)}
    return [k for k in tenant_keys(s3_client, stack, tenant) if k.split("/")[2] not in owned]


def _assert_rejected(client: Client, s3_client: Any, stack: Stack, db: Any, key: str, call: Any, needle: str) -> None:
    from storage.db import Media

    tenant = tenant_of(key)
    with db.connection_context():
        before_rows = Media.select().where(Media.tenant == tenant).count()
    with pytest.raises(grpc.RpcError) as exc:
        call()
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value.details()
    assert needle in exc.value.details()
    assert orphans(s3_client, stack, db, tenant) == []
    assert incomplete_uploads(s3_client, stack) == []
    with db.connection_context():
        assert Media.select().where(Media.tenant == tenant).count() == before_rows


def test_bad_uploads_are_rejected_and_leave_nothing(client: Client, s3_client: Any, stack: Stack, db: Any,
                                                    key_a: str) -> None:
    data = os.urandom(12 * MiB)  # > one 8 MiB part: exercises multipart abort
    chunks = [data[i:i + MiB] for i in range(0, len(data), MiB)]
    check = lambda call, needle: _assert_rejected(client, s3_client, stack, db, key_a, call, needle)  # noqa: E731
    check(lambda: raw_upload(client, []), "empty")
    check(lambda: raw_upload(client, [b""]), "empty")
    check(lambda: raw_upload(client, chunks, size=len(data) + 1), "declared")
    check(lambda: raw_upload(client, chunks, size=len(data) - 1), "declared size")
    check(lambda: raw_upload(client, chunks, sha="0" * 64), "sha256 mismatch")
    check(lambda: raw_upload(client, [b"x" * (MiB + 1)]), "1 MiB")
    check(lambda: raw_upload(client, [], size=Stack.MAX_UPLOAD + 1), "upload limit")
    check(lambda: raw_upload(client, [b"abc"], first=media_pb2.UploadMediaRequest(
        chunk=media_pb2.UploadChunk(data=b"abc"))), "metadata")
    check(lambda: raw_upload(client, [b"abc"], filename=""), "filename")
    check(lambda: raw_upload(client, [b"abc"], sha="xyz"), "sha256")


def test_oversize_stream_without_declared_size(client: Client, s3_client: Any, stack: Stack, db: Any,
                                               key_a: str) -> None:
    chunk = b"\0" * MiB
    n = Stack.MAX_UPLOAD // MiB + 1
    _assert_rejected(client, s3_client, stack, db, key_a, lambda: raw_upload(client, [chunk] * n), "upload limit")


def test_cancelled_upload_leaves_nothing(client: Client, s3_client: Any, stack: Stack, db: Any, key_a: str) -> None:
    from storage.db import Media

    tenant = tenant_of(key_a)
    with db.connection_context():
        rows = Media.select().where(Media.tenant == tenant).count()
    sent = threading.Event()

    def reqs() -> Iterator[media_pb2.UploadMediaRequest]:
        yield media_pb2.UploadMediaRequest(metadata=media_pb2.UploadMetadata(filename="x.mp4"))
        for i in range(30):
            yield media_pb2.UploadMediaRequest(chunk=media_pb2.UploadChunk(data=os.urandom(MiB)))
            if i == 20:
                sent.set()
                time.sleep(30)

    future = client.media.UploadMedia.future(reqs(), metadata=client.metadata)
    sent.wait(30)
    time.sleep(1)
    future.cancel()
    wait_for(lambda: incomplete_uploads(s3_client, stack) == [], 30, "multipart upload to be aborted")
    assert orphans(s3_client, stack, db, tenant) == []
    with db.connection_context():
        assert Media.select().where(Media.tenant == tenant).count() == rows


def test_large_upload_with_bounded_server_memory(stack: Stack, client: Client, media_dir: Any) -> None:
    path = media_dir / "big.bin"
    with open(path, "wb") as fh:
        for _ in range(110):
            fh.write(os.urandom(MiB))
    # Both upload paths: one stream (what small files and older clients use) and an upload session
    # (the client's default at this size), each bounded by its part buffers, not by the file.
    for resumable in (False, True):
        with PeakRss(stack.servers[0].pid) as rss:
            media = client.upload(str(path), resumable_upload=resumable)
        assert media.size_bytes == 110 * MiB
        growth = rss.growth / MiB
        assert growth < 80, f"server RSS grew by {growth:.0f} MiB during a 110 MiB upload (session: {resumable})"
    # Random bytes are not media: the worker must say so.
    failed = wait_for(lambda: (m := client.get_media(media.name)).state != media_pb2.MEDIA_STATE_PROCESSING and m,
                      120, "validation")
    assert failed.state == media_pb2.MEDIA_STATE_FAILED and "not a readable audio or video file" in failed.error_message


# ---------------------------------------------------------------- bad media fails cleanly


def test_poison_media_fails_with_reason_and_is_dead_lettered(client: Client, stack: Stack, media_dir: Any,
                                                             speech_mp4: Any) -> None:
    # critical.XQ and the worker's dead-letter counter are shared with every other test of the
    # session: measure what this test adds to them.
    broker_url = stack.env["MP4T_BROKER_URL"]
    critical = stack.workers["critical,low"]
    dead_before = dead_letters(broker_url, "critical")
    counted_before = metric(stack.metrics(critical), "mp4t_dead_letters_total", actor="prepare_media")
    bad = media_dir / "notes.mp4"
    bad.write_bytes(b"this is not a video at all\n" * 1000)
    truncated = media_dir / "truncated.mp4"
    data = speech_mp4.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    silent = media_dir / "silent.mp4"
    import subprocess

    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=red:s=64x64:r=5", "-t", "2",
                    "-c:v", "libx264", str(silent)], check=True)
    expectations = {bad: "not a readable audio or video file", truncated: "", silent: "no audio stream"}
    for path, needle in expectations.items():
        media = client.upload(str(path))
        job = client.create(media.name)  # created while the media is still being validated
        final = wait_state(client, job.name, (tpb.TRANSCRIPTION_STATE_FAILED, tpb.TRANSCRIPTION_STATE_SUCCEEDED))
        m = client.get_media(media.name)
        assert m.state == media_pb2.MEDIA_STATE_FAILED, (path.name, m)
        assert needle in m.error_message and m.error_message
        assert final.state == tpb.TRANSCRIPTION_STATE_FAILED and final.error_reason == "MEDIA_INVALID"
        assert media.name in final.error_message
        # a new transcription of failed media is refused at once
        with pytest.raises(grpc.RpcError) as exc:
            client.create(media.name)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # The job is FAILED before its message is nacked into critical.XQ: wait for the three.
    wait_for(lambda: dead_letters(broker_url, "critical") - dead_before >= 3, 30,
             "three new dead letters in critical.XQ", 0.5)
    assert dead_letters(broker_url, "critical") - dead_before >= 3
    counted = metric(stack.metrics(critical), "mp4t_dead_letters_total", actor="prepare_media") - counted_before
    assert counted >= 3


# ---------------------------------------------------------------- auth and isolation


def test_authentication_required(stack: Stack) -> None:
    for key in ("", "m2t_not-a-real-key"):
        with Client(stack.target, key) as c:
            with pytest.raises(grpc.RpcError) as exc:
                c.media.ListMedia(media_pb2.ListMediaRequest(), metadata=c.metadata if key else None)
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer" in exc.value.details()


def test_tenant_isolation(client: Client, client_b: Client, speech_mp4: Any) -> None:
    media = client.upload(str(speech_mp4))
    job = client.create(media.name)
    calls = [
        lambda: client_b.get_media(media.name),
        lambda: client_b.get(job.name),
        lambda: client_b.call(client_b.transcriptions.CancelTranscription, tpb.CancelTranscriptionRequest(name=job.name)),
        lambda: client_b.call(client_b.transcriptions.DeleteTranscription, tpb.DeleteTranscriptionRequest(name=job.name)),
        lambda: client_b.call(client_b.media.DeleteMedia, media_pb2.DeleteMediaRequest(name=media.name, force=True)),
        lambda: client_b.create(media.name),
        lambda: next(iter(client_b.transcriptions.WatchTranscription(
            tpb.WatchTranscriptionRequest(name=job.name), metadata=client_b.metadata))),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as exc:
            call()
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND, exc.value.details()
    listed = client_b.call(client_b.media.ListMedia, media_pb2.ListMediaRequest(page_size=1000))
    assert media.name not in {m.name for m in listed.media}
    listed_jobs = client_b.call(client_b.transcriptions.ListTranscriptions,
                                tpb.ListTranscriptionsRequest(page_size=1000))
    assert job.name not in {j.name for j in listed_jobs.transcriptions}
    assert client.wait(job.name).state == tpb.TRANSCRIPTION_STATE_SUCCEEDED


# ---------------------------------------------------------------- idempotency, validation


def test_idempotent_create_and_upload(client: Client, speech_mp4: Any) -> None:
    rid = str(uuid.uuid4())
    m1 = client.upload(str(speech_mp4), request_id=rid)
    m2 = client.upload(str(speech_mp4), request_id=rid)
    assert m1.name == m2.name
    jrid = str(uuid.uuid4())
    j1 = client.create(m1.name, request_id=jrid)
    j2 = client.create(m1.name, request_id=jrid)
    assert j1.name == j2.name and j1.request_id == jrid
    listed = client.call(client.transcriptions.ListTranscriptions,
                         tpb.ListTranscriptionsRequest(media=m1.name, page_size=100))
    assert [j.name for j in listed.transcriptions] == [j1.name]
    assert client.wait(j1.name).state == tpb.TRANSCRIPTION_STATE_SUCCEEDED


def test_create_validation(client: Client, speech_mp4: Any) -> None:
    media = client.upload(str(speech_mp4))
    bad = [
        ({"language_code": "xx-invalid"}, "language_code"),
        ({"language_code": "tr", "model": "tiny.en"}, "only recognises English"),
        ({"beam_size": 99}, "beam_size"),
        ({"priority": 42}, "priority"),
    ]
    for config, needle in bad:
        with pytest.raises(grpc.RpcError) as exc:
            client.create(media.name, **config)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in exc.value.details()
    for name, code in (("media/nope", grpc.StatusCode.INVALID_ARGUMENT),
                       ("media/" + "0" * 32, grpc.StatusCode.NOT_FOUND)):
        with pytest.raises(grpc.RpcError) as exc:
            client.create(name)
        assert exc.value.code() == code


# ---------------------------------------------------------------- cancel, delete


def test_cancel_running_transcription(client: Client, long_speech: Any) -> None:
    media = client.upload(str(long_speech))
    job = client.create(media.name)
    wait_for(lambda: client.get(job.name).progress_percent > 8, 180, "transcription to make progress", 0.2)
    cancelled = client.call(client.transcriptions.CancelTranscription, tpb.CancelTranscriptionRequest(name=job.name))
    assert cancelled.cancel_requested or cancelled.state == tpb.TRANSCRIPTION_STATE_CANCELLED
    final = wait_state(client, job.name, (tpb.TRANSCRIPTION_STATE_CANCELLED, tpb.TRANSCRIPTION_STATE_SUCCEEDED), 30)
    assert final.state == tpb.TRANSCRIPTION_STATE_CANCELLED
    assert final.progress_percent < 90
    # a queued job is cancelled at once
    queued = client.create(media.name)
    again = client.call(client.transcriptions.CancelTranscription, tpb.CancelTranscriptionRequest(name=queued.name))
    final2 = wait_state(client, queued.name, (tpb.TRANSCRIPTION_STATE_CANCELLED,), 30)
    assert final2.stage == tpb.TRANSCRIPTION_STAGE_DONE and again.name == queued.name


def test_delete_removes_rows_and_objects(client: Client, speech_mp4: Any, s3_client: Any, stack: Stack,
                                         key_a: str) -> None:
    media = client.upload(str(speech_mp4))
    job = client.create(media.name)
    client.wait(job.name)
    media_id = media.name.split("/")[1]
    keys = [k for k in tenant_keys(s3_client, stack, tenant_of(key_a)) if media_id in k]
    assert len(keys) == 2  # original + extracted audio
    with pytest.raises(grpc.RpcError) as exc:
        client.call(client.media.DeleteMedia, media_pb2.DeleteMediaRequest(name=media.name))
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    resp = client.call(client.media.DeleteMedia, media_pb2.DeleteMediaRequest(name=media.name, force=True))
    assert resp.deleted_transcriptions == 1
    assert [k for k in tenant_keys(s3_client, stack, tenant_of(key_a)) if media_id in k] == []
    for call in (lambda: client.get_media(media.name), lambda: client.get(job.name)):
        with pytest.raises(grpc.RpcError) as exc:
            call()
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------- watch


def test_watch_from_two_servers_and_resume(stack: Stack, key_a: str, longer_speech: Any) -> None:
    clients = [Client(t, key_a) for t in stack.targets]
    try:
        media = clients[0].upload(str(longer_speech))
        job = clients[0].create(media.name)
        results: dict[int, list[Any]] = {}

        def watch(i: int) -> None:
            results[i] = list(clients[i].watch(job.name))

        threads = [threading.Thread(target=watch, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        # Meanwhile: a stream that breaks after a few events, then resumes from its last sequence.
        stream = clients[1].transcriptions.WatchTranscription(tpb.WatchTranscriptionRequest(name=job.name),
                                                               metadata=clients[1].metadata)
        first = []
        for ev in stream:
            if not ev.heartbeat:
                first.append(ev)
            if len(first) >= 3 and ev.stage == tpb.TRANSCRIPTION_STAGE_TRANSCRIBING:
                break
        stream.cancel()
        last = first[-1].sequence
        resumed = list(clients[0].watch(job.name, after_sequence=last))
        for t in threads:
            t.join(timeout=300)
        changes = [e for e in resumed if not e.heartbeat]
        assert changes[0].sequence > last
        assert all(e.sequence == last for e in resumed[: resumed.index(changes[0])])
        assert resumed[-1].state == tpb.TRANSCRIPTION_STATE_SUCCEEDED
        for i in range(2):
            evs = [e for e in results[i] if not e.heartbeat]
            live = [e for e in evs if e.stage == tpb.TRANSCRIPTION_STAGE_TRANSCRIBING]
            assert len(live) >= 5, f"server {i} delivered {len(live)} live progress events"
            assert evs[-1].state == tpb.TRANSCRIPTION_STATE_SUCCEEDED
            assert [e.sequence for e in evs] == sorted({e.sequence for e in evs})
    finally:
        for c in clients:
            c.close()


def test_watch_heartbeats_while_idle(stack: Stack, key_a: str, speech_mp4: Any) -> None:
    """With the high worker stopped, a queued job is idle: Watch must still send heartbeats."""
    with Client(stack.target, key_a) as c:
        stack.workers["high"].stop()
        try:
            media = c.upload(str(speech_mp4))
            job = c.create(media.name)
            beats = 0
            started = time.monotonic()
            stream = c.transcriptions.WatchTranscription(tpb.WatchTranscriptionRequest(name=job.name),
                                                         metadata=c.metadata)
            for ev in stream:
                beats += ev.heartbeat
                if beats >= 2:
                    break
            stream.cancel()
            # MP4T_WATCH_HEARTBEAT_S=2 in the stack; production default is 10 s (< 15 s).
            assert beats == 2 and time.monotonic() - started < 15
        finally:
            stack.start_worker("high")
        assert c.wait(job.name).state == tpb.TRANSCRIPTION_STATE_SUCCEEDED
