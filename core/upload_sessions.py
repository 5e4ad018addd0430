"""Resumable uploads: sessions whose parts persist in object storage, so any replica continues them.

A session reserves a media id (the upload's object key is that media's original) and starts a
multipart upload in the store. Each WriteUpload stream appends bytes through a ``Writer``:
every full part (``part_size``, the last one shorter) is stored with ``put_part`` and then
recorded (an ``UploadPart`` row and the session's ``committed_size``, in one transaction), so
the committed size only ever counts stored parts, and a part once stored is never sent again.
Bytes after the last stored part live in the stream's memory (at most one part) and are sent
again after a break.

Checking the file before the media row exists: every part's etag from the store must be the MD5
of the bytes sent (what S3 computes for a part), and completion assembles exactly the recorded
parts, then the object's size is checked. A stream that carried the whole file from byte 0 hashed
it as it went: its sha256 is compared directly. A resumed stream saw only part of the file, and a
hash state cannot be saved (hashlib objects do not pickle; S3 parts cannot be read before
completion), so then the assembled object is read back from the store once and hashed (about a
second per 200 MB: proxies' inactivity timeouts must exceed it; a client cut off meanwhile
resumes at the full size and gets the same media).

Concurrency: every stream bumps the session's ``generation``; a part is recorded only while the
session still has that generation and the committed size the part started from. A stale stream
(its client gave up on it and resumed elsewhere) stops with ``Superseded`` at its next part; if
it stored a part over a newer stream's, the part's etag no longer matches the recorded one and
completion fails instead of assembling a mixed file (and the sha256 check backs that up); the
session then FAILS and nothing is kept.

Storage quota: a session's declared size counts as stored while it is ACTIVE (core.quotas
check_upload, at creation); completion checks again under the tenant's quota row lock, so of
sessions created at the same moment only those that still fit get a media row (the others FAIL,
RESOURCE_EXHAUSTED, and their object is deleted).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import time

import peewee as pw
import structlog

from core import outbox, quotas, runtime, usage
from mp4totext.contracts import Priority, broker_priority
from observability import tracing
from storage.db import Media, connection, locked, new_id, utcnow
from storage.objects import ObjectStore, StorageError, original_key
from storage.tenancy import UploadPart, UploadSession

log = structlog.get_logger(__name__)

ACTIVE, COMPLETED, FAILED = "ACTIVE", "COMPLETED", "FAILED"


class SessionError(Exception):
    """A refused write; the message is for the client."""


class Rejected(SessionError):
    """Bad data or a file that does not match what was declared (INVALID_ARGUMENT)."""


class WrongOffset(SessionError):
    """The stream does not start at the committed size (FAILED_PRECONDITION)."""

    def __init__(self, offset: int, committed: int) -> None:
        super().__init__(f"write_offset {offset} is not the committed size {committed} of this upload session; "
                         f"resume with write_offset={committed} (GetUploadSession tells the committed size)")
        self.committed = committed


class NotActive(SessionError):
    """The session failed or is gone (FAILED_PRECONDITION / NOT_FOUND)."""


class Superseded(SessionError):
    """A newer stream took the session over (ABORTED)."""


@dataclasses.dataclass(frozen=True)
class Declared:
    filename: str
    content_type: str
    size_bytes: int
    sha256: str
    request_id: str


def part_size_for(size: int, configured: int, store: ObjectStore) -> int:
    """The part size of a ``size``-byte file: the configured one, at least the store's smallest
    part, and large enough that the file fits in the store's most parts."""
    return max(configured, store.min_part_size, -(-size // store.max_parts))


def create(tenant: str, owner: str, declared: Declared) -> UploadSession:
    """A new session (or the caller's existing one with the same request_id)."""
    rt = runtime.get()
    if declared.request_id:
        existing = by_request_id(tenant, declared.request_id)
        if existing is not None:
            return existing
    media_id = new_id()
    key = original_key(tenant, media_id)
    upload_id = rt.store.start_parts(key, declared.content_type or "application/octet-stream")
    now = utcnow()
    try:
        with locked():
            return UploadSession.create(
                tenant=tenant, owner=owner, request_id=declared.request_id or None, filename=declared.filename,
                content_type=declared.content_type, size_bytes=declared.size_bytes, sha256=declared.sha256,
                part_size=part_size_for(declared.size_bytes, rt.settings.upload_part_size, rt.store), media_id=media_id,
                object_key=key, upload_id=upload_id, create_time=now, update_time=now,
                expire_time=now + dt.timedelta(seconds=rt.settings.upload_session_ttl_s))
    except Exception as exc:
        rt.store.abort_parts(key, upload_id)
        if isinstance(exc, pw.IntegrityError) and declared.request_id:  # a concurrent retry created it
            existing = by_request_id(tenant, declared.request_id)
            if existing is not None:
                return existing
        raise


def by_request_id(tenant: str, request_id: str) -> UploadSession | None:
    with connection():
        return UploadSession.get_or_none(UploadSession.tenant == tenant, UploadSession.request_id == request_id)


def get(tenant: str, user: str, session_id: str) -> UploadSession | None:
    """The session if the caller may see it: the tenant's key sees all of its tenant's, a user
    only their own."""
    clause = (UploadSession.id == session_id) & (UploadSession.tenant == tenant)
    if user:
        clause &= UploadSession.owner == user
    with connection():
        return UploadSession.get_or_none(clause)


def media_of(session: UploadSession) -> Media | None:
    with connection():
        return Media.get_or_none(Media.id == session.media_id)


def delete(session: UploadSession) -> None:
    """Discard the session's parts and the session (a completed session's media stays)."""
    if session.state == ACTIVE:
        runtime.get().store.abort_parts(session.object_key, session.upload_id)
    with connection():
        UploadPart.delete().where(UploadPart.session == session.id).execute()
        UploadSession.delete().where(UploadSession.id == session.id).execute()


class Writer:
    """One WriteUpload stream's appends to ``session``, starting at its committed size."""

    def __init__(self, session: UploadSession, write_offset: int) -> None:
        if session.state != ACTIVE:
            raise NotActive(f"upload session is {session.state}: {session.error_message or 'start a new one'}")
        if write_offset != session.committed_size:
            raise WrongOffset(write_offset, session.committed_size)
        with locked():
            n = (UploadSession.update(generation=UploadSession.generation + 1, update_time=utcnow())
                 .where(UploadSession.id == session.id, UploadSession.state == ACTIVE,
                        UploadSession.committed_size == write_offset).execute())
            if n != 1:
                raise Superseded("the upload session changed while this stream started; ask GetUploadSession "
                                 "for the committed size and resume from there")
            self.generation = UploadSession.get_by_id(session.id).generation
        self.s = session
        self.committed = self.received = write_offset
        self.buf = bytearray()
        self.parts_stored = 0
        self.hasher = hashlib.sha256() if write_offset == 0 else None  # sees every byte: no read-back

    @property
    def sha256(self) -> str | None:
        """The file's sha256 if this stream carried all of it."""
        return self.hasher.hexdigest() if self.hasher is not None and self.complete else None

    @property
    def complete(self) -> bool:
        return self.committed == self.s.size_bytes

    def feed(self, data: bytes, write_offset: int = 0) -> None:
        """Append ``data``; store (and commit) each part that fills up, and the last one."""
        if write_offset and write_offset != self.received:
            raise Rejected(f"write_offset {write_offset} does not match the {self.received} bytes received")
        if self.received + len(data) > self.s.size_bytes:
            raise Rejected(f"more data than the declared size_bytes={self.s.size_bytes}")
        self.buf += data
        self.received += len(data)
        if self.hasher is not None:
            self.hasher.update(data)
        while len(self.buf) >= self.s.part_size:
            self._store(self.s.part_size)
        if self.received == self.s.size_bytes and self.buf:
            self._store(len(self.buf))

    def _store(self, n: int) -> None:
        number = self.committed // self.s.part_size + 1
        data = bytes(self.buf[:n])
        etag = runtime.get().store.put_part(self.s.object_key, self.s.upload_id, number, data).strip('"')
        sent = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if etag != sent:
            raise StorageError(f"object storage stored part {number} with etag {etag}, not the MD5 {sent} of the "
                               "bytes sent")
        with locked():
            moved = (UploadSession.update(committed_size=self.committed + n, update_time=utcnow())
                     .where(UploadSession.id == self.s.id, UploadSession.generation == self.generation,
                            UploadSession.committed_size == self.committed, UploadSession.state == ACTIVE)
                     .execute())
            if moved != 1:
                raise Superseded("another WriteUpload stream took over this upload session; only the newest "
                                 "stream writes (ask GetUploadSession for the committed size)")
            UploadPart.create(session=self.s.id, number=number, size=n, etag=etag)
        del self.buf[:n]
        self.committed += n
        self.parts_stored += 1


def finish(session: UploadSession, seen_sha256: str | None = None) -> Media:
    """Assemble the parts, check the object's size and sha256 (``seen_sha256``: hashed while the
    whole file streamed through this process; else read back), then create the media (READY flow
    as for a single-stream upload). Idempotent: a finished session returns its media."""
    if session.state == COMPLETED:
        media = media_of(session)
        if media is None:
            raise NotActive(f"the media of this upload session (media/{session.media_id}) was deleted")
        return media
    store = runtime.get().store
    with connection():
        parts = list(UploadPart.select().where(UploadPart.session == session.id).order_by(UploadPart.number))
    if sum(p.size for p in parts) != session.size_bytes or [p.number for p in parts] != list(range(1, len(parts) + 1)):
        raise NotActive("the upload session's parts do not cover the file; ask GetUploadSession and resume")
    try:
        _complete(session, [(p.number, p.etag) for p in parts])
    except Exception as exc:
        if getattr(exc, "code", None) != "InvalidPart":
            raise
        why = (f"a stored part does not match the one recorded ({exc}): a superseded WriteUpload stream "
               "overwrote it; nothing was kept: start a new upload session")
        _fail(session, why)
        raise Rejected(why) from None
    if seen_sha256 is not None:
        size, sha = store.size_of(session.object_key), seen_sha256
    else:
        size, sha = store.sha256_of(session.object_key)
    if size != session.size_bytes or sha != session.sha256:
        why = (f"the uploaded file has {size} bytes and sha256 {sha}, but size_bytes={session.size_bytes} and "
               f"sha256={session.sha256} were declared; nothing was kept: start a new upload session")
        _fail(session, why)
        raise Rejected(why)
    return _record(session)


def _fail(session: UploadSession, why: str) -> None:
    """The session FAILED with ``why``; its parts and assembled object are deleted (unless a
    concurrent stream completed or failed it first: then that one's outcome stands)."""
    with connection():
        n = UploadSession.update(state=FAILED, error_message=why, update_time=utcnow()).where(
            UploadSession.id == session.id, UploadSession.state == ACTIVE).execute()
    if n:
        store = runtime.get().store
        store.abort_parts(session.object_key, session.upload_id)
        store.delete(session.object_key)
    log.warning("upload_session_failed", upload_session=session.id, error=why)


def _complete(session: UploadSession, parts: list[tuple[int, str]]) -> None:
    """complete_parts, tolerating a concurrent completion of the same session (a client that was
    cut off while this one verified resumes and finishes too): its upload is gone, the object
    appears."""
    store = runtime.get().store
    for attempt in range(20):
        try:
            store.complete_parts(session.object_key, session.upload_id, parts)
            return
        except Exception as exc:
            if getattr(exc, "code", None) != "NoSuchUpload" or attempt == 19:
                raise
            if store.exists(session.object_key):
                return
            time.sleep(0.5)


def _record(session: UploadSession) -> Media:
    """The media row and the session's COMPLETED state, committed with the preparation message."""
    try:
        with outbox.sending(), locked():
            done = (UploadSession.update(state=COMPLETED, update_time=utcnow())
                    .where(UploadSession.id == session.id, UploadSession.state == ACTIVE).execute())
            if done != 1:
                raise _AlreadyDone
            quotas.check_stored(session.tenant_id, session.size_bytes)  # under the tenant's quota row lock
            # No request_id: the session is idempotent by its own, and the media's belong to UploadMedia.
            media = Media.create(id=session.media_id, tenant=session.tenant_id,
                                 filename=session.filename, content_type=session.content_type,
                                 size_bytes=session.size_bytes, sha256=session.sha256,
                                 object_key=session.object_key, trace_context=tracing.inject(), owner=session.owner)
            outbox.add("prepare_media", media.id, broker_priority(Priority.NORMAL), tracing.inject())
            usage.on_upload(session.tenant_id, session.owner, session.size_bytes)  # the ledger, with the row
    except quotas.QuotaExceeded as exc:  # nothing was written: the file is not kept either
        _fail(session, f"{exc}; the uploaded file was not kept")
        raise
    except (_AlreadyDone, pw.IntegrityError):  # a concurrent stream completed it first
        with connection():
            fresh = UploadSession.get_or_none(UploadSession.id == session.id)
        if fresh is None or fresh.state != COMPLETED:
            raise NotActive("the upload session was deleted or failed while it completed") from None
        return finish(fresh)
    log.info("upload_session_completed", upload_session=session.id, media_id=media.id, size_bytes=media.size_bytes)
    return media


class _AlreadyDone(Exception):
    pass


def live_upload_ids() -> set[str]:
    """Upload ids of unfinished sessions: the stale-upload sweep leaves their parts alone."""
    with connection():
        return {s.upload_id for s in UploadSession.select(UploadSession.upload_id)
                .where(UploadSession.state == ACTIVE)}


def expire(limit: int = 200) -> int:
    """Delete up to ``limit`` sessions past their expire_time, aborting unfinished ones' parts
    (idempotent: aborting twice is harmless; a completed session's media stays)."""
    with connection():
        due = list(UploadSession.select().where(UploadSession.expire_time < utcnow())
                   .order_by(UploadSession.expire_time).limit(limit))
    for session in due:
        delete(session)
        log.info("upload_session_expired", upload_session=session.id, state=session.state,
                 committed_size=session.committed_size, tenant_id=session.tenant_id)
    return len(due)
