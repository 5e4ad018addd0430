"""Quotas, usage and credits, the weekly report and fairness, on the real stack (two servers,
RabbitMQ, S3, PostgreSQL, real workers). The stack charges MP4T_PRICE_PER_AUDIO_MINUTE=1 credit.

Each test makes its own tenants, so quotas set here touch nothing else.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import pathlib
import subprocess
import threading
import uuid
from typing import Any, Iterator

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from mp4totext.client import Client
from mp4totext.v1 import media_pb2
from mp4totext.v1 import transcription_pb2 as tpb
from tests.support import CLI, ROOT, Stack, log_lines, wait_for

SUCCEEDED = tpb.TRANSCRIPTION_STATE_SUCCEEDED


def tenant(db: Any) -> tuple[str, str, str]:
    """A fresh tenant: (name, id, api key)."""
    from server.auth import create_key

    name = f"quota-{uuid.uuid4().hex[:8]}"
    key, row = create_key(name)
    return name, row.id, key


def set_quota(stack: Stack, name: str, *args: str) -> dict[str, Any]:
    """The operator's command, as a process against the stack's database."""
    out = subprocess.run([*CLI, "set-quota", name, *args], env=stack.env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def quota_failure(exc: grpc.RpcError) -> tuple[error_details_pb2.QuotaFailure, error_details_pb2.ErrorInfo]:
    """The QuotaFailure and ErrorInfo of an error, parsed from the raw trailing metadata."""
    raw = dict(exc.trailing_metadata())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    failure, info = error_details_pb2.QuotaFailure(), error_details_pb2.ErrorInfo()
    found = {d.type_url.rsplit(".", 1)[-1] for d in status.details}
    assert {"QuotaFailure", "ErrorInfo"} <= found, found
    for detail in status.details:
        for message in (failure, info):
            if detail.Is(message.DESCRIPTOR):
                detail.Unpack(message)
    return failure, info


def refused(call: Any, limit: str, tenant_id: str) -> tuple[grpc.RpcError, error_details_pb2.ErrorInfo]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    exc = err.value
    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
    failure, info = quota_failure(exc)
    (v,) = failure.violations
    assert v.subject == f"tenant:{tenant_id}" and v.quota_id == limit and v.description
    assert info.reason == "QUOTA_EXCEEDED" and info.metadata["limit"] == limit
    assert limit in exc.details() and "limit" in exc.details()
    return exc, info


def ready_media(c: Client, path: Any) -> Any:
    media = c.upload(str(path))
    return wait_for(lambda: (m := c.get_media(media.name)).state == media_pb2.MEDIA_STATE_READY and m, 120,
                    "media READY", 0.2)


def job_count(db: Any, tenant_id: str) -> int:
    from storage.db import Transcription

    with db.connection_context():
        return Transcription.select().where(Transcription.tenant == tenant_id).count()


def test_usage_recorded_per_tenant_and_user_and_get_usage(stack: Stack, db: Any, speech_mp4: Any) -> None:
    name, tid, key = tenant(db)
    with Client(stack.target, key) as admin:
        token = admin.create_user_token("alice").token
        media = ready_media(admin, speech_mp4)
        mine = admin.wait(admin.create(media.name).name, 300)
        with Client(stack.targets[1], token) as alice:
            amedia = alice.upload(str(speech_mp4))
            theirs = alice.wait(alice.create(amedia.name).name, 300)
            assert mine.state == theirs.state == SUCCEEDED
            seconds = [j.result.duration.ToTimedelta().total_seconds() for j in (mine, theirs)]
            media_s = media.duration.ToTimedelta().total_seconds()
            assert all(abs(s - media_s) < 0.5 for s in seconds), (seconds, media_s)

            usage = admin.usage()
            print(f"tenant usage: {usage.totals}")
            assert usage.totals.transcriptions == 2
            assert usage.totals.audio_seconds == pytest.approx(sum(seconds), abs=1e-6)
            assert usage.totals.upload_bytes == 2 * pathlib.Path(speech_mp4).stat().st_size
            assert usage.records[-1].day == dt.datetime.now(dt.timezone.utc).date().isoformat()
            split = {r.user_id: r for r in admin.usage(per_user=True).records}
            assert set(split) == {"", "alice"} and split["alice"].audio_seconds == pytest.approx(seconds[1])
            assert admin.usage(user_id="alice").totals.transcriptions == 1
            assert {q.name for q in usage.quotas} >= {"concurrent_jobs", "monthly_audio_minutes", "storage_bytes"}
            with pytest.raises(grpc.RpcError) as err:
                admin.usage(start_day="2026-13-01")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "YYYY-MM-DD" in err.value.details()
            assert not admin.usage(start_day="2001-01-01", end_day="2001-01-31").records

            own = alice.usage()  # a user token: only the user's own
            assert own.totals.transcriptions == 1 and own.totals.audio_seconds == pytest.approx(seconds[1])
            assert own.storage_bytes == pathlib.Path(speech_mp4).stat().st_size and not own.quotas
            with pytest.raises(grpc.RpcError) as err:
                alice.usage(user_id="bob")
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    out = subprocess.run([*CLI, "usage", "--server", stack.target, "--api-key", key, "--per-user"], env=stack.env,
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout)["totals"]["transcriptions"] == "2"


def test_concurrent_jobs_quota_refuses_before_queueing(stack: Stack, db: Any, speech_mp4: Any) -> None:
    name, tid, key = tenant(db)
    assert set_quota(stack, name, "--concurrent-jobs", "1")["concurrent_jobs"] == 1
    with Client(stack.target, key) as c:
        media = ready_media(c, speech_mp4)
        first = c.create(media.name)
        exc, info = refused(lambda: c.create(media.name), "concurrent_jobs", tid)
        assert info.metadata["used"] == "1" and info.metadata["maximum"] == "1"
        print(f"refused: {exc.details()}")
        assert job_count(db, tid) == 1  # nothing written, nothing queued
        assert c.wait(first.name, 300).state == SUCCEEDED
        assert c.wait(c.create(media.name).name, 300).state == SUCCEEDED  # a slot again


def test_two_concurrent_creates_at_the_edge_exactly_one_wins(stack: Stack, db: Any, speech_mp4: Any) -> None:
    from core import quotas

    name, tid, key = tenant(db)
    with Client(stack.target, key) as c0, Client(stack.targets[1], key) as c1:
        media = ready_media(c0, speech_mp4)
        with db.connection_context():
            quotas.set_quota(name, concurrent_jobs=1)
        barrier, results = threading.Barrier(2), []

        def create(c: Client) -> None:
            barrier.wait()
            try:
                results.append(c.create(media.name))
            except grpc.RpcError as exc:
                results.append(exc)

        threads = [threading.Thread(target=create, args=(c,)) for c in (c0, c1)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        won = [r for r in results if isinstance(r, tpb.Transcription)]
        lost = [r for r in results if isinstance(r, grpc.RpcError)]
        assert len(won) == 1 and len(lost) == 1, results
        assert lost[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert quota_failure(lost[0])[0].violations[0].quota_id == "concurrent_jobs"
        assert job_count(db, tid) == 1
        c0.wait(won[0].name, 300)


def test_monthly_minutes_quota(stack: Stack, db: Any, speech_mp4: Any) -> None:
    name, tid, key = tenant(db)
    with Client(stack.target, key) as c:
        media = ready_media(c, speech_mp4)
        minutes = media.duration.ToTimedelta().total_seconds() / 60
        set_quota(stack, name, "--monthly-audio-minutes", f"{minutes * 1.5:.6f}")
        assert c.wait(c.create(media.name).name, 300).state == SUCCEEDED
        exc, info = refused(lambda: c.create(media.name), "monthly_audio_minutes", tid)
        today = dt.datetime.now(dt.timezone.utc).date()
        first_next = dt.date(today.year + (today.month == 12), today.month % 12 + 1, 1)
        assert info.metadata["reset_time"].startswith(first_next.isoformat()), info.metadata
        assert "resets" in exc.details()
        (q,) = [q for q in c.usage().quotas if q.name == "monthly_audio_minutes"]
        assert q.used == pytest.approx(minutes, abs=0.01) and q.reset_time.ToDatetime().date() == first_next
        assert job_count(db, tid) == 1


def test_upload_size_and_storage_quotas(stack: Stack, db: Any, speech_mp4: Any) -> None:
    name, tid, key = tenant(db)
    size = pathlib.Path(speech_mp4).stat().st_size
    with Client(stack.target, key) as c:
        set_quota(stack, name, "--max-upload-bytes", str(size - 1))
        refused(lambda: c.upload(str(speech_mp4)), "max_upload_bytes", tid)
        set_quota(stack, name, "--max-upload-bytes", "0", "--storage-bytes", str(size + size // 2))
        c.upload(str(speech_mp4))
        exc, info = refused(lambda: c.upload(str(speech_mp4)), "storage_bytes", tid)
        assert info.metadata["used"] == str(size)
        set_quota(stack, name, "--storage-bytes", str(2 * size))
        c.upload(str(speech_mp4))  # exactly at the limit


MiB = 1024 * 1024


def create_session(c: Client, data: bytes, request_id: str = "") -> media_pb2.UploadSession:
    return c.call(c.media.CreateUploadSession, media_pb2.CreateUploadSessionRequest(
        metadata=media_pb2.UploadMetadata(filename="f.bin", size_bytes=len(data),
                                          sha256=hashlib.sha256(data).hexdigest(),
                                          request_id=request_id or str(uuid.uuid4()))))


def write_session(c: Client, name: str, data: bytes) -> media_pb2.WriteUploadResponse:
    def reqs() -> Iterator[media_pb2.WriteUploadRequest]:
        for i in range(0, len(data), MiB):
            yield media_pb2.WriteUploadRequest(upload_session=name if i == 0 else "", write_offset=i,
                                               data=data[i:i + MiB])

    return c.media.WriteUpload(reqs(), metadata=c.metadata, timeout=120)


def delete_sessions(c: Client, *names: str) -> None:
    """Unfinished sessions keep multipart uploads that other modules expect gone."""
    for name in names:
        try:
            c.media.DeleteUploadSession(media_pb2.DeleteUploadSessionRequest(name=name), metadata=c.metadata,
                                        timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc


def test_parallel_upload_sessions_reserve_storage_and_a_retry_gets_its_session(stack: Stack, db: Any) -> None:
    """An ACTIVE session's declared size counts as stored: a second session that would not fit
    beside it is refused. A retry of the first (its answer lost) gets its session back before any
    quota check, even one it would now fail."""
    from core import quotas

    name, tid, key = tenant(db)
    data = os.urandom(6 * MiB)
    with db.connection_context():
        quotas.set_quota(name, storage_bytes=len(data) * 3 // 2)
    with Client(stack.target, key) as c, Client(stack.targets[1], key) as c1:
        rid = str(uuid.uuid4())
        first = create_session(c, data, rid)
        try:
            exc, info = refused(lambda: create_session(c1, data), "storage_bytes", tid)
            assert float(info.metadata["used"]) == pytest.approx(len(data), rel=1e-5)
            assert "unfinished upload sessions" in exc.details()
            assert create_session(c1, data, rid).name == first.name  # counted, but it is the same session
            with db.connection_context():
                quotas.set_quota(name, max_upload_bytes=len(data) - 1)
            assert create_session(c, data, rid).name == first.name
            refused(lambda: create_session(c, data), "max_upload_bytes", tid)
            with db.connection_context():
                quotas.set_quota(name, max_upload_bytes=-1)
            assert write_session(c, first.name, data).media.size_bytes == len(data)
        finally:
            delete_sessions(c, first.name)


def test_a_session_completing_over_the_storage_quota_fails_and_keeps_nothing(stack: Stack, db: Any,
                                                                             s3_client: Any) -> None:
    """Two sessions created while both fit; the quota is lowered (or they raced at creation):
    completion checks again under the quota row lock, the second FAILS with RESOURCE_EXHAUSTED and
    neither a media row nor an object nor a multipart upload is left of it."""
    from core import quotas
    from storage.db import Media
    from storage.tenancy import UploadSession

    name, tid, key = tenant(db)
    data = os.urandom(6 * MiB)
    with Client(stack.target, key) as c:
        a, b = create_session(c, data), create_session(c, data)
        try:
            with db.connection_context():
                quotas.set_quota(name, storage_bytes=len(data) * 3 // 2)
            assert write_session(c, a.name, data).media.size_bytes == len(data)
            exc, info = refused(lambda: write_session(c, b.name, data), "storage_bytes", tid)
            assert float(info.metadata["used"]) == pytest.approx(len(data), rel=1e-5)
            failed = c.media.GetUploadSession(media_pb2.GetUploadSessionRequest(name=b.name), metadata=c.metadata,
                                              timeout=30)
            assert failed.state == media_pb2.UPLOAD_SESSION_STATE_FAILED
            assert "storage quota" in failed.error_message and "not kept" in failed.error_message
            with db.connection_context():
                row = UploadSession.get_by_id(b.name.split("/", 1)[1])
                assert Media.get_or_none(Media.id == row.media_id) is None
                assert Media.select().where(Media.tenant == tid).count() == 1
            assert list(s3_client.list_objects(stack.s3["bucket"], prefix=row.object_key)) == []
            uploads = s3_client._list_multipart_uploads(stack.s3["bucket"]).uploads  # noqa: SLF001
            assert row.upload_id not in {u.upload_id for u in uploads}
            with pytest.raises(grpc.RpcError) as again:  # a failed session takes no more data
                write_session(c, b.name, data)
            assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            delete_sessions(c, a.name, b.name)


def test_credits_debited_exactly_refused_when_spent_and_failures_free(stack: Stack, db: Any, speech_mp4: Any,
                                                                       tmp_path: pathlib.Path) -> None:
    from storage.db import Transcription
    from storage.tenancy import JobCharge

    name, tid, key = tenant(db)
    with Client(stack.target, key) as c:
        media = ready_media(c, speech_mp4)
        price = media.duration.ToTimedelta().total_seconds() / 60  # 1 credit per minute
        credits = round(price * 1.5, 6)
        assert set_quota(stack, name, "--credits", str(credits))["credits"] == credits
        job = c.wait(c.create(media.name).name, 300)
        charged = job.result.duration.ToTimedelta().total_seconds() / 60
        usage = c.usage()
        print(f"credits {credits} - charged {usage.totals.transcription_cost} = {usage.credits_balance}")
        assert usage.credits_enabled and usage.totals.transcription_cost == pytest.approx(charged, abs=1e-6)
        assert usage.credits_balance == pytest.approx(credits - usage.totals.transcription_cost, abs=1e-9)
        refused(lambda: c.create(media.name), "credits", tid)
        assert job_count(db, tid) == 1

        set_quota(stack, name, "--add-credits", "5")
        before = c.usage().credits_balance
        bad = tmp_path / "broken.mp4"
        bad.write_bytes(b"this is not a video " * 500)
        failed = None
        for _ in range(5):  # create it while the media is PROCESSING (it FAILS the job when probed)
            try:
                failed = c.wait(c.create(c.upload(str(bad), request_id=str(uuid.uuid4())).name).name, 300)
                break
            except grpc.RpcError as exc:  # probed already: FAILED_PRECONDITION, try again
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()
        assert failed is not None and failed.state == tpb.TRANSCRIPTION_STATE_FAILED, failed
        after = c.usage()
        assert after.credits_balance == pytest.approx(before, abs=1e-12) and after.totals.transcriptions == 1
        with db.connection_context():
            states = {r.job_id: r.state for r in JobCharge.select().join(Transcription).where(
                Transcription.tenant == tid)}
        assert states == {job.name.split("/")[1]: "CHARGED", failed.name.split("/")[1]: "RELEASED"}


def test_weekly_report_once_per_iso_week(stack: Stack, db: Any) -> None:
    from core import queue, usage
    from mp4totext import config
    from storage.db import Tenant
    from storage.tenancy import UsageDaily, UsageReport

    week, monday, _ = usage.last_week()
    with db.connection_context(), db.atomic():  # before any sweep can see it: tenant and its week
        t = Tenant.create(name=f"report-{uuid.uuid4().hex[:8]}",
                          create_time=dt.datetime.combine(monday - dt.timedelta(days=3), dt.time()))
        UsageDaily.create(tenant=t, owner="u1", day=monday + dt.timedelta(days=1), audio_seconds=30.5,
                          transcriptions=2)
        UsageDaily.create(tenant=t, owner="", day=monday + dt.timedelta(days=6), audio_seconds=10, upload_bytes=7)
    queue.make_broker(config.reload(broker_url=stack.env["MP4T_BROKER_URL"]))
    queue.enqueue("usage_report", t.id, 2)  # the actor twice, besides the maintenance scheduler's
    queue.enqueue("usage_report", t.id, 2)
    worker = stack.workers["critical,low"]

    def runs() -> list[dict[str, Any]]:
        return [line for line in log_lines(worker) if line.get("stage") == "usage_report"
                and line.get("tenant_id") == t.id and line.get("event") == "stage_finished"]

    done = wait_for(lambda: len(runs()) >= 2 and runs(), 120, "the usage_report actor to run twice", 0.5)
    print(f"runs: {[r['outcome'] for r in done]}")
    assert [r["outcome"] for r in done].count("reported") == 1
    with db.connection_context():
        (row,) = UsageReport.select().where(UsageReport.tenant == t.id)
    assert row.week == week
    assert row.report["totals"]["audio_seconds"] == 40.5 and row.report["totals"]["upload_bytes"] == 7
    assert row.report["users"]["u1"]["transcriptions"] == 2
    line = next(x for x in log_lines(worker) if x.get("event") == "usage_report" and x.get("tenant_id") == t.id)
    assert line["week"] == week and line["audio_seconds"] == 40.5


def test_fairness_a_burst_does_not_starve_another_tenant(stack: Stack, db: Any, speech_mp4: Any) -> None:
    _, _, key_a = tenant(db)
    _, _, key_b = tenant(db)
    with Client(stack.target, key_a) as a, Client(stack.targets[1], key_b) as b:
        media_a, media_b = ready_media(a, speech_mp4), ready_media(b, speech_mp4)
        burst = [a.create(media_a.name) for _ in range(7)]
        late = b.create(media_b.name)
        done_a = [a.wait(j.name, 600) for j in burst]
        done_b = b.wait(late.name, 600)
    assert all(j.state == SUCCEEDED for j in [*done_a, done_b])
    ends_a = sorted(j.end_time.ToNanoseconds() for j in done_a)
    end_b = done_b.end_time.ToNanoseconds()
    place = sum(e < end_b for e in ends_a)
    t0 = min(j.create_time.ToNanoseconds() for j in burst)
    print(f"A's jobs ended at {[round((e - t0) / 1e9, 1) for e in ends_a]} s; B's (queued after all 7) at "
          f"{(end_b - t0) / 1e9:.1f} s, after {place} of A's")
    k = 4
    assert end_b < ends_a[k - 1], f"B finished after A's {k}th job ({place} of A's before it)"
