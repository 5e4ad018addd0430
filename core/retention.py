"""Retention and maintenance sweeps: what the low queue deletes, and when.

Each sweep is idempotent and bounded (``MP4T_SWEEP_BATCH`` rows or objects of each kind per run;
the rest go next time), so it can run anywhere, twice at once, or die halfway:

- expired transcriptions: finished (SUCCEEDED, FAILED, CANCELLED) longer ago than their tenant's
  retention (``Tenant.retention_days``, else ``MP4T_RETENTION_DAYS``; 0 = forever), with their
  AI items and events, in one transaction; one with an AI item still waiting or running (asked
  for on an old transcript) stays until the item ends;
- expired media: uploaded longer ago than the retention with no transcription left; the row goes
  first, then its objects (original, audio, anything else under its prefix). A sweep that dies
  in between leaves only objects no row refers to, which the orphan scan removes: no user ever
  sees a row whose object is gone;
- orphaned objects: objects under ``media/`` whose media row does not exist, older than
  ``MP4T_ORPHAN_MIN_AGE_S`` (an upload stores its object before its row: in-flight uploads are
  younger than that, and the media id of a live resumable upload session is kept); the scan
  continues where the last run stopped (a cursor in the database);
- rows with no object: READY media whose original or audio is missing from the store are
  marked FAILED with an error saying so, as a failed preparation is (core.jobs.media_failed: its
  media.failed webhook, and the transcriptions waiting for it fail); kept, not deleted: the user
  sees why it is unusable, and retention deletes it in time;
- events of transcriptions deleted by the API (DeleteTranscription leaves them);
- workers' temp dirs (``mp4t-*`` in the system temp dir, everything in ``<MP4T_DATA_DIR>/tmp``)
  untouched for ``MP4T_TEMP_MAX_AGE_S``;
- on PostgreSQL, ``VACUUM (ANALYZE)`` of the hot tables at most every ``MP4T_VACUUM_INTERVAL_S``,
  by one process at a time (an advisory lock), on a dedicated autocommit connection.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import pathlib
import shutil
import tempfile
import time
from typing import Any, Callable

import peewee as pw
import structlog

from core import jobs
from mp4totext.config import Settings
from mp4totext.contracts import ITEM_TERMINAL_STATES, TERMINAL_STATES, MediaState
from storage.db import (
    Enhancement,
    EnhancementChunk,
    MaintenanceState,
    Media,
    Tenant,
    Transcription,
    TranscriptionEvent,
    connection,
    database,
    locked,
    utcnow,
)
from storage.objects import ObjectStore, audio_key
from storage.tenancy import UploadSession

log = structlog.get_logger(__name__)

MEDIA_PREFIX = "media/"
TEMP_PREFIX = "mp4t-"  # workers' temp dirs (workers/actors.py, workers/pipeline.py)
VACUUM_LOCK_KEY = 0x6D70347476  # pg advisory lock: one VACUUM run at a time
# Tables that take most updates and deletes; those that do not exist (yet) are skipped.
HOT_TABLES = ("transcription", "transcription_event", "outbox_message", "enhancement", "enhancement_chunk",
              "media", "worker_info", "maintenance_state", "webhook_delivery", "webhook_event", "usage_record")
MISSING_OBJECT = ("the stored {what} of this media is missing from object storage (lost, or deleted outside the "
                  "service); upload the file again")
EPOCH = dt.datetime(1970, 1, 1)
_TERMINAL = [str(s) for s in TERMINAL_STATES]
_ITEM_TERMINAL = sorted(ITEM_TERMINAL_STATES)


@dataclasses.dataclass
class SweepReport:
    deleted_transcriptions: int = 0
    deleted_events: int = 0
    deleted_media: int = 0
    deleted_objects: int = 0
    orphans: int = 0
    missing_objects: int = 0
    temp_files: int = 0
    vacuumed: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    duration_s: float = 0.0


# ---------------------------------------------------------------- small helpers


def media_keys(media: Media) -> set[str]:
    """The keys a media row names (the audio's even before preparation wrote it)."""
    return {media.object_key, media.audio_key or "", audio_key(media.tenant_id, media.id)} - {""}


def delete_objects(store: ObjectStore, media: Media) -> int:
    """Delete every object of ``media`` (its known keys and anything derived under its prefix);
    return how many existed. Deleting a missing object is no error, so this can run twice."""
    try:
        listed = {o.key for o in store.list_objects(f"{MEDIA_PREFIX}{media.tenant_id}/{media.id}/")}
    except NotImplementedError:
        listed = set()
    for key in sorted(media_keys(media) | listed):
        store.delete(key)
    return len(listed)


def claim(name: str, interval_s: float, now: dt.datetime | None = None) -> bool:
    """Claim periodic task ``name`` if nobody did in the last ``interval_s`` (exactly one of many
    concurrent callers wins: a conditional UPDATE), so restarts and replicas do not multiply it."""
    now = now or utcnow()
    with connection():
        MaintenanceState.insert(name=name, update_time=EPOCH).on_conflict_ignore().execute()
        won = (MaintenanceState.update(update_time=now)
               .where(MaintenanceState.name == name,
                      MaintenanceState.update_time <= now - dt.timedelta(seconds=interval_s)).execute())
    return won == 1


def _cursor(name: str) -> str:
    with connection():
        row = MaintenanceState.get_or_none(MaintenanceState.name == name)
    return row.value if row else ""


def _set_cursor(name: str, value: str, old: str) -> None:
    if value == old:  # nothing to write (a sweep with nothing to do writes nothing)
        return
    with connection():
        (MaintenanceState.insert(name=name, value=value, update_time=utcnow())
         .on_conflict(conflict_target=[MaintenanceState.name],
                      update={MaintenanceState.value: value, MaintenanceState.update_time: utcnow()}).execute())


# ---------------------------------------------------------------- operator settings


def set_retention(tenant: str, days: int | None) -> Tenant:
    """Set a tenant's retention (by name or id) in days; 0 = forever, None = the configured default."""
    if days is not None and days < 0:
        raise ValueError(f"retention must be 0 (keep forever) or a number of days, not {days}")
    with connection():
        row = Tenant.get_or_none((Tenant.name == tenant) | (Tenant.id == tenant))
        if row is None:
            raise LookupError(f"no tenant named {tenant!r} (create one with `create-key --tenant NAME`)")
        Tenant.update(retention_days=days).where(Tenant.id == row.id).execute()
        return Tenant.get_by_id(row.id)


def retention_of(tenant: Tenant, default_days: int) -> int:
    return default_days if tenant.retention_days is None else tenant.retention_days


# ---------------------------------------------------------------- expiry


def _unfinished_items() -> pw.ModelSelect:
    """The AI items of the outer query's transcription that are still waiting or running."""
    return Enhancement.select(Enhancement.id).where((Enhancement.transcription == Transcription.id)
                                                    & Enhancement.state.not_in(_ITEM_TERMINAL))


def delete_transcriptions(ids: list[str], extra: pw.Expression | None = None) -> int:
    """Delete these transcriptions with their AI items and events, in one transaction; ``extra``
    re-checks a condition in the DELETE itself (a row that changed since it was read stays). One
    with an AI item still waiting or running is never deleted (the item works on its transcript)."""
    if not ids:
        return 0
    with locked():
        # First lock the rows (as EnhanceTranscription does before it adds an item), then check, in a
        # statement that sees what committed meanwhile.
        if isinstance(database.obj, pw.PostgresqlDatabase):
            list(Transcription.select(Transcription.id).where(Transcription.id.in_(ids)).for_update())
        cond = Transcription.id.in_(ids) & ~pw.fn.EXISTS(_unfinished_items())
        if extra is not None:
            cond &= extra
        gone = [r.id for r in Transcription.select(Transcription.id).where(cond)]
        if not gone:
            return 0
        items = Enhancement.select(Enhancement.id).where(Enhancement.transcription.in_(gone))
        EnhancementChunk.delete().where(EnhancementChunk.enhancement.in_(items)).execute()
        Enhancement.delete().where(Enhancement.transcription.in_(gone)).execute()
        TranscriptionEvent.delete().where(TranscriptionEvent.transcription_id.in_(gone)).execute()
        return Transcription.delete().where(Transcription.id.in_(gone)).execute()


def _delete_media_row(media_id: str) -> bool:
    """Delete the media row unless a transcription refers to it (checked under the row's lock:
    a transcription created meanwhile keeps it)."""
    with locked():
        q = Media.select(Media.id).where(Media.id == media_id)
        if isinstance(database.obj, pw.PostgresqlDatabase):
            q = q.for_update()
        if q.first() is None:
            return False
        if Transcription.select().where(Transcription.media == media_id).exists():
            return False
        return Media.delete().where(Media.id == media_id).execute() == 1


def expire(settings: Settings, store: ObjectStore, report: SweepReport, now: dt.datetime) -> None:
    """Delete what outlived its tenant's retention: transcriptions first, then media left alone."""
    job_budget = media_budget = settings.sweep_batch
    with connection():
        tenants = list(Tenant.select(Tenant.id, Tenant.retention_days).order_by(Tenant.id))
    for tenant in tenants:
        days = retention_of(tenant, settings.retention_days)
        if days <= 0:
            continue
        cutoff = now - dt.timedelta(days=days)
        finished_before = (Transcription.state.in_(_TERMINAL)
                           & (pw.fn.COALESCE(Transcription.end_time, Transcription.create_time) < cutoff)
                           & ~pw.fn.EXISTS(_unfinished_items()))  # checked again by the delete
        if job_budget > 0:
            with connection():
                ids = [r.id for r in Transcription.select(Transcription.id)
                       .where((Transcription.tenant == tenant.id) & finished_before)
                       .order_by(Transcription.create_time).limit(job_budget)]
            n = delete_transcriptions(ids, finished_before)
            report.deleted_transcriptions += n
            job_budget -= n
        if media_budget > 0:
            alone = ~pw.fn.EXISTS(Transcription.select(Transcription.id).where(Transcription.media == Media.id))
            with connection():
                old = list(Media.select().where((Media.tenant == tenant.id) & (Media.create_time < cutoff) & alone)
                           .order_by(Media.create_time).limit(media_budget))
            for media in old:
                if _delete_media_row(media.id):
                    report.deleted_media += 1
                    media_budget -= 1
                    report.deleted_objects += delete_objects(store, media)


# ---------------------------------------------------------------- orphans both ways


def _media_id_of(key: str) -> str | None:
    parts = key.split("/")  # media/<tenant>/<media id>/<name>
    return parts[2] if len(parts) >= 4 and parts[0] == "media" and parts[2] else None


def orphan_objects(settings: Settings, store: ObjectStore, report: SweepReport, now: dt.datetime) -> None:
    """Delete objects under media/ that no media row refers to and that are old enough not to be
    an upload in flight; continue the scan where the previous run stopped."""
    scan = max(settings.sweep_batch * 10, 1000)
    start = _cursor("orphan_scan")
    try:
        objects = store.list_objects(MEDIA_PREFIX, start_after=start, limit=scan)
    except NotImplementedError:
        return
    cutoff = now - dt.timedelta(seconds=settings.orphan_min_age_s)
    ids = {mid for o in objects if o.modified < cutoff and (mid := _media_id_of(o.key))}
    with connection():
        live = {r.id for r in Media.select(Media.id).where(Media.id.in_(list(ids)))} if ids else set()
        if ids:  # a resumable upload's object exists before its row, for as long as its session lives
            live |= {r.media_id for r in UploadSession.select(UploadSession.media_id)
                     .where(UploadSession.media_id.in_(list(ids)) & (UploadSession.expire_time > now))}
    last, done = start, True
    for obj in objects:
        if report.orphans >= settings.sweep_batch:
            done = False
            break
        mid = _media_id_of(obj.key)
        if obj.modified < cutoff and mid and mid not in live:
            store.delete(obj.key)
            report.orphans += 1
            log.info("orphan_object_deleted", key=obj.key, modified=obj.modified.isoformat())
        last = obj.key
    # A short page is the end of the store: the next run starts over.
    _set_cursor("orphan_scan", last if (not done or len(objects) >= scan) else "", start)


def missing_objects(settings: Settings, store: ObjectStore, report: SweepReport) -> None:
    """READY media whose original or audio is gone from the store -> FAILED, saying so."""
    start = _cursor("missing_scan")
    with connection():
        rows = list(Media.select(Media.id, Media.tenant, Media.object_key, Media.audio_key)
                    .where((Media.state == MediaState.READY) & (Media.id > start))
                    .order_by(Media.id).limit(settings.sweep_batch))
    for media in rows:
        gone = [what for what, key in (("upload", media.object_key), ("audio", media.audio_key))
                if key and not store.exists(key)]
        if gone:
            with connection():
                still_ready = Media.select().where((Media.id == media.id) & (Media.state == MediaState.READY)).exists()
            if not still_ready:
                continue
            failed_jobs = jobs.media_failed(media.id, MISSING_OBJECT.format(what=" and ".join(gone)),
                                            from_state=MediaState.READY)
            report.missing_objects += 1
            log.warning("media_object_missing", media_id=media.id, missing=gone, failed_jobs=len(failed_jobs))
    _set_cursor("missing_scan", rows[-1].id if len(rows) >= settings.sweep_batch else "", start)


def orphan_events(settings: Settings, report: SweepReport) -> None:
    """Events whose transcription was deleted (by the API, which leaves them): a bounded scan by
    event id that continues where the last run stopped."""
    scan = max(settings.sweep_batch * 10, 1000)
    start = _cursor("event_scan")
    with connection():
        rows = list(TranscriptionEvent.select(TranscriptionEvent.id, TranscriptionEvent.transcription_id)
                    .where(TranscriptionEvent.id > int(start or 0)).order_by(TranscriptionEvent.id).limit(scan))
        tids = list({r.transcription_id for r in rows})
        live = ({t.id for t in Transcription.select(Transcription.id).where(Transcription.id.in_(tids))}
                if tids else set())
        dead = [r.id for r in rows if r.transcription_id not in live][: settings.sweep_batch]
        if dead:
            report.deleted_events += TranscriptionEvent.delete().where(TranscriptionEvent.id.in_(dead)).execute()
    full = len(dead) >= settings.sweep_batch or len(rows) >= scan
    last = dead[-1] if len(dead) >= settings.sweep_batch else (rows[-1].id if rows else 0)
    _set_cursor("event_scan", str(last) if full else "", start)


# ---------------------------------------------------------------- temp files


def temp_dirs(settings: Settings) -> list[pathlib.Path]:
    """Where workers leave temporary files: mp4t-* in the system temp dir, and <data_dir>/tmp."""
    out = [p for p in pathlib.Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*")]
    own = pathlib.Path(settings.data_dir) / "tmp"
    if own.is_dir():
        out += list(own.iterdir())
    return out


def _newest_mtime(path: pathlib.Path) -> float:
    st = path.lstat()
    newest = st.st_mtime
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            try:
                newest = max(newest, child.lstat().st_mtime)
            except FileNotFoundError:
                continue
    return newest


def sweep_temp(settings: Settings, report: SweepReport) -> None:
    cutoff = time.time() - settings.temp_max_age_s
    for path in temp_dirs(settings):
        if report.temp_files >= settings.sweep_batch:
            return
        try:
            if _newest_mtime(path) >= cutoff:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # its worker finished meanwhile
            continue
        report.temp_files += 1


# ---------------------------------------------------------------- PostgreSQL


def vacuum(settings: Settings, report: SweepReport) -> None:
    """VACUUM (ANALYZE) the hot tables, at most every ``vacuum_interval_s``, one process at a time.

    VACUUM cannot run inside a transaction: it gets a connection of its own in autocommit mode
    (never one of the pool's), which also holds the session advisory lock until it closes.
    """
    if settings.vacuum_interval_s <= 0 or not isinstance(database.obj, pw.PostgresqlDatabase):
        return
    import psycopg2

    conn = psycopg2.connect(settings.resolved_database_url, connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (VACUUM_LOCK_KEY,))
            if not cur.fetchone()[0] or not claim("vacuum", settings.vacuum_interval_s):
                return
            for table in HOT_TABLES:
                cur.execute("SELECT to_regclass(%s)", (table,))
                if cur.fetchone()[0] is None:
                    continue
                cur.execute(f'VACUUM (ANALYZE) "{table}"')
                report.vacuumed.append(table)
    finally:
        conn.close()


# ---------------------------------------------------------------- the sweep


def run(settings: Settings, store: ObjectStore, now: dt.datetime | None = None, label: str = "") -> SweepReport:
    """One bounded pass of every sweep; a step that fails is logged and the others still run."""
    started = time.monotonic()
    now = now or utcnow()
    report = SweepReport()
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("expire", lambda: expire(settings, store, report, now)),
        ("events", lambda: orphan_events(settings, report)),
        ("orphans", lambda: orphan_objects(settings, store, report, now)),
        ("missing", lambda: missing_objects(settings, store, report)),
        ("temp", lambda: sweep_temp(settings, report)),
        ("vacuum", lambda: vacuum(settings, report)),
    ]
    for name, step in steps:
        try:
            step()
        except Exception as exc:
            report.failed.append(name)
            log.warning("retention_step_failed", step=name, error=f"{type(exc).__name__}: {exc}")
    report.duration_s = round(time.monotonic() - started, 3)
    log.info("retention_sweep", label=label, **dataclasses.asdict(report))
    return report


def summary(report: SweepReport) -> dict[str, Any]:
    return dataclasses.asdict(report)
