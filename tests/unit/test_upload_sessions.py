"""Upload sessions (core.upload_sessions) on the local store and SQLite, both real: parts persist
as files, a new Writer (another process, after a crash) continues from the committed size, a
stale writer is stopped, the check at completion refuses a wrong file, expiry removes the parts."""
from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any, Iterator

import pytest

from core import queue, runtime
from core import upload_sessions as us
from mp4totext.config import Settings
from storage.db import Media, Tenant, database, utcnow
from storage.tenancy import UploadPart, UploadSession

PART = 5 * 1024 * 1024


@pytest.fixture()
def rt(tmp_path: pathlib.Path) -> Iterator[Any]:
    settings = Settings(data_dir=str(tmp_path), broker_url="memory", upload_part_size=PART)
    r = runtime.init(settings)
    queue.make_broker(settings)
    yield r
    database.close()


def tenant() -> str:
    with database.connection_context():
        return Tenant.create(name=f"t-{utcnow().timestamp()}").id


def declared(data: bytes, sha: str | None = None) -> us.Declared:
    return us.Declared("f.bin", "", len(data), sha or hashlib.sha256(data).hexdigest(), "")


def feed(writer: us.Writer, data: bytes, step: int = 1024 * 1024) -> None:
    for i in range(0, len(data), step):
        writer.feed(data[i:i + step])


def test_parts_persist_and_another_writer_resumes(rt: Any) -> None:
    data = os.urandom(2 * PART + 123)
    s = us.create(tenant(), "", declared(data))
    first = us.Writer(s, 0)
    feed(first, data[:PART + 1000])  # "crash": the 1000 bytes after the part are lost
    parts_dir = pathlib.Path(rt.store.parts) / s.upload_id
    assert sorted(p.name for p in parts_dir.iterdir()) == ["00001"]
    fresh = us.get(s.tenant_id, "", s.id)
    assert fresh.committed_size == PART
    with pytest.raises(us.WrongOffset) as err:
        us.Writer(fresh, PART + 1000)
    assert err.value.committed == PART
    second = us.Writer(fresh, PART)
    with pytest.raises(us.Superseded):  # the first stream lives on somewhere: it may not write any more
        feed(first, data[PART + 1000:])
    feed(second, data[PART:])
    assert second.complete and second.sha256 is None  # resumed: the object is read back
    media = us.finish(us.get(s.tenant_id, "", s.id))
    assert media.sha256 == hashlib.sha256(data).hexdigest() and media.size_bytes == len(data)
    assert pathlib.Path(rt.store.root / media.object_key).read_bytes() == data
    assert not parts_dir.exists()
    done = us.get(s.tenant_id, "", s.id)
    assert done.state == us.COMPLETED and us.finish(done).id == media.id  # idempotent


def test_wrong_sha256_leaves_no_media_and_no_object(rt: Any) -> None:
    data = os.urandom(PART + 10)
    s = us.create(tenant(), "", declared(data, "0" * 64))
    w = us.Writer(s, 0)
    feed(w, data)
    with pytest.raises(us.Rejected, match="sha256"):
        us.finish(s, w.sha256)
    with database.connection_context():
        assert Media.get_or_none(Media.id == s.media_id) is None
    assert not rt.store.exists(s.object_key)
    assert us.get(s.tenant_id, "", s.id).state == us.FAILED
    with pytest.raises(us.NotActive):
        us.Writer(us.get(s.tenant_id, "", s.id), 0)


def test_owner_scoping(rt: Any) -> None:
    data = b"x" * 100
    t = tenant()
    s = us.create(t, "alice", declared(data))
    assert us.get(t, "alice", s.id) is not None and us.get(t, "", s.id) is not None
    assert us.get(t, "bob", s.id) is None and us.get(tenant(), "", s.id) is None


def test_more_than_declared_is_rejected(rt: Any) -> None:
    s = us.create(tenant(), "", declared(b"abc"))
    with pytest.raises(us.Rejected, match="declared size"):
        us.Writer(s, 0).feed(b"abcd")


def test_expiry_removes_parts_and_rows_and_is_idempotent(rt: Any) -> None:
    data = os.urandom(PART * 2)
    t = tenant()
    old, young = us.create(t, "", declared(data)), us.create(t, "", declared(data))
    feed(us.Writer(old, 0), data[:PART])
    with database.connection_context():
        UploadSession.update(expire_time=utcnow()).where(UploadSession.id == old.id).execute()
    assert old.upload_id in us.live_upload_ids()
    assert us.expire() == 1 and us.expire() == 0
    assert us.get(t, "", old.id) is None and us.get(t, "", young.id) is not None
    assert not (pathlib.Path(rt.store.parts) / old.upload_id).exists()
    with database.connection_context():
        assert UploadPart.select().where(UploadPart.session == old.id).count() == 0
    # The stale-upload sweep leaves a live session's parts alone.
    import datetime as dt

    assert rt.store.abort_stale_uploads(dt.timedelta(seconds=-1), keep=us.live_upload_ids()) == 0
    assert (pathlib.Path(rt.store.parts) / young.upload_id).exists()


def test_request_id_used_by_a_single_stream_upload_too(rt: Any) -> None:
    """A session and an UploadMedia with the same request_id: the session's media is its own (the
    session is idempotent by the request_id; the media row does not take it), not stuck ACTIVE."""
    data = os.urandom(1000)
    t = tenant()
    with database.connection_context():
        single = Media.create(tenant=t, object_key="k", size_bytes=1, request_id="rid-1")
    s = us.create(t, "", us.Declared("f.bin", "", len(data), hashlib.sha256(data).hexdigest(), "rid-1"))
    w = us.Writer(s, 0)
    feed(w, data)
    media = us.finish(s, w.sha256)
    assert media.id == s.media_id != single.id and media.sha256 == hashlib.sha256(data).hexdigest()
    assert us.get(t, "", s.id).state == us.COMPLETED
    assert us.create(t, "", us.Declared("f.bin", "", len(data), "0" * 64, "rid-1")).id == s.id  # idempotent


def test_a_part_overwritten_by_a_stale_stream_fails_completion(rt: Any) -> None:
    """A superseded stream stored different bytes over a recorded part: the local store refuses to
    assemble it (like S3's InvalidPart) even though the streamed sha256 matches the declared one."""
    data = os.urandom(PART + 100)
    s = us.create(tenant(), "", declared(data))
    w = us.Writer(s, 0)
    feed(w, data)
    rt.store.put_part(s.object_key, s.upload_id, 1, os.urandom(PART))  # the stale stream's part
    with pytest.raises(us.Rejected, match="superseded"):
        us.finish(s, w.sha256)
    failed = us.get(s.tenant_id, "", s.id)
    assert failed.state == us.FAILED and "does not match" in failed.error_message
    assert not rt.store.exists(s.object_key) and not (pathlib.Path(rt.store.parts) / s.upload_id).exists()
    with database.connection_context():
        assert Media.get_or_none(Media.id == s.media_id) is None


def test_storage_quota_is_checked_again_when_a_session_completes(rt: Any) -> None:
    """Two sessions that each fit passed their checks at the same moment: the one completing second
    no longer fits, FAILS with the storage quota and keeps nothing."""
    from core import quotas

    data = os.urandom(PART + 100)
    t = tenant()
    quotas.set_quota(t, storage_bytes=len(data) * 3 // 2)
    first, second = us.create(t, "", declared(data)), us.create(t, "", declared(data))
    writers = [us.Writer(first, 0), us.Writer(second, 0)]
    for w in writers:
        feed(w, data)
    assert us.finish(first, writers[0].sha256).size_bytes == len(data)
    with pytest.raises(quotas.QuotaExceeded, match="storage quota") as err:
        us.finish(second, writers[1].sha256)
    assert err.value.violation.limit == "storage_bytes"
    failed = us.get(t, "", second.id)
    assert failed.state == us.FAILED and "storage quota" in failed.error_message
    assert not rt.store.exists(second.object_key)
    with database.connection_context():
        assert Media.get_or_none(Media.id == second.media_id) is None
        assert Media.select().where(Media.tenant == t).count() == 1
