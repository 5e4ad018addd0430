"""Backup and restore of a whole installation: the database and every stored object.

    mp4totext backup DIR      a consistent database dump + the objects it refers to, into DIR
    mp4totext restore DIR     put them back into an EMPTY database and object store

A backup is a folder ``DIR/backups/<UTC time>/`` holding ``database.dump`` (PostgreSQL: pg_dump's
custom format, one consistent snapshot; SQLite: the online backup API) and ``manifest.json``
(every object's key, size and sha256, plus the dump's sha256). Objects are mirrored once into
``DIR/objects/`` (stored objects never change after they are written), so a backup every
15 minutes copies only what is new: the RPO is the schedule's interval (docs: README "Backups").

Order matters: the database is dumped FIRST, then the objects are listed and copied, so every
object a dumped row refers to exists when it is copied (objects are written before their rows
commit and only deleted after their rows are). An object deleted by retention between the two
steps is missing from the copy together with the reason it was deleted; restore reports such
rows instead of failing.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import pathlib
import shutil
import sqlite3
import subprocess
import tempfile
import time
from typing import Any
from urllib.parse import urlparse

import structlog

from storage.objects import ObjectStore

log = structlog.get_logger(__name__)
MANIFEST = "manifest.json"
DUMP = "database.dump"
NOT_EMPTY = ("the target database already has tables: restore into a new, empty database (createdb NAME, then "
             "MP4T_DATABASE_URL=.../NAME) so nothing is mixed or overwritten")


class BackupError(Exception):
    """A backup or restore that cannot go on; the message says what to do."""


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _kind(url: str) -> str:
    scheme = urlparse(url).scheme
    if scheme in ("postgres", "postgresql"):
        return "postgresql"
    if scheme == "sqlite":
        return "sqlite"
    raise BackupError(f"cannot back up MP4T_DATABASE_URL={url!r}: only postgresql:// and sqlite:/// are supported")


def _sqlite_path(url: str) -> str:
    return url[len("sqlite:///"):] if url.startswith("sqlite:///") else urlparse(url).path


def _run(args: list[str]) -> None:
    tool = shutil.which(args[0])
    if tool is None:
        raise BackupError(f"{args[0]} is not installed: install PostgreSQL's client tools "
                          "(apt-get install postgresql-client) of the server's major version or newer")
    out = subprocess.run([tool, *args[1:]], capture_output=True, text=True)
    if out.returncode != 0:
        raise BackupError(f"{args[0]} failed (exit {out.returncode}): {out.stderr.strip()[-2000:]}")


def dump_database(url: str, path: pathlib.Path) -> None:
    if _kind(url) == "postgresql":
        # One snapshot of every table (pg_dump runs in a repeatable-read transaction).
        _run(["pg_dump", "--format=custom", "--no-owner", "--no-privileges", f"--file={path}", f"--dbname={url}"])
    else:
        src = sqlite3.connect(_sqlite_path(url))
        dst = sqlite3.connect(str(path))
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()


def _database_empty(url: str) -> bool:
    if _kind(url) == "postgresql":
        import psycopg2

        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
            return cur.fetchone()[0] == 0
    path = _sqlite_path(url)
    if not os.path.exists(path):
        return True
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0] == 0


def restore_database(url: str, path: pathlib.Path) -> None:
    if not _database_empty(url):
        raise BackupError(NOT_EMPTY)
    if _kind(url) == "postgresql":
        _run(["pg_restore", "--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction",
              f"--dbname={url}", str(path)])
    else:
        target = _sqlite_path(url)
        pathlib.Path(target).parent.mkdir(parents=True, exist_ok=True)
        src = sqlite3.connect(str(path))
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()


def _all_objects(store: ObjectStore) -> list[str]:
    keys: list[str] = []
    after = ""
    while True:
        page = store.list_objects("", start_after=after, limit=1000)
        if not page:
            return keys
        keys += [o.key for o in page]
        after = page[-1].key


def _mirror_path(root: pathlib.Path, key: str) -> pathlib.Path:
    path = (root / "objects" / key).resolve()
    if not str(path).startswith(str((root / "objects").resolve()) + os.sep):
        raise BackupError(f"object key {key!r} would leave the backup folder")
    return path


def backup(database_url: str, store: ObjectStore, root: pathlib.Path) -> dict[str, Any]:
    """Dump the database, then mirror every object; returns the manifest (also written to disk)."""
    began = time.monotonic()
    started = dt.datetime.now(dt.timezone.utc)
    folder = root / "backups" / started.strftime("%Y%m%dT%H%M%S.%fZ")
    folder.mkdir(parents=True)
    dump = folder / DUMP
    dump_database(database_url, dump)
    objects: dict[str, dict[str, Any]] = {}
    copied = copied_bytes = 0
    for key in _all_objects(store):
        target = _mirror_path(root, key)
        meta = target.with_name(target.name + ".sha256")
        if not (target.exists() and meta.exists()):
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
                tmp_path = pathlib.Path(tmp.name)
            try:
                store.get_file(key, str(tmp_path))
                meta.write_text(_sha256(tmp_path))
                os.replace(tmp_path, target)  # whole or not at all
            finally:
                tmp_path.unlink(missing_ok=True)
            copied += 1
            copied_bytes += target.stat().st_size
        objects[key] = {"size": target.stat().st_size, "sha256": meta.read_text().strip()}
    manifest = {
        "format": 1,
        "started": started.isoformat(),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
        "database": _kind(database_url),
        "database_sha256": _sha256(dump),
        "objects": objects,
    }
    tmp_manifest = folder / (MANIFEST + ".tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp_manifest, folder / MANIFEST)  # a backup without a manifest is unfinished, never used
    log.info("backup_finished", folder=str(folder), objects=len(objects), copied=copied, copied_bytes=copied_bytes,
             seconds=round(time.monotonic() - began, 2))
    return {**manifest, "folder": str(folder), "copied": copied}


def latest(root: pathlib.Path) -> pathlib.Path:
    done = sorted(p.parent for p in (root / "backups").glob(f"*/{MANIFEST}"))
    if not done:
        raise BackupError(f"no finished backup in {root / 'backups'} (a finished one has {MANIFEST})")
    return done[-1]


def restore(database_url: str, store: ObjectStore, root: pathlib.Path, folder: pathlib.Path | None = None
            ) -> dict[str, Any]:
    """Restore the newest finished backup (or ``folder``): objects first, verified, then the database,
    so a row never exists without its object."""
    began = time.monotonic()
    folder = folder or latest(root)
    manifest = json.loads((folder / MANIFEST).read_text())
    if _sha256(folder / DUMP) != manifest["database_sha256"]:
        raise BackupError(f"{folder / DUMP} does not match its manifest: the backup is damaged; use an older one")
    if manifest["database"] != _kind(database_url):
        raise BackupError(f"the backup is of a {manifest['database']} database, the target is {_kind(database_url)}")
    if not _database_empty(database_url):
        raise BackupError(NOT_EMPTY)
    restored_bytes = 0
    for key, meta in sorted(manifest["objects"].items()):
        path = _mirror_path(root, key)
        if not path.exists() or _sha256(path) != meta["sha256"]:
            raise BackupError(f"object {key!r} is missing or damaged in {root / 'objects'}; nothing was restored "
                              "to the database: use an older backup")
        store.put_file(key, str(path))
        restored_bytes += meta["size"]
    restore_database(database_url, folder / DUMP)
    seconds = time.monotonic() - began
    log.info("restore_finished", folder=str(folder), objects=len(manifest["objects"]), bytes=restored_bytes,
             seconds=round(seconds, 2))
    return {"folder": str(folder), "objects": len(manifest["objects"]), "bytes": restored_bytes,
            "backup_started": manifest["started"], "seconds": round(seconds, 3)}
