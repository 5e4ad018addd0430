"""Outages of the infrastructure against the real stack: acknowledged work is never lost,
duplicated or failed, and it resumes within seconds once the service is back.

Each test reports its figures (failed calls, lost, duplicated, recovery time) in its output.
"""
from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Any

from mp4totext.client import Client
from mp4totext.v1 import media_pb2
from mp4totext.v1 import transcription_pb2 as tpb
from tests.support import Stack, broker_outage, broker_restart, log_lines, wait_for
from tests.support.s3 import SeaweedS3


def succeeded_events(db: Any, job_id: str) -> int:
    from storage.db import TranscriptionEvent

    with db.connection_context():
        return TranscriptionEvent.select().where(TranscriptionEvent.transcription_id == job_id,
                                                 TranscriptionEvent.state == "SUCCEEDED").count()


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return resp.status, resp.read().decode().strip()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode().strip()


def outbox_failures(stack: Stack) -> int:
    return sum(1 for p in stack.servers for ln in log_lines(p) if ln.get("event") == "outbox_publish_failed")


def creates_survive(stack: Stack, client: Client, db: Any, media_path: Any, outage: Any, creates: int,
                    relay_failures: int, what: str) -> float:
    """``creates`` CreateTranscription calls while ``outage`` lasts (until the servers' outbox
    relays have failed ``relay_failures`` times); every one must succeed and its job complete
    exactly once after the outage. Returns the recovery time (outage end -> all SUCCEEDED)."""
    media = client.upload(str(media_path))
    client.wait(client.create(media.name).name)  # media READY, workers warm
    failures_before = outbox_failures(stack)
    created, failed_calls = [], 0
    with outage:
        for _ in range(creates):
            try:
                created.append(client.create(media.name))
            except Exception:  # noqa: BLE001 - counted: a create the client could not get done
                failed_calls += 1
        wait_for(lambda: outbox_failures(stack) - failures_before >= relay_failures, 60,
                 "the relays to meet the outage", 0.5)
    restored = time.monotonic()
    done = [client.wait(job.name, timeout=240) for job in created]
    recovery_s = time.monotonic() - restored
    duplicated = sum(succeeded_events(db, j.name.split("/")[1]) > 1 for j in done)
    lost = sum(j.state != tpb.TRANSCRIPTION_STATE_SUCCEEDED for j in done)
    print(f"{what}: failed calls {failed_calls}, lost {lost}, duplicated {duplicated}, recovery {recovery_s:.1f} s")
    assert failed_calls == 0 and len(created) == creates
    assert lost == 0 and duplicated == 0, [j.error_message for j in done]
    return recovery_s


def test_creates_during_a_broker_outage_all_complete(stack: Stack, client: Client, db: Any,
                                                     speech_mp4: Any) -> None:
    outage = broker_outage(stack.env["MP4T_BROKER_URL"])  # this vhost: connections closed, access refused
    assert creates_survive(stack, client, db, speech_mp4, outage, 5, 8, "broker outage during creates") < 60


def test_creates_across_a_rabbitmq_restart_all_complete(stack: Stack, client: Client, db: Any,
                                                        speech_mp4: Any) -> None:
    assert creates_survive(stack, client, db, speech_mp4, broker_restart(), 3, 4,
                           "RabbitMQ restart during creates") < 90


def test_s3_outage_while_preparing_media_waits_instead_of_failing(stack: Stack, client: Client, db: Any,
                                                                  speech_mp4: Any, s3_server: SeaweedS3) -> None:
    from storage.db import Media

    stack.workers.pop("critical,low").stop()  # the media waits in the queue while S3 goes away
    worker = None
    try:
        media = client.upload(str(speech_mp4))
        job = client.create(media.name)
        media_id = media.name.split("/")[1]
        s3_server.kill()
        worker = stack.start_worker("critical,low")

        def outages() -> int:
            return sum(1 for ln in log_lines(worker) if ln.get("event") == "stage_finished"
                       and ln.get("outcome") == "outage" and ln.get("media_id") == media_id)

        # More outage retries than MP4T_MAX_ATTEMPTS: an outage does not spend the attempt budget.
        wait_for(lambda: outages() >= 5, 180, "prepare_media to meet the S3 outage 5 times", 0.5)
        with db.connection_context():
            row = Media.get_by_id(media_id)
        assert row.state == "PROCESSING" and row.attempts <= 1, (row.state, row.attempts, row.error_message)
        # Degraded, not down: the proxy keeps routing here and reads keep working.
        server = stack.servers[0]
        health = wait_for(lambda: (h := healthz(stack.http_ports[server]))[1].startswith("DEGRADED") and h, 30,
                          "/healthz to say DEGRADED")
        assert health[0] == 200 and "storage" in health[1]
        assert client.get(job.name).state == tpb.TRANSCRIPTION_STATE_QUEUED
    finally:
        if s3_server.proc is None or not s3_server.proc.alive():
            s3_server.start()
        if "critical,low" not in stack.workers:
            stack.start_worker("critical,low")
    restored = time.monotonic()
    done = client.wait(job.name, timeout=240)
    recovery_s = time.monotonic() - restored
    print(f"S3 outage while preparing: lost {int(done.state != tpb.TRANSCRIPTION_STATE_SUCCEEDED)}, "
          f"duplicated {int(succeeded_events(db, job.name.split('/')[1]) > 1)}, recovery {recovery_s:.1f} s")
    assert done.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED, done.error_message
    assert client.get_media(media.name).state == media_pb2.MEDIA_STATE_READY
    assert succeeded_events(db, job.name.split("/")[1]) == 1
    assert recovery_s < 90


def test_uploads_get_backpressure_before_the_backlog_grows(stack: Stack, db: Any, speech_mp4: Any) -> None:
    import uuid

    import grpc
    import pytest

    from mp4totext.client import server_retry_delay
    from server.auth import create_key

    key = create_key(f"backpressure-{uuid.uuid4().hex[:6]}")[0]  # a tenant of its own
    server, target = stack.launch_server(MP4T_MAX_PREPARING_PER_TENANT="2")
    stack.workers.pop("critical,low").stop()  # nothing gets prepared: the backlog grows
    try:
        with Client(target, key, retries=0) as c:
            first = [c.upload(str(speech_mp4)) for _ in range(2)]
            with pytest.raises(grpc.RpcError) as err:
                c.upload(str(speech_mp4))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 of your uploads are still being prepared" in err.value.details()
        assert server_retry_delay(err.value) == 5.0  # RetryInfo: when to come back
    finally:
        stack.start_worker("critical,low")
    try:
        with Client(target, key) as c:  # the client waits as told and gets through once the backlog drains
            third = c.upload(str(speech_mp4))
            assert wait_for(lambda: all(c.get_media(m.name).state == media_pb2.MEDIA_STATE_READY
                                        for m in [*first, third]), 120, "every upload to be prepared", 0.5)
    finally:
        server.stop()


def test_uploads_during_an_s3_outage_are_refused_cleanly_and_succeed_after(stack: Stack, client: Client, db: Any,
                                                                          key_a: str, speech_mp4: Any,
                                                                          s3_server: SeaweedS3) -> None:
    import grpc
    import pytest

    from mp4totext.client import server_retry_delay
    from storage.db import Media

    def rows() -> int:
        with db.connection_context():
            return Media.select().count()

    before = rows()
    s3_server.kill()
    try:
        with Client(stack.target, key_a, retries=0) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.upload(str(speech_mp4))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "object storage" in err.value.details()
        assert server_retry_delay(err.value) == 5.0
        assert rows() == before  # nothing half-written: no media row for the refused upload
        assert client.call(client.media.ListMedia, media_pb2.ListMediaRequest(page_size=1)) is not None  # reads work
    finally:
        s3_server.start()
    media = client.upload(str(speech_mp4))  # the same client, after the outage
    assert media.size_bytes == speech_mp4.stat().st_size and rows() == before + 1


def test_database_connections_killed_mid_transcription(stack: Stack, client: Client, db: Any,
                                                       long_speech: Any) -> None:
    import psutil
    import psycopg2

    media = client.upload(str(long_speech))
    job = client.create(media.name)
    wait_for(lambda: client.get(job.name, basic=True).progress_percent > 15, 180, "transcription progress", 0.2)
    # The service's connections only (servers and workers), found by their client ports; the
    # test process keeps its own.
    ports = {c.laddr.port for proc in [*stack.servers, *stack.workers.values()]
             for c in psutil.Process(proc.pid).net_connections(kind="tcp") if c.raddr and c.raddr.port == 5432}
    with psycopg2.connect(stack.env["MP4T_DATABASE_URL"].rsplit("/", 1)[0] + "/postgres") as admin:
        admin.autocommit = True
        cur = admin.cursor()
        cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE client_port = ANY(%s)",
                    (list(ports),))
        killed = cur.fetchone()[0]
    assert killed >= 3  # servers, workers
    done = client.wait(job.name, timeout=300)
    assert done.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED, done.error_message
    assert succeeded_events(db, job.name.split("/")[1]) == 1
    print(f"database connections killed mid-transcription: {killed} killed, lost 0, duplicated 0")
