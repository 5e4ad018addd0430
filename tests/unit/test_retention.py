"""core.retention on SQLite and the local object store (the S3 + PostgreSQL stack: e2e/test_retention.py)."""
from __future__ import annotations

import datetime as dt
import os
import pathlib
import tempfile
import time
from typing import Any

import pytest

from core import retention
from mp4totext.config import Settings
from storage import db as dbmod
from storage import schema, tenancy
from storage.objects import LocalStore, audio_key, original_key

OLD = dt.timedelta(days=3)


@pytest.fixture()
def env(tmp_path: pathlib.Path) -> tuple[Settings, LocalStore]:
    schema.init_db(f"sqlite:///{tmp_path / 'r.db'}")
    settings = Settings(data_dir=str(tmp_path / "data"), retention_days=90, sweep_batch=2, orphan_min_age_s=3600,
                        temp_max_age_s=3600)
    return settings, LocalStore(str(tmp_path / "objects"))


def _media(store: LocalStore, tenant: Any, age: dt.timedelta, state: str = "READY") -> dbmod.Media:
    media = dbmod.Media.create(tenant=tenant, object_key="", state=state)
    key, wav = original_key(tenant.id, media.id), audio_key(tenant.id, media.id)
    for k in (key, wav, f"media/{tenant.id}/{media.id}/derived.json"):
        store.put_stream(k, _Bytes(b"x"))
    created = dbmod.utcnow() - age
    dbmod.Media.update(object_key=key, audio_key=wav, create_time=created).where(dbmod.Media.id == media.id).execute()
    return dbmod.Media.get_by_id(media.id)


def _job(media: dbmod.Media, age: dt.timedelta, state: str = "SUCCEEDED") -> dbmod.Transcription:
    when = dbmod.utcnow() - age
    job = dbmod.Transcription.create(tenant=media.tenant_id, media=media, state=state, create_time=when,
                                     end_time=when if state != "RUNNING" else None)
    dbmod.add_event(job, "done")
    item = dbmod.Enhancement.create(tenant=media.tenant_id, transcription=job, kind="summary", state="SUCCEEDED")
    dbmod.EnhancementChunk.create(enhancement=item, key="0", output={})
    return job


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, n: int = -1) -> bytes:
        out, self.data = self.data, b""
        return out


def _keys(store: LocalStore, tenant: Any) -> set[str]:
    return {o.key for o in store.list_objects(f"media/{tenant.id}/")}


def test_expiry_per_tenant_bounded_and_idempotent(env: tuple[Settings, LocalStore]) -> None:
    settings, store = env
    with dbmod.database.connection_context():
        short = dbmod.Tenant.create(name="short", retention_days=1)
        forever = dbmod.Tenant.create(name="forever", retention_days=0)
        default = dbmod.Tenant.create(name="default")  # 90 days
        expired = [_media(store, short, OLD) for _ in range(3)]
        for m in expired:
            _job(m, OLD)
        recent_media = _media(store, short, OLD)
        recent_job = _job(recent_media, dt.timedelta(hours=1))  # keeps its (old) media
        running = _job(_media(store, short, OLD), OLD, state="RUNNING")  # never deleted while unfinished
        kept = [_job(_media(store, t, OLD), OLD) for t in (forever, default)]

    first = retention.run(settings, store)
    assert (first.deleted_transcriptions, first.deleted_media) == (2, 2)  # the batch bound
    second = retention.run(settings, store)
    assert (second.deleted_transcriptions, second.deleted_media) == (1, 1)
    assert second.deleted_objects == 3  # original, audio and the derived object
    again = retention.run(settings, store)
    assert (again.deleted_transcriptions, again.deleted_media, again.deleted_objects) == (0, 0, 0)

    with dbmod.database.connection_context():
        assert not dbmod.Media.select().where(dbmod.Media.id.in_([m.id for m in expired])).exists()
        left = {j.id for j in dbmod.Transcription.select()}
        assert left == {recent_job.id, running.id, *(k.id for k in kept)}
        assert dbmod.Enhancement.select().count() == len(left) == dbmod.EnhancementChunk.select().count()
        assert {e.transcription_id for e in dbmod.TranscriptionEvent.select()} == left
        assert dbmod.Media.get_or_none(dbmod.Media.id == recent_media.id) is not None
    remaining = _keys(store, short)
    assert {k.split("/")[2] for k in remaining} == {recent_media.id, running.media_id} and len(remaining) == 6
    assert len(_keys(store, forever)) == len(_keys(store, default)) == 3


def test_orphans_missing_objects_and_events(env: tuple[Settings, LocalStore]) -> None:
    settings, store = env
    with dbmod.database.connection_context():
        tenant = dbmod.Tenant.create(name="t")
        lost = _media(store, tenant, dt.timedelta(0))
        fine = _media(store, tenant, dt.timedelta(0))
        job = _job(fine, dt.timedelta(0))
        dbmod.Transcription.delete().where(dbmod.Transcription.id == job.id).execute()  # as DeleteTranscription
    store.delete(lost.audio_key)
    old_orphan, new_orphan = f"media/{tenant.id}/gone/original", f"media/{tenant.id}/inflight/original"
    resuming = f"media/{tenant.id}/resuming/original"  # completed object, row not written yet, session alive
    with dbmod.database.connection_context():
        tenancy.UploadSession.create(tenant=tenant, size_bytes=1, sha256="", part_size=1, media_id="resuming",
                                   object_key=resuming, upload_id="u", expire_time=dbmod.utcnow() + OLD)
    for key in (old_orphan, new_orphan, resuming):
        store.put_stream(key, _Bytes(b"x"))
    past = time.time() - 2 * settings.orphan_min_age_s
    for key in (old_orphan, resuming):
        os.utime(store.root / key, (past, past))

    report = retention.run(settings, store)
    assert report.orphans == 1 and report.missing_objects == 1 and report.deleted_events == 1
    assert not store.exists(old_orphan) and store.exists(new_orphan) and store.exists(resuming)
    with dbmod.database.connection_context():
        failed = dbmod.Media.get_by_id(lost.id)
        assert failed.state == "FAILED" and "audio" in failed.error_message and "upload" in failed.error_message
        assert dbmod.Media.get_by_id(fine.id).state == "READY"
    again = retention.run(settings, store)
    assert (again.orphans, again.missing_objects, again.deleted_events) == (0, 0, 0)


def test_temp_dirs_older_than_the_limit(env: tuple[Settings, LocalStore], tmp_path: pathlib.Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    settings, store = env
    system_tmp = tmp_path / "systmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    own = pathlib.Path(settings.data_dir) / "tmp"
    own.mkdir(parents=True)
    old, new, other = system_tmp / "mp4t-old", system_tmp / "mp4t-new", system_tmp / "someone-else"
    for d in (old, new, other):
        d.mkdir()
        (d / "audio.wav").write_bytes(b"x")
    (own / "stale.part").write_bytes(b"x")
    past = time.time() - 2 * settings.temp_max_age_s
    for p in (old, old / "audio.wav", other, other / "audio.wav", own / "stale.part"):
        os.utime(p, (past, past))
    assert retention.run(settings, store).temp_files == 2
    assert not old.exists() and new.exists() and other.exists() and not (own / "stale.part").exists()


def test_claim_is_won_once_per_interval(env: tuple[Settings, LocalStore]) -> None:
    now = dbmod.utcnow()
    assert retention.claim("x", 60, now)
    assert not retention.claim("x", 60, now + dt.timedelta(seconds=30))
    assert retention.claim("x", 60, now + dt.timedelta(seconds=61))


def test_set_retention(env: tuple[Settings, LocalStore]) -> None:
    with dbmod.database.connection_context():
        tenant = dbmod.Tenant.create(name="acme")
    assert retention.set_retention("acme", 7).retention_days == 7
    assert retention.set_retention(tenant.id, None).retention_days is None
    with pytest.raises(LookupError):
        retention.set_retention("nobody", 1)
    with pytest.raises(ValueError):
        retention.set_retention("acme", -1)


def test_local_listing_is_ordered_and_resumable(env: tuple[Settings, LocalStore]) -> None:
    _, store = env
    for key in ("media/t/b/original", "media/t/a/original", "media/t/a/audio.wav", "other/x"):
        store.put_stream(key, _Bytes(b"x"))
    keys = [o.key for o in store.list_objects("media/")]
    assert keys == ["media/t/a/audio.wav", "media/t/a/original", "media/t/b/original"]
    assert [o.key for o in store.list_objects("media/", start_after=keys[0], limit=1)] == [keys[1]]


def test_a_transcription_with_an_unfinished_ai_item_is_kept(env: tuple[Settings, LocalStore]) -> None:
    """An AI item asked for on an old transcript is still working on it: the sweep waits for it."""
    settings, store = env
    with dbmod.database.connection_context():
        tenant = dbmod.Tenant.create(name="t", retention_days=1)
        job = _job(_media(store, tenant, OLD), OLD)
        running = dbmod.Enhancement.create(tenant=tenant, transcription=job, kind="translation", language="de",
                                           state="RUNNING")
    report = retention.run(settings, store)
    assert (report.deleted_transcriptions, report.deleted_media) == (0, 0)
    assert retention.delete_transcriptions([job.id]) == 0  # the delete itself checks again
    with dbmod.database.connection_context():
        assert dbmod.Enhancement.get_by_id(running.id).state == "RUNNING"
        dbmod.Enhancement.update(state="SUCCEEDED").where(dbmod.Enhancement.id == running.id).execute()
    report = retention.run(settings, store)
    assert (report.deleted_transcriptions, report.deleted_media) == (1, 1)


def test_lost_objects_fail_the_media_like_a_failed_preparation(tmp_path: pathlib.Path) -> None:
    """The media.failed webhook is recorded and the transcriptions waiting for the media fail with
    it (instead of burning their attempts on an object that is gone); finished ones are untouched."""
    from core import runtime, webhooks

    settings = Settings(data_dir=str(tmp_path / "data"), broker_url="memory", sweep_batch=10)
    runtime.init(settings)
    store = LocalStore(str(tmp_path / "objects"))
    try:
        with dbmod.database.connection_context():
            tenant = dbmod.Tenant.create(name="t")
            tenancy.WebhookEndpoint.create(tenant=tenant, url="http://127.0.0.1:9/", secret=webhooks.new_secret(),
                                           event_types=["media.failed", "transcription.failed"])
            lost = _media(store, tenant, dt.timedelta(0))
            waiting = dbmod.Transcription.create(tenant=tenant, media=lost, state="QUEUED")
            done = _job(lost, dt.timedelta(0))
        store.delete(lost.object_key)
        assert retention.run(settings, store).missing_objects == 1
        with dbmod.database.connection_context():
            assert dbmod.Media.get_by_id(lost.id).state == "FAILED"
            failed = dbmod.Transcription.get_by_id(waiting.id)
            assert (failed.state, failed.error_reason) == ("FAILED", "MEDIA_INVALID")
            assert "missing from object storage" in failed.error_message
            assert dbmod.Transcription.get_by_id(done.id).state == "SUCCEEDED"
            events = {e.type: e.body for e in tenancy.WebhookEvent.select()}
        assert set(events) == {"media.failed", "transcription.failed"} and "upload" in events["media.failed"]
        assert retention.run(settings, store).missing_objects == 0  # FAILED now: not READY, not again
    finally:
        dbmod.database.close()
