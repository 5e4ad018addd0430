"""Resumable upload (upload sessions) against the real stack: two servers behind real HAProxy,
S3 (SeaweedFS), PostgreSQL, RabbitMQ and the workers that prepare media.

The 100 MB file is real media generated with ffmpeg (uncompressed video + a tone: fast to make,
and it probes, so it ends READY); it lives in the session's temporary media folder.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import signal
import subprocess
import threading
import time
import uuid
from typing import Any, Iterator

import grpc
import pytest

from mp4totext.client import Client
from mp4totext.resumable import FileChanged, committed_size_of
from mp4totext.v1 import media_pb2
from tests.e2e.test_haproxy import Edge
from tests.support import Stack, metric, wait_for
from tests.support.procs import log_lines

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def big_media(media_dir: pathlib.Path) -> pathlib.Path:
    """About 100 MB of real media: 9 s of raw 640x480 video and a 440 Hz tone in Matroska."""
    path = media_dir / "big-raw.mkv"
    if not path.exists():
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=640x480:rate=25",
                        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000", "-t", "9",
                        "-c:v", "rawvideo", "-pix_fmt", "yuv420p", "-c:a", "pcm_s16le", str(path)], check=True)
    assert path.stat().st_size > 95 * MiB
    return path


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


CREATED: list[str] = []  # sessions to delete when the module ends


@pytest.fixture(scope="module", autouse=True)
def no_sessions_left_behind(stack: Stack, key_a: str) -> Iterator[None]:
    """Unfinished sessions keep multipart uploads in the bucket, which other modules of the session
    check is empty: delete what the tests left (a completed session's delete keeps its media).
    The tests' sessions are all tenant A's (the tenant's key sees its users' sessions too)."""
    yield
    with Client(stack.target, key_a) as c:
        for name in CREATED:
            try:
                c.media.DeleteUploadSession(media_pb2.DeleteUploadSessionRequest(name=name), metadata=c.metadata,
                                            timeout=30)
            except grpc.RpcError as exc:  # already gone (deleted, expired)
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc


def create_session(client: Client, size: int, sha: str, filename: str = "f.bin",
                   request_id: str = "") -> media_pb2.UploadSession:
    s = client.call(client.media.CreateUploadSession, media_pb2.CreateUploadSessionRequest(
        metadata=media_pb2.UploadMetadata(filename=filename, size_bytes=size, sha256=sha,
                                          request_id=request_id or str(uuid.uuid4()))))
    CREATED.append(s.name)
    return s


def write(client: Client, session: str, offset: int, data: bytes, chunk: int = MiB) -> media_pb2.WriteUploadResponse:
    """One raw WriteUpload stream: ``data`` from ``offset``, then the client half-closes."""
    def reqs() -> Iterator[media_pb2.WriteUploadRequest]:
        yield media_pb2.WriteUploadRequest(upload_session=session, write_offset=offset, data=data[:chunk])
        for i in range(chunk, len(data), chunk):
            yield media_pb2.WriteUploadRequest(data=data[i:i + chunk])

    return client.media.WriteUpload(reqs(), metadata=client.metadata, timeout=120)


def get_session(client: Client, name: str) -> media_pb2.UploadSession:
    return client.media.GetUploadSession(media_pb2.GetUploadSessionRequest(name=name), metadata=client.metadata,
                                         timeout=30)


def multipart_ids(s3_client: Any, stack: Stack) -> set[str]:
    return {u.upload_id for u in s3_client._list_multipart_uploads(stack.s3["bucket"]).uploads}  # noqa: SLF001


def session_row(db: Any, name: str) -> Any:
    from storage.tenancy import UploadSession

    with db.connection_context():
        return UploadSession.get_or_none(UploadSession.id == name.split("/", 1)[1])


# ---------------------------------------------------------------- the headline case


def test_100mb_upload_survives_sigkill_of_its_replica(edge: Edge, key_a: str, big_media: pathlib.Path,
                                                      s3_client: Any, stack: Stack, db: Any) -> None:
    """SIGKILL the replica receiving the stream at 60 %: the client resumes through HAProxy on the
    other one, re-sends at most one part, and the media ends READY with the file's sha256."""
    size = big_media.stat().st_size
    at_60, killed = threading.Event(), threading.Event()

    def progress(sent: int, total: int) -> None:
        if sent >= 0.6 * total and not killed.is_set():
            at_60.set()
            killed.wait(60)  # the stream pauses here until its server is dead

    victim: list[int] = []

    def killer() -> None:
        at_60.wait(300)
        holders = wait_for(lambda: [i for i in range(2) if metric(
            edge.stack.metrics(edge.procs[i]), "grpc_server_in_flight", grpc_type="client_stream") > 0], 20,
            "the upload stream on a server")
        victim.append(holders[0])
        edge.procs[holders[0]].kill(signal.SIGKILL)
        killed.set()

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        with Client(edge.target, key_a, retries=20) as c:
            started = time.monotonic()
            media = c.upload(str(big_media), content_type="video/x-matroska", on_progress=progress, timeout=600)
            stats = c.upload_stats
            session = get_session(c, stats.session)
            elapsed = time.monotonic() - started
            assert victim, "the replica was not killed"
            assert stats.resumed >= 1 and stats.streams >= 2, stats
            # Stored parts are never sent again: at most one part (the one in flight) twice.
            assert size <= stats.bytes_sent <= size + session.part_size_bytes, (stats, session.part_size_bytes)
            assert media.size_bytes == size and media.sha256 == sha256(big_media)
            assert session.state == media_pb2.UPLOAD_SESSION_STATE_COMPLETED and session.media == media.name
            ready = wait_for(lambda: (m := c.get_media(media.name)).state != media_pb2.MEDIA_STATE_PROCESSING and m,
                             240, "the media prepared")
            assert ready.state == media_pb2.MEDIA_STATE_READY, ready.error_message
            assert ready.sha256 == sha256(big_media)
    finally:
        killed.set()
        thread.join(timeout=60)
        if victim:
            edge.start_server(victim[0])
            wait_for(lambda: edge.states().get(f"s{victim[0] + 1}") == "UP", 30, "the restarted server UP")
    row = session_row(db, session.name)
    assert row.upload_id not in multipart_ids(s3_client, stack)  # completed: no parts left behind
    print(f"100 MB resumable upload with a SIGKILL: {elapsed:.1f} s, {stats.bytes_sent - size} bytes re-sent")


# ---------------------------------------------------------------- refusals


def test_paused_stream_commits_whole_parts_and_wrong_offset_is_refused(client: Client, stack: Stack) -> None:
    data = os.urandom(12 * MiB)
    s = create_session(client, len(data), hashlib.sha256(data).hexdigest())
    part = s.part_size_bytes
    assert s.state == media_pb2.UPLOAD_SESSION_STATE_ACTIVE and s.committed_size == 0 and part >= 5 * MiB
    assert part < len(data)  # two parts at least, or this test proves nothing
    # The client pauses after part + 1 MiB: only the whole part is committed.
    paused = write(client, s.name, 0, data[:part + MiB])
    assert paused.committed_size == part and not paused.HasField("media")
    assert get_session(client, s.name).committed_size == part
    with pytest.raises(grpc.RpcError) as err:  # resuming where the client stopped, not where the server is
        write(client, s.name, part + MiB, data[part + MiB:])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"committed size {part}" in err.value.details()
    assert committed_size_of(err.value) == part
    done = write(client, s.name, part, data[part:])
    assert done.committed_size == len(data) and done.media.size_bytes == len(data)
    assert done.media.sha256 == hashlib.sha256(data).hexdigest()
    # Writing to a completed session again answers the same media (a lost answer retried).
    again = write(client, s.name, 0, b"")
    assert again.media.name == done.media.name


def test_wrong_sha256_is_refused_and_no_media_row_exists(client: Client, stack: Stack, db: Any,
                                                         s3_client: Any) -> None:
    from storage.db import Media

    data = os.urandom(6 * MiB)
    s = create_session(client, len(data), hashlib.sha256(b"something else").hexdigest())
    with pytest.raises(grpc.RpcError) as err:
        write(client, s.name, 0, data)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in err.value.details()
    failed = get_session(client, s.name)
    assert failed.state == media_pb2.UPLOAD_SESSION_STATE_FAILED and "sha256" in failed.error_message
    assert failed.media == ""
    row = session_row(db, s.name)
    with db.connection_context():
        assert Media.get_or_none(Media.id == row.media_id) is None
    assert list(s3_client.list_objects(stack.s3["bucket"], prefix=row.object_key)) == []
    assert row.upload_id not in multipart_ids(s3_client, stack)
    with pytest.raises(grpc.RpcError) as again:  # a failed session takes no more data
        write(client, s.name, 0, data)
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_create_requires_size_and_sha256(client: Client) -> None:
    for size, sha in ((0, "a" * 64), (10, ""), (10, "xyz")):
        with pytest.raises(grpc.RpcError) as err:
            client.media.CreateUploadSession(media_pb2.CreateUploadSessionRequest(
                metadata=media_pb2.UploadMetadata(filename="f", size_bytes=size, sha256=sha)),
                metadata=client.metadata, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_create_is_idempotent_by_request_id(client: Client) -> None:
    rid = str(uuid.uuid4())
    first = create_session(client, 10, "a" * 64, request_id=rid)
    assert create_session(client, 10, "a" * 64, request_id=rid).name == first.name


def test_another_tenant_gets_not_found(client: Client, client_b: Client) -> None:
    data = os.urandom(1000)
    s = create_session(client, len(data), hashlib.sha256(data).hexdigest())
    calls = [lambda: get_session(client_b, s.name),
             lambda: write(client_b, s.name, 0, data),
             lambda: client_b.media.DeleteUploadSession(media_pb2.DeleteUploadSessionRequest(name=s.name),
                                                        metadata=client_b.metadata, timeout=30)]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert get_session(client, s.name).state == media_pb2.UPLOAD_SESSION_STATE_ACTIVE  # untouched
    assert write(client, s.name, 0, data).media.size_bytes == len(data)


def test_end_users_see_only_their_own_sessions(stack: Stack, client: Client) -> None:
    """A session made with alice's token: bob's token gets NOT_FOUND, the tenant's key sees it,
    and the media it becomes is alice's."""
    data = os.urandom(1000)
    with Client(stack.target, client.create_user_token("alice").token) as alice, \
            Client(stack.target, client.create_user_token("bob").token) as bob:
        s = create_session(alice, len(data), hashlib.sha256(data).hexdigest())
        with pytest.raises(grpc.RpcError) as err:
            get_session(bob, s.name)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            write(bob, s.name, 0, data)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert get_session(client, s.name).name == s.name
        media = write(alice, s.name, 0, data).media
        assert alice.get_media(media.name).name == media.name
        with pytest.raises(grpc.RpcError) as err:
            bob.get_media(media.name)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_delete_aborts_the_parts(client: Client, stack: Stack, db: Any, s3_client: Any) -> None:
    data = os.urandom(9 * MiB)  # one part of the 8 MiB default and then some
    s = create_session(client, 12 * MiB, hashlib.sha256(data).hexdigest())
    assert write(client, s.name, 0, data).committed_size == s.part_size_bytes
    upload_id = session_row(db, s.name).upload_id
    assert upload_id in multipart_ids(s3_client, stack)
    client.media.DeleteUploadSession(media_pb2.DeleteUploadSessionRequest(name=s.name), metadata=client.metadata,
                                     timeout=30)
    assert upload_id not in multipart_ids(s3_client, stack)
    with pytest.raises(grpc.RpcError) as err:
        get_session(client, s.name)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_client_stops_with_a_clear_error_when_the_file_shrinks(client: Client, tmp_path: pathlib.Path) -> None:
    """The file is truncated from 12 to 9 MiB while it streams: the stream ends early, the server
    commits the whole part it got, and the client says the file changed instead of resuming forever."""
    path = tmp_path / "shrinks.bin"
    path.write_bytes(os.urandom(12 * MiB))

    def shrink(sent: int, total: int) -> None:
        if sent == MiB:
            os.truncate(path, 9 * MiB)

    outcome: list[Any] = []

    def upload() -> None:
        try:
            outcome.append(client.upload(str(path), resumable_upload=True, on_progress=shrink, timeout=60))
        except Exception as exc:  # the test looks at what it is
            outcome.append(exc)

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    thread.join(60)
    name = client.upload_stats.session
    CREATED.append(name)
    if thread.is_alive():  # it never gave up: deleting its session ends the loop (NOT_FOUND)
        client.media.DeleteUploadSession(media_pb2.DeleteUploadSessionRequest(name=name), metadata=client.metadata,
                                         timeout=30)
        thread.join(30)
        pytest.fail(f"the client kept resuming an upload whose file shrank ({client.upload_stats})")
    (err,) = outcome
    assert isinstance(err, FileChanged), err
    assert f"has {9 * MiB} bytes now, {12 * MiB} when the upload started" in str(err)
    part = get_session(client, name).part_size_bytes
    assert f"{part} bytes are committed in {name}" in str(err)


# ---------------------------------------------------------------- maintenance


def _maintenance_runs(stack: Stack) -> int:
    return sum(1 for ln in log_lines(stack.workers["critical,low"])
               if ln.get("event") == "stage_finished" and ln.get("outcome") == "maintenance")


def test_maintenance_expires_abandoned_sessions_and_keeps_live_ones(client: Client, stack: Stack, db: Any,
                                                                    s3_client: Any) -> None:
    """An expired session's parts are aborted and its row deleted; a live session's parts survive
    the stale-multipart sweep (MP4T_STALE_UPLOAD_S is 30 s in the test stack) and it completes."""
    from storage.tenancy import UploadSession

    data = os.urandom(12 * MiB)
    sha = hashlib.sha256(data).hexdigest()
    abandoned, live = create_session(client, len(data), sha), create_session(client, len(data), sha)
    created = time.monotonic()
    part = abandoned.part_size_bytes
    for s in (abandoned, live):
        assert write(client, s.name, 0, data[:part]).committed_size == part
    gone = session_row(db, abandoned.name)
    assert gone.upload_id in multipart_ids(s3_client, stack)
    with db.connection_context():  # its week is over
        UploadSession.update(expire_time=gone.create_time).where(UploadSession.id == gone.id).execute()
    wait_for(lambda: session_row(db, abandoned.name) is None, 60, "maintenance to delete the expired session")
    assert gone.upload_id not in multipart_ids(s3_client, stack)
    with pytest.raises(grpc.RpcError) as err:
        get_session(client, abandoned.name)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # Two sweeps after the live session's multipart upload is older than the stale-upload limit:
    stale_s = float(stack.env["MP4T_STALE_UPLOAD_S"])
    wait_for(lambda: time.monotonic() > created + stale_s + 1, stale_s + 10, "the live upload to be 'stale'", 0.5)
    runs = _maintenance_runs(stack)
    wait_for(lambda: _maintenance_runs(stack) >= runs + 2, 60, "two maintenance sweeps", 0.5)
    assert session_row(db, live.name).upload_id in multipart_ids(s3_client, stack)
    done = write(client, live.name, part, data[part:])
    assert done.media.sha256 == sha


# ---------------------------------------------------------------- v1 compatibility


def test_single_stream_upload_still_works(edge: Edge, key_a: str, speech_mp4: pathlib.Path) -> None:
    with Client(edge.target, key_a, retries=10) as c:
        small = c.upload(str(speech_mp4))  # below the resumable threshold: one UploadMedia stream
        assert c.upload_stats.streams == 0
        forced = c.upload(str(speech_mp4), resumable_upload=False)
        sessioned = c.upload(str(speech_mp4), resumable_upload=True)
        assert c.upload_stats.streams == 1
        for m in (small, forced, sessioned):
            assert m.sha256 == sha256(speech_mp4)
            ready = wait_for(lambda m=m: (x := c.get_media(m.name)).state != media_pb2.MEDIA_STATE_PROCESSING
                             and x, 120, "media prepared")
            assert ready.state == media_pb2.MEDIA_STATE_READY, ready.error_message
