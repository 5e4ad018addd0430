"""Hostile clients get clean answers (issue 10): each finding of the abuse run, against the
session stack (PostgreSQL) and, where the database matters, a second server on SQLite.

Before the fixes every case here answered INTERNAL/UNAVAILABLE, leaked memory, hung or left
data behind (see the issue); each test names its finding.
"""
from __future__ import annotations

import json
import pathlib
import struct
import subprocess
import uuid
from typing import Any, Iterator

import grpc
import psutil
import pytest

from mp4totext.v1 import media_pb2, media_pb2_grpc
from mp4totext.v1 import transcription_pb2 as tpb
from mp4totext.v1 import transcription_pb2_grpc
from tests.support import CLI, Proc, Stack, log_lines, metric, wait_for

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def sqlite_server(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A server on SQLite (same S3, in-memory broker): target and an API key of its own."""
    data = tmp_path_factory.mktemp("sqlite-server")
    env = {**stack.env, "MP4T_DATABASE_URL": f"sqlite:///{data}/db.sqlite3", "MP4T_BROKER_URL": "memory",
           "MP4T_DATA_DIR": str(data)}
    out = subprocess.run([*CLI, "create-key", "--tenant", "hostile"], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    key = json.loads(out.stdout.strip().splitlines()[-1])["api_key"]
    proc, target = stack.launch_server(**{k: env[k] for k in ("MP4T_DATABASE_URL", "MP4T_BROKER_URL",
                                                             "MP4T_DATA_DIR")})
    try:
        yield target, key
    finally:
        proc.stop()


@pytest.fixture(params=["postgresql", "sqlite"])
def server(request: pytest.FixtureRequest, stack: Stack, key_a: str) -> tuple[str, str]:
    if request.param == "postgresql":
        return stack.target, key_a
    return request.getfixturevalue("sqlite_server")


def md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def upload_raw(target: str, key: str, metadata: media_pb2.UploadMetadata, data: bytes = b"x" * 1000
               ) -> tuple[grpc.StatusCode, str]:
    def reqs() -> Iterator[media_pb2.UploadMediaRequest]:
        yield media_pb2.UploadMediaRequest(metadata=metadata)
        yield media_pb2.UploadMediaRequest(chunk=media_pb2.UploadChunk(data=data))

    with grpc.insecure_channel(target) as ch:
        return code_of(lambda: media_pb2_grpc.MediaServiceStub(ch).UploadMedia(reqs(), metadata=md(key), timeout=30))


def test_out_of_range_values_and_forged_tokens_are_invalid_argument(server: tuple[str, str]) -> None:
    """Finding: INTERNAL from our own code for enums out of range, forged page tokens and a
    2^62 s caption duration."""
    import base64

    target, key = server
    with grpc.insecure_channel(target) as ch:
        media = media_pb2_grpc.MediaServiceStub(ch)
        jobs = transcription_pb2_grpc.TranscriptionServiceStub(ch)
        for state in (max(media_pb2.MediaState.values()) + 1, 99, -1, 2**31 - 1):
            assert code_of(lambda: media.ListMedia(media_pb2.ListMediaRequest(state=state), metadata=md(key)))[0] \
                == grpc.StatusCode.INVALID_ARGUMENT, state
        for state in (max(tpb.TranscriptionState.values()) + 1, 99, -1, 2**31 - 1):
            assert code_of(lambda: jobs.ListTranscriptions(tpb.ListTranscriptionsRequest(state=state),
                                                           metadata=md(key)))[0] == grpc.StatusCode.INVALID_ARGUMENT
        forged = [{"t": "2026-01-01T00:00:00", "id": ["a"], "f": {}},
                  {"t": "2026-01-01T00:00:00", "id": "a\x00b", "f": {}},
                  {"t": "2026-01-01T00:00:00", "id": "0" * 32, "f": []}]
        for payload in forged:
            token = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()
            got = code_of(lambda: media.ListMedia(media_pb2.ListMediaRequest(page_token=token), metadata=md(key)))
            assert got[0] == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in got[1], got
        req = tpb.ExportTranscriptionRequest(name="transcriptions/" + "0" * 32, format=tpb.EXPORT_FORMAT_SRT)
        req.max_caption_duration.seconds = 2**62
        got = code_of(lambda: list(jobs.ExportTranscription(req, metadata=md(key))))
        assert got[0] == grpc.StatusCode.INVALID_ARGUMENT and "max_caption_duration" in got[1], got


def test_strings_postgresql_cannot_store_and_bad_content_types_are_invalid_argument(server: tuple[str, str]) -> None:
    """Findings: NUL in filename/request ids and a content_type over 255 characters were INTERNAL
    on PostgreSQL (after the whole file was streamed); CR/LF, NUL or non-latin-1 in content_type
    were UNAVAILABLE ("object storage failed") and retried by the Client."""
    target, key = server
    cases = [
        media_pb2.UploadMetadata(filename="a\x00b.mp4"),
        media_pb2.UploadMetadata(filename="a.mp4", request_id="r\x00" + uuid.uuid4().hex),
        media_pb2.UploadMetadata(filename="a.mp4", content_type="video/" + "x" * 300),
        media_pb2.UploadMetadata(filename="a.mp4", content_type="video/mp4\r\nX-Evil: 1"),
        media_pb2.UploadMetadata(filename="a.mp4", content_type="vidéo/mp4"),
        media_pb2.UploadMetadata(filename="a.mp4", content_type="video/mp4\x00"),
    ]
    for metadata in cases:
        got = upload_raw(target, key, metadata)
        assert got[0] == grpc.StatusCode.INVALID_ARGUMENT, (metadata, got)
    with grpc.insecure_channel(target) as ch:
        jobs = transcription_pb2_grpc.TranscriptionServiceStub(ch)
        got = code_of(lambda: jobs.CreateTranscription(tpb.CreateTranscriptionRequest(
            media="media/" + "0" * 32, request_id="x\x00y"), metadata=md(key)))
        assert got[0] == grpc.StatusCode.INVALID_ARGUMENT and "NUL" in got[1], got


def test_echoed_input_is_cut_short(server: tuple[str, str]) -> None:
    """Finding: a 1.5 MB name came back as a 1.5 MB status (past ~16 KB clients see
    RESOURCE_EXHAUSTED and retry)."""
    target, key = server
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 4 * MiB)]) as ch:
        jobs = transcription_pb2_grpc.TranscriptionServiceStub(ch)
        huge = tpb.GetTranscriptionRequest(name="transcriptions/" + "x" * 1_500_000)
        got = code_of(lambda: jobs.GetTranscription(huge, metadata=md(key)))
        assert got[0] in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND) and len(got[1]) < 1200, \
            (got[0], len(got[1]))
        config = tpb.TranscriptionConfig(language_code="q" * 1_000_000)
        got = code_of(lambda: jobs.CreateTranscription(tpb.CreateTranscriptionRequest(
            media="media/" + "0" * 32, config=config), metadata=md(key)))
        assert got[0] in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND) and len(got[1]) < 1200


def _rss(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / MiB


WARM_UP = 20_000
MEASURED = 40_000  # in four steps; the 20 KB-per-request leak found here would add ~780 MiB


def test_bad_requests_are_one_line_each_and_memory_stays_flat(stack: Stack, key_a: str) -> None:
    """Finding: every request that failed to decode added ~20 KB to server memory for good
    (20,000 one-byte GetMedia bodies without a key: 405 -> 781 MiB) and printed a traceback.
    Here 40,000 bad requests of four kinds after a warm-up: undecodable without a key,
    undecodable with one, a NUL in a name, an enum out of range. The bound (30 MiB) catches a
    leak of 0.8 KB a request; the steps are printed, so a slow creep shows in the log."""
    proc, target = stack.launch_server()
    calls = MEASURED
    bad_list = media_pb2.ListMediaRequest(state=99).SerializeToString()
    nul_name = media_pb2.GetMediaRequest(name="media/\x00").SerializeToString()
    kinds = [("/mp4totext.v1.MediaService/GetMedia", b"\xff", ()),
             ("/mp4totext.v1.TranscriptionService/GetTranscription", b"\x0a\x05ab", md(key_a)),
             ("/mp4totext.v1.MediaService/GetMedia", nul_name, md(key_a)),
             ("/mp4totext.v1.MediaService/ListMedia", bad_list, md(key_a))]
    try:
        with grpc.insecure_channel(target) as ch:
            stubs = [(ch.unary_unary(path), body, meta) for path, body, meta in kinds]  # bytes in, bytes out

            def burst(n: int) -> None:
                futures = []
                for i in range(n):
                    stub, body, meta = stubs[i % len(stubs)]
                    futures.append(stub.future(body, metadata=meta, timeout=60))
                    if len(futures) == 64 or i == n - 1:
                        codes = {code_of(f.result)[0] for f in futures}
                        assert codes == {grpc.StatusCode.INVALID_ARGUMENT}, codes
                        futures.clear()

            # Warm up: pools, caches, allocator arenas. Measured 2026-11-25 (RSS after each 50,000
            # after 2,000): 102.6 -> 124.7 -> 129.9 -> 132.4 -> 134.5 MiB: most of the growth is
            # one-time and early, so 2,000 (enough on earlier days) no longer is; 20,000 is.
            burst(WARM_UP)
            steps = [_rss(proc.pid)]
            for _ in range(4):
                burst(calls // 4)
                steps.append(_rss(proc.pid))
            before, after = steps[0], steps[-1]

        def rpc_lines() -> list[dict[str, Any]]:
            return [ln for ln in log_lines(proc) if ln.get("event") == "rpc"]
        # A call's line is written once its reply has gone, so the last few can land a moment after
        # the client has them all (CI read 59,997 of 60,000): wait for them, then check every one.
        try:
            wait_for(lambda: len(rpc_lines()) >= calls + WARM_UP, 30, "every call's log line")
        except TimeoutError:
            pass  # the assert below says how many are missing
        lines = rpc_lines()
    finally:
        proc.stop()
    print(f"\n{calls} bad requests: server RSS " + " -> ".join(f"{x:.1f}" for x in steps) + " MiB")
    assert after - before < 30, f"memory grew by {after - before:.0f} MiB over {calls} bad requests"
    assert len(lines) == calls + WARM_UP and {ln["code"] for ln in lines} == {"INVALID_ARGUMENT"}
    assert "Traceback" not in proc.log()


def test_schema_creation_is_safe_when_processes_start_together(stack: Stack, pg_url: str) -> None:
    """Finding: server and workers started together on an empty PostgreSQL database killed 2 of
    3 processes in init_db (UniqueViolation on pg_type_typname_nsp_index)."""
    import psycopg2

    base, _, _ = pg_url.rpartition("/")
    name = f"mp4t_race_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(base + "/postgres")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    procs: list[Proc] = []
    try:
        env = {**stack.env, "MP4T_DATABASE_URL": f"{base}/{name}", "MP4T_GRPC_LISTEN": "127.0.0.1:0",
               "MP4T_HTTP_LISTEN": "127.0.0.1:0", "MP4T_AGENT_LISTEN": "127.0.0.1:0"}
        for what in ("serve", "serve", "serve", "worker"):
            args = [*CLI, what] + (["--queues", "low"] if what == "worker" else [])
            procs.append(Proc(f"race-{what}", args, env, stack.log_dir))
        for p in procs:
            wait_for(lambda p=p: "server_started" in p.log() or "worker_started" in p.log() or not p.alive(), 90,
                     "every process to start")
            assert p.alive(), p.log()[-2000:]
    finally:
        for p in procs:
            p.stop()
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def _mkv_declaring(seconds: float, path: pathlib.Path, actual_s: float) -> pathlib.Path:
    """An MKV of ``actual_s`` seconds of tone whose header declares ``seconds`` (ffprobe trusts it)."""
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"sine=frequency=440:duration={actual_s}", "-c:a", "libopus", "-b:a", "16k", str(path)],
                   check=True, timeout=120)
    data = bytearray(path.read_bytes())
    at = data.find(b"\x44\x89\x88")  # Segment Info > Duration, an 8-byte float in ms
    assert at > 0, "no Duration element"
    data[at + 3:at + 11] = struct.pack(">d", seconds * 1000.0)
    path.write_bytes(bytes(data))
    probed = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
                             str(path)], capture_output=True, text=True, check=True).stdout
    assert abs(float(probed) - seconds) < 1, probed
    return path


def test_duration_limit_holds_for_what_is_decoded(stack: Stack, client: Any, tmp_path: pathlib.Path) -> None:
    """Finding: the limit was checked against the declared duration: an MKV declaring 3 s but
    holding 613 s passed a 300 s limit, and the reverse was wrongly refused."""
    lying_short = _mkv_declaring(3, tmp_path / "short.mkv", actual_s=45)
    lying_long = _mkv_declaring(40, tmp_path / "long.mkv", actual_s=25)
    stack.restart_worker("critical,low", MP4T_MAX_MEDIA_DURATION_S="30")
    try:
        bad = client.upload(str(lying_short))
        good = client.upload(str(lying_long))
        final = {m.name: wait_for(lambda m=m: (r := client.get_media(m.name)).state != media_pb2.MEDIA_STATE_PROCESSING
                                  and r, 120, "media prepared") for m in (bad, good)}
    finally:
        stack.restart_worker("critical,low")
    assert final[bad.name].state == media_pb2.MEDIA_STATE_FAILED
    assert "longer than the 30 s limit" in final[bad.name].error_message
    assert final[good.name].state == media_pb2.MEDIA_STATE_READY, final[good.name].error_message


def test_ffmpeg_errors_reach_users_without_heap_addresses(client: Any, tmp_path: pathlib.Path) -> None:
    """Finding: ffprobe messages leaked heap addresses ("[mov,mp4,... @ 0x55d1c2a3b4c0]")."""
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + b"\x00" * 5000)
    media = client.upload(str(broken))
    done = wait_for(lambda: (m := client.get_media(media.name)).state == media_pb2.MEDIA_STATE_FAILED and m, 120,
                    "media FAILED")
    assert done.error_message and "0x" not in done.error_message and " @ " not in done.error_message, \
        done.error_message


def test_delete_while_preparing_leaves_nothing_behind(stack: Stack, client: Any, s3_client: Any,
                                                      longer_speech: pathlib.Path) -> None:
    """Finding: DeleteMedia on PROCESSING media returned OK, then the worker wrote audio.wav,
    which was never removed (4 of 4 runs)."""
    import signal

    worker = stack.workers["critical,low"]
    media = client.upload(str(longer_speech))
    media_id = media.name.split("/")[1]

    def started() -> bool:
        return any(ln.get("event") == "stage_started" and ln.get("media_id") == media_id for ln in log_lines(worker))

    wait_for(started, 120, "preparation to start", 0.02)
    worker.kill(signal.SIGSTOP)  # mid-preparation: the audio is not written yet
    try:
        client.call(client.media.DeleteMedia, media_pb2.DeleteMediaRequest(name=media.name))
    finally:
        worker.kill(signal.SIGCONT)
    line = wait_for(lambda: next((ln for ln in log_lines(worker) if ln.get("event") == "stage_finished"
                                  and ln.get("media_id") == media_id), None), 120, "preparation to end")
    prefix = f"media/{line['tenant_id']}/{media_id}/"
    left = [o.object_name for o in s3_client.list_objects(stack.s3["bucket"], prefix=prefix, recursive=True)]
    assert line["outcome"] == "deleted" and left == [], (line, left)


def test_cancel_and_time_limit_hold_on_audio_that_never_reports_progress(stack: Stack, client: Any,
                                                                         tmp_path: pathlib.Path) -> None:
    """Finding: with MP4T_JOB_TIME_LIMIT_S=20, six minutes of white noise with VAD off, cancelled
    after 4 s, ran 67 s and ended SUCCEEDED with cancel_requested=true (the cancel and the limit
    were checked only when a segment came out, and Dramatiq's time-limit watchdog does not run
    under RabbitMQ). The noise is 30 minutes long so that no machine finishes it inside the limit
    (a CI machine three times faster than this one finished six minutes within 20 s)."""
    import time

    noise = tmp_path / "noise.m4a"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "anoisesrc=color=white:amplitude=0.3:duration=1800:sample_rate=16000", "-ac", "1", "-c:a", "aac",
                    "-b:a", "32k", str(noise)], check=True, timeout=120)
    media = client.upload(str(noise))
    stack.restart_worker("high", MP4T_JOB_TIME_LIMIT_S="20")
    try:
        def running(name: str) -> Any:
            return wait_for(lambda: (j := client.get(name)).state == tpb.TRANSCRIPTION_STATE_RUNNING
                            and j.stage == tpb.TRANSCRIPTION_STAGE_TRANSCRIBING and j, 120, "transcription to run", 0.1)

        job = client.create(media.name, enable_vad=False)
        running(job.name)
        time.sleep(4)
        client.call(client.transcriptions.CancelTranscription, tpb.CancelTranscriptionRequest(name=job.name))
        asked = time.monotonic()
        done = client.wait(job.name, timeout=120)
        cancel_s = time.monotonic() - asked
        assert done.state == tpb.TRANSCRIPTION_STATE_CANCELLED, (done.state, done.error_message)
        assert cancel_s < 10, f"cancel took {cancel_s:.1f} s"

        job = client.create(media.name, enable_vad=False)
        started = running(job.name)
        began = time.monotonic()
        done = client.wait(job.name, timeout=180)
        limit_s = time.monotonic() - began
        assert done.state == tpb.TRANSCRIPTION_STATE_FAILED and "time limit of 20 s" in done.error_message, \
            (done.state, done.error_message)
        assert limit_s < 20 + 8, f"the 20 s limit held only after {limit_s:.1f} s"
        def finished() -> list[dict[str, Any]]:
            return [ln for ln in log_lines(stack.workers["high"]) if ln.get("event") == "stage_finished"
                    and ln.get("job_id") == started.name.split("/")[1]]

        # The worker logs the stage's end just after it saved the state the client saw: wait for the line.
        lines = wait_for(finished, 10, "the worker's stage_finished line", 0.1)
        assert [ln["outcome"] for ln in lines] == ["time_limit"], lines
        print(f"\nnoise, VAD off: cancelled {cancel_s:.1f} s after the request; 20 s limit ended it after "
              f"{limit_s:.1f} s")
    finally:
        stack.restart_worker("high")


def test_stalled_upload_streams_cannot_lock_a_replica_out(stack: Stack, db: Any) -> None:
    """Finding: 70 upload streams that sent metadata and then stayed silent (or sent zero-byte
    chunks forever) made the server unresponsive, health included, while /healthz said SERVING."""
    import threading
    import time
    import urllib.request

    from server.auth import create_key

    # Tenants of its own: the session's tenants carry whatever earlier tests left them (quotas,
    # uploads in preparation), which must not decide whether an upload slot is held.
    key_a, key_b = (create_key(f"stall-{c}-{uuid.uuid4().hex[:6]}")[0] for c in "ab")

    # 4 uploads, 2/tenant. The idle timeout must outlast the checks below on a loaded machine: CI once took
    # over 3 s between the first stalled stream and the first refusal, and the reaper had freed its slot.
    proc, target = stack.launch_server(MP4T_GRPC_MAX_WORKERS="8", MP4T_UPLOAD_IDLE_TIMEOUT_S="10")
    stop = threading.Event()
    channel = grpc.insecure_channel(target)
    streams: list[Any] = []

    def stalled(key: str, zero_bytes: bool) -> Any:
        def reqs() -> Iterator[media_pb2.UploadMediaRequest]:
            yield media_pb2.UploadMediaRequest(metadata=media_pb2.UploadMetadata(filename="stall.mp4"))
            while not stop.is_set():
                if zero_bytes:
                    yield media_pb2.UploadMediaRequest(chunk=media_pb2.UploadChunk(data=b""))
                time.sleep(0.05)
        f = media_pb2_grpc.MediaServiceStub(channel).UploadMedia.future(reqs(), metadata=md(key), timeout=60)
        streams.append(f)
        return f

    try:
        def refused(key: str, why: str) -> None:
            got = upload_raw(target, key, media_pb2.UploadMetadata(filename="x.mp4"))
            held = [(f.done(), f.done() and code_of(f.result)) for f in streams]
            assert got[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and why in got[1], (got, "stalled streams:", held)

        stalled(key_a, False), stalled(key_a, True)
        # slots held (a busy handler thread may still be authenticating: the next upload could take its slot)
        wait_for(lambda: metric(stack.metrics(proc), "mp4t_uploads_in_progress") >= 2, 10, "2 uploads held")
        refused(key_a, "tenant")  # a tenant may hold half of the replica's upload slots
        stalled(key_b, False), stalled(key_b, True)
        wait_for(lambda: metric(stack.metrics(proc), "mp4t_uploads_in_progress") >= 4, 10, "4 uploads held")
        refused(key_b, "its maximum")
        jobs = transcription_pb2_grpc.TranscriptionServiceStub(channel)
        began = time.monotonic()
        got = code_of(lambda: jobs.GetTranscription(tpb.GetTranscriptionRequest(name="transcriptions/" + "0" * 32),
                                                    metadata=md(key_a), timeout=5))
        assert got[0] == grpc.StatusCode.NOT_FOUND and time.monotonic() - began < 1.0  # answered at once
        with urllib.request.urlopen(f"http://127.0.0.1:{stack.http_ports[proc]}/healthz", timeout=5) as r:
            assert r.read().decode().strip() == "SERVING"
        ended = [code_of(f.result)[0] for f in streams]  # the idle timeout ends every stalled stream
        assert ended == [grpc.StatusCode.DEADLINE_EXCEEDED] * 4, ended
        wait_for(lambda: len([ln for ln in log_lines(proc) if ln.get("event") == "rpc" and ln.get("code") ==
                              "DEADLINE_EXCEEDED" and ln.get("rpc", "").endswith("UploadMedia")]) == 4, 10,
                 "4 rpc lines of uploads ended for idleness")
        assert upload_raw(target, key_a, media_pb2.UploadMetadata(filename="x.mp4"))[0] == grpc.StatusCode.OK
    finally:
        stop.set()
        channel.close()
        proc.stop()


def test_watch_after_the_last_event_of_a_finished_job_ends_at_once(client: Any, speech_mp4: pathlib.Path) -> None:
    """Finding: Watch with after_sequence equal to a finished job's last sequence sent
    SUCCEEDED heartbeats forever instead of closing."""
    import time

    done = client.wait(client.create(client.upload(str(speech_mp4)).name).name)
    began = time.monotonic()
    stream = client.transcriptions.WatchTranscription(
        tpb.WatchTranscriptionRequest(name=done.name, after_sequence=done.sequence), metadata=client.metadata,
        timeout=30)
    assert list(stream) == [] and stream.code() == grpc.StatusCode.OK
    assert time.monotonic() - began < 5


def test_a_tenant_deleted_while_its_key_is_cached_is_unauthenticated(stack: Stack, db: Any,
                                                                      speech_mp4: pathlib.Path) -> None:
    """Finding: a tenant deleted while its key was cached got INTERNAL (MediaDoesNotExist) on
    PostgreSQL (its foreign keys refuse the new row)."""
    target = stack.target
    from server.auth import create_key
    from storage.db import Tenant

    key, tenant = create_key(f"doomed-{uuid.uuid4().hex[:6]}")
    with grpc.insecure_channel(target) as ch:
        media = media_pb2_grpc.MediaServiceStub(ch)
        assert code_of(lambda: media.ListMedia(media_pb2.ListMediaRequest(), metadata=md(key)))[0] \
            == grpc.StatusCode.OK  # the key is now cached by the server
        with db.connection_context():
            Tenant.delete().where(Tenant.id == tenant.id).execute()
        got = upload_raw(target, key, media_pb2.UploadMetadata(filename="a.mp4"), speech_mp4.read_bytes())
        assert got[0] == grpc.StatusCode.UNAUTHENTICATED and "no longer exists" in got[1], got


def test_a_client_cancelling_before_its_first_message_is_cancelled_not_internal(stack: Stack, key_a: str) -> None:
    """Finding: a client cancelling an upload before its first message was logged and counted
    as INTERNAL."""
    import threading

    proc, target = stack.launch_server()
    hold = threading.Event()

    def nothing() -> Iterator[media_pb2.UploadMediaRequest]:
        hold.wait(30)
        return
        yield  # noqa: unreachable - a generator that sends nothing

    try:
        with grpc.insecure_channel(target) as ch:
            f = media_pb2_grpc.MediaServiceStub(ch).UploadMedia.future(nothing(), metadata=md(key_a), timeout=30)
            wait_for(lambda: metric(stack.metrics(proc), "mp4t_grpc_handler_threads_busy") >= 1, 10, "the upload")
            f.cancel()
            hold.set()
        line = wait_for(lambda: next((ln for ln in log_lines(proc) if ln.get("event") == "rpc"
                                      and ln.get("rpc", "").endswith("UploadMedia")), None), 10, "its rpc line")
    finally:
        proc.stop()
    assert line["code"] == "CANCELLED", line
