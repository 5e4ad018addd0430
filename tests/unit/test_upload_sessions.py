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
