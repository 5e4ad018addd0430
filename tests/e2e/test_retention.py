"""Retention and maintenance (core.retention) on the real stack: PostgreSQL, SeaweedFS S3, RabbitMQ.

Sweeps run as the operator runs them (``python -m launch sweep``, a process of its own with its
own settings: batch size, orphan age) and, in the last test, as the low-queue worker's scheduled
actor. Expired rows are made by backdating their times in the database.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import os
import pathlib
import subprocess
import time
import uuid
from typing import Any

import grpc
import pytest

from mp4totext.client import Client
from mp4totext.v1 import media_pb2
from mp4totext.v1 import transcription_pb2 as tpb
from tests.support import Stack, wait_for
from tests.support.common import CLI
from tests.support.procs import log_lines

OLD = dt.timedelta(days=3)


def _cli(stack: Stack, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env={**stack.env, **env}, capture_output=True, text=True, timeout=180)


def sweep(stack: Stack, **env: str) -> dict[str, Any]:
    """Run one sweep in a process of its own; return its report."""
    done = _cli(stack, "sweep", "--label", "test", **env)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def new_tenant(stack: Stack, retention: str | None) -> tuple[str, str]:
    """(api key, tenant id) of a new tenant, its retention set with the operator command."""
    from server.auth import create_key

    name = f"ret-{uuid.uuid4().hex[:8]}"
    key, tenant = create_key(name)
    if retention is not None:
        done = _cli(stack, "set-retention", name, retention)
        assert done.returncode == 0, done.stderr[-2000:]
        out = json.loads(done.stdout)
        assert out["tenant_id"] == tenant.id and out["effective_days"] == (90 if retention == "default"
                                                                           else int(retention))
    return key, tenant.id


def objects(stack: Stack, s3_client: Any, prefix: str) -> set[str]:
    return {o.object_name for o in s3_client.list_objects(stack.s3["bucket"], prefix=prefix, recursive=True)}


def put(stack: Stack, s3_client: Any, key: str) -> None:
    s3_client.put_object(stack.s3["bucket"], key, io.BytesIO(b"x"), 1)


def stored_media(stack: Stack, s3_client: Any, tenant_id: str, age: dt.timedelta, store: bool = True) -> Any:
    """A READY media row (created ``age`` ago) with its original and audio in S3."""
    from storage.db import Media, new_id, utcnow
    from storage.objects import audio_key, original_key

    mid = new_id()
    keys = original_key(tenant_id, mid), audio_key(tenant_id, mid)
    if store:
        for key in keys:
            put(stack, s3_client, key)
    return Media.create(id=mid, tenant=tenant_id, object_key=keys[0], audio_key=keys[1], state="READY",
                        create_time=utcnow() - age)


def finished_job(media: Any, age: dt.timedelta) -> Any:
    from storage.db import Transcription, add_event, utcnow

    when = utcnow() - age
    job = Transcription.create(tenant=media.tenant_id, media=media, state="SUCCEEDED", stage="DONE",
                               create_time=when, end_time=when)
    add_event(job, "SUCCEEDED")
    return job


def backdate(job_name: str, media_name: str) -> None:
    from storage.db import Media, Transcription, utcnow

    when = utcnow() - OLD
    Transcription.update(create_time=when, end_time=when).where(Transcription.id == job_name.split("/")[1]).execute()
    Media.update(create_time=when).where(Media.id == media_name.split("/")[1]).execute()


def exists(model: Any, row_id: str) -> bool:
    return model.select().where(model.id == row_id).exists()


def transcribed(stack: Stack, key: str, speech_mp4: Any) -> tuple[Client, Any, Any]:
    c = Client(stack.target, key)
    media = c.upload(str(speech_mp4), content_type="video/mp4")
    job = c.wait(c.create(media.name, language_code="en").name, timeout=300)
    assert job.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED
    return c, media, job


def test_expired_work_is_deleted_with_its_objects(stack: Stack, db: Any, s3_client: Any, speech_mp4: Any) -> None:
    from storage.db import Media, Transcription, TranscriptionEvent

    short_key, short = new_tenant(stack, "1")
    _, keep = new_tenant(stack, "0")
    c_short, old_media, old_job = transcribed(stack, short_key, speech_mp4)  # objects written by the pipeline
    backdate(old_job.name, old_media.name)
    recent = finished_job(stored_media(stack, s3_client, short, OLD), dt.timedelta(hours=1))  # keeps its media
    kept = finished_job(stored_media(stack, s3_client, keep, OLD), OLD)
    old_prefix = f"media/{short}/{old_media.name.split('/')[1]}/"
    assert objects(stack, s3_client, old_prefix) == {old_prefix + "original", old_prefix + "audio.wav"}
    kept_before = objects(stack, s3_client, f"media/{keep}/")

    report = sweep(stack)
    assert report["deleted_transcriptions"] >= 1 and report["deleted_media"] >= 1, report
    assert report["deleted_objects"] >= 2 and report["failed"] == [], report
    job_id = old_job.name.split("/")[1]
    assert not exists(Transcription, job_id) and not exists(Media, old_media.name.split("/")[1])
    assert not TranscriptionEvent.select().where(TranscriptionEvent.transcription_id == job_id).exists()
    assert objects(stack, s3_client, old_prefix) == set()
    for call, name in ((c_short.get, old_job.name), (c_short.get_media, old_media.name)):
        with pytest.raises(grpc.RpcError) as err:
            call(name)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # the recent job of the same tenant (and its old media), and everything of the tenant that keeps forever
    assert c_short.get(f"transcriptions/{recent.id}").state == tpb.TRANSCRIPTION_STATE_SUCCEEDED
    assert c_short.get_media(f"media/{recent.media_id}").state == media_pb2.MEDIA_STATE_READY
    assert exists(Transcription, kept.id) and exists(Media, kept.media_id)
    assert objects(stack, s3_client, f"media/{keep}/") == kept_before and len(kept_before) == 2

    again = sweep(stack)  # idempotent: nothing more to do, nothing else touched
    assert (again["deleted_transcriptions"], again["deleted_media"], again["deleted_objects"]) == (0, 0, 0), again
    assert exists(Transcription, recent.id) and exists(Transcription, kept.id)
    assert objects(stack, s3_client, f"media/{keep}/") == kept_before
    c_short.close()


def test_each_run_is_bounded_by_the_batch(stack: Stack, db: Any, s3_client: Any) -> None:
    from storage.db import Media, Transcription

    _, tenant = new_tenant(stack, "1")
    media = [stored_media(stack, s3_client, tenant, OLD) for _ in range(5)]
    jobs = [finished_job(m, OLD) for m in media]
    _, default_tenant = new_tenant(stack, "default")  # 90 days: 3-day-old work stays
    kept = finished_job(stored_media(stack, s3_client, default_tenant, OLD), OLD)

    counts = []
    for _ in range(3):
        r = sweep(stack, MP4T_SWEEP_BATCH="3")
        counts.append((r["deleted_transcriptions"], r["deleted_media"], r["deleted_objects"]))
    assert counts == [(3, 3, 6), (2, 2, 4), (0, 0, 0)]
    assert not Transcription.select().where(Transcription.id.in_([j.id for j in jobs])).exists()
    assert not Media.select().where(Media.id.in_([m.id for m in media])).exists()
    assert objects(stack, s3_client, f"media/{tenant}/") == set()
    assert exists(Transcription, kept.id) and len(objects(stack, s3_client, f"media/{default_tenant}/")) == 2


def test_orphaned_objects_and_rows_without_objects(stack: Stack, db: Any, s3_client: Any, key_a: str) -> None:
    from storage.db import Media

    _, tenant = new_tenant(stack, None)
    lost = stored_media(stack, s3_client, tenant, dt.timedelta(0), store=False)  # READY, objects gone
    intact = stored_media(stack, s3_client, tenant, dt.timedelta(0))
    orphan = f"media/{tenant}/{uuid.uuid4().hex}/original"  # no row: a crashed delete, say
    put(stack, s3_client, orphan)
    age = {"MP4T_ORPHAN_MIN_AGE_S": "12"}

    def orphan_gone() -> bool:
        sweep(stack, **age)
        return orphan not in objects(stack, s3_client, orphan)

    wait_for(orphan_gone, 120, "the orphaned object to be deleted", interval=1)
    inflight = f"media/{tenant}/{uuid.uuid4().hex}/original"  # an upload whose row is not written yet
    put(stack, s3_client, inflight)
    sweep(stack, **age)
    assert inflight in objects(stack, s3_client, inflight)
    # rows with no object: FAILED, saying why (the missing-object scan may need a second pass)
    wait_for(lambda: sweep(stack) and Media.get_by_id(lost.id).state == "FAILED", 60, "lost media to fail")
    failed = Media.get_by_id(lost.id)
    assert "missing from object storage" in failed.error_message and "upload the file again" in failed.error_message
    assert Media.get_by_id(intact.id).state == "READY"
    assert objects(stack, s3_client, f"media/{tenant}/{intact.id}/") == {intact.object_key, intact.audio_key}


def test_workers_temp_files(stack: Stack, tmp_path: pathlib.Path) -> None:
    system_tmp, own = tmp_path / "tmp", pathlib.Path(stack.env["MP4T_DATA_DIR"]) / "tmp"
    own.mkdir(exist_ok=True)
    old, new, foreign, stale = system_tmp / "mp4t-old", system_tmp / "mp4t-new", system_tmp / "other", own / "x.part"
    for d in (old, new, foreign):
        d.mkdir(parents=True)
        (d / "audio.wav").write_bytes(b"x")
    stale.write_bytes(b"x")
    past = time.time() - 7200
    for p in (old, old / "audio.wav", foreign, foreign / "audio.wav", stale):
        os.utime(p, (past, past))
    report = sweep(stack, TMPDIR=str(system_tmp), MP4T_TEMP_MAX_AGE_S="3600")
    assert report["temp_files"] == 2, report
    assert not old.exists() and not stale.exists() and new.exists() and foreign.exists()


def test_scheduled_sweep_and_vacuum_on_the_low_queue(stack: Stack, db: Any, s3_client: Any) -> None:
    from storage.db import Transcription

    _, tenant = new_tenant(stack, "1")
    job = finished_job(stored_media(stack, s3_client, tenant, OLD), OLD)
    worker = stack.restart_worker("critical,low", MP4T_RETENTION_INTERVAL_S="2", MP4T_VACUUM_INTERVAL_S="1")
    try:
        def swept() -> list[dict[str, Any]]:
            return [ln for ln in log_lines(worker) if ln.get("event") == "retention_sweep"
                    and ln.get("label") == "scheduled" and ln.get("vacuumed")]

        line = wait_for(swept, 120, "a scheduled retention sweep that vacuumed")[0]
        assert {"transcription", "transcription_event", "outbox_message", "media"} <= set(line["vacuumed"])
        assert line["failed"] == [] and line["duration_s"] >= 0
        wait_for(lambda: not exists(Transcription, job.id), 60, "the expired job to be deleted by the worker")
        assert objects(stack, s3_client, f"media/{tenant}/") == set()
        row = db.execute_sql("SELECT last_vacuum, last_analyze FROM pg_stat_user_tables WHERE relname = %s",
                             ("transcription",)).fetchone()
        assert row[0] is not None and row[1] is not None
    finally:
        stack.restart_worker("critical,low")
