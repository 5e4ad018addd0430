"""Live sessions: a recording whose audio is stored as it arrives, so any replica continues it,
and which becomes a normal Media (and, if asked, a Transcription) when it ends.

Durability: a stream's audio is stored in chunks of about a second (``Recorder.flush``: one
object per chunk, then its ``LiveChunk`` row and the session's ``committed_size`` in one
transaction), and only stored bytes are acknowledged to the client. After a break the client
resumes at the acknowledged size and sends the rest again, so nothing it recorded is lost,
whatever happened to the replica (SIGKILL included). S3's multipart parts (at least 5 MiB,
about 160 s of 16 kHz PCM) would leave minutes unacknowledged; small objects, assembled once at
the end, do not.

Concurrency, as for upload sessions (core.upload_sessions): each stream bumps the session's
``generation``; a chunk or a final segment is recorded only while the session still has that
generation and the committed size the chunk started from, so a stale stream (its client
resumed elsewhere) stops with ``Superseded`` at its next write.

The end (``end``: the client's finish, or maintenance once the session expired): the chunks are
assembled into the media's original (a WAV for PCM16, the Ogg file for Opus), the Media row and
its preparation message are committed together with the session's ENDED state, the job (the
validated config stored at the start) is created like any other, the streamed seconds go into
the usage ledger, and the chunk objects are deleted. Idempotent: an ended session returns its
media and job.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import io
import os
import struct
import tempfile
from typing import Any

import peewee as pw
import structlog

from core import jobs, outbox, quotas, runtime, usage
from core.upload_sessions import NotActive, Rejected, Superseded, WrongOffset
from mp4totext.contracts import JobConfig, Priority, broker_priority
from observability import tracing
from storage.db import Media, Transcription, connection, locked, new_id, utcnow
from storage.live import LiveChunk, LiveSession
from storage.objects import original_key

log = structlog.get_logger(__name__)

ACTIVE, ENDED, FAILED = "ACTIVE", "ENDED", "FAILED"
PCM16, OGG_OPUS = "pcm16", "ogg_opus"
SAMPLE_RATE = 16000
PCM_BYTES_PER_S = 2 * SAMPLE_RATE
CONTENT_TYPE = {PCM16: "audio/wav", OGG_OPUS: "audio/ogg"}
IDLE_BEFORE_EXPIRY_S = 120.0

__all__ = ["NotActive", "Rejected", "Superseded", "WrongOffset", "Start", "start", "get", "Recorder", "end",
           "expire", "audio_from", "seconds_of"]


@dataclasses.dataclass(frozen=True)
class Start:
    encoding: str
    filename: str
    language: str
    model: str
    config: dict[str, Any]  # the LiveConfig as sent (JSON)
    job_config: JobConfig | None  # the transcription to run at the end (validated), or None
    job_priority: int
    request_id: str


def seconds_of(encoding: str, size: int) -> float:
    """Seconds of audio in ``size`` bytes (PCM16; Opus: unknown until decoded, 0)."""
    return size / PCM_BYTES_PER_S if encoding == PCM16 else 0.0


def start(tenant: str, owner: str, spec: Start) -> LiveSession:
    """A new session, or the caller's existing one with the same request_id."""
    if spec.request_id:
        existing = _by_request_id(tenant, spec.request_id)
        if existing is not None:
            return owned(existing, owner)
    ttl = runtime.get().settings.live_session_ttl_s
    now = utcnow()
    try:
        with locked():
            if spec.job_config is not None:
                quotas.admit(tenant, None, spec.job_config.to_json())  # refused now, not after the lecture
            return LiveSession.create(
                tenant=tenant, owner=owner, request_id=spec.request_id or None, encoding=spec.encoding,
                filename=spec.filename or f"live-{now:%Y%m%d-%H%M%S}.{'wav' if spec.encoding == PCM16 else 'ogg'}",
                language=spec.language, model=spec.model, config=spec.config,
                job_config=spec.job_config.to_json() if spec.job_config is not None else None,
                job_priority=spec.job_priority, media_id=new_id(), create_time=now, update_time=now,
                expire_time=now + dt.timedelta(seconds=ttl))
    except pw.IntegrityError:
        existing = _by_request_id(tenant, spec.request_id) if spec.request_id else None
        if existing is None:
            raise
        return owned(existing, owner)


def _by_request_id(tenant: str, request_id: str) -> LiveSession | None:
    with connection():
        return LiveSession.get_or_none(LiveSession.tenant == tenant, LiveSession.request_id == request_id)


def get(tenant: str, user: str, session_id: str) -> LiveSession | None:
    """The session if the caller may see it: a tenant's key all of its tenant's, a user their own."""
    clause = (LiveSession.id == session_id) & (LiveSession.tenant == tenant)
    if user:
        clause &= LiveSession.owner == user
    with connection():
        return LiveSession.get_or_none(clause)


def reload(session_id: str) -> LiveSession:
    with connection():
        return LiveSession.get_by_id(session_id)


def _chunk_key(session: LiveSession, offset: int, generation: int) -> str:
    """One object per stored chunk; a stale stream's write (another generation) never lands on a
    newer stream's object at the same offset."""
    return f"live/{session.tenant_id}/{session.id}/{offset:014d}-{generation}"


def audio_from(session: LiveSession, offset: int) -> bytes:
    """The stored bytes of ``session`` from byte ``offset`` to its committed size."""
    store = runtime.get().store
    with connection():
        chunks = list(LiveChunk.select().where(LiveChunk.session == session.id,
                                               LiveChunk.offset + LiveChunk.size > offset)
                      .order_by(LiveChunk.offset))
    out = bytearray()
    with tempfile.TemporaryDirectory(prefix="mp4t-live-") as tmp:
        path = os.path.join(tmp, "chunk")
        for c in chunks:
            store.get_file(c.key, path)
            with open(path, "rb") as fh:
                data = fh.read()
            out += data[max(0, offset - c.offset):c.size]
    return bytes(out)


def owned(s: LiveSession, owner: str) -> LiveSession:
    """``s`` if ``owner`` made it: a start with another caller's request_id gets nothing of it."""
    if s.owner != owner:
        raise RequestIdTaken("start.request_id was already used by another caller of this tenant; use a new "
                             "unique request_id (a UUID)")
    return s


class RequestIdTaken(Exception):
    """A request_id of another caller (ALREADY_EXISTS)."""


class Recorder:
    """One stream's writes to ``session``, from its committed size: audio, then final segments."""

    def __init__(self, session: LiveSession, write_offset: int) -> None:
        if session.state != ACTIVE:
            raise NotActive(f"live session is {session.state}: {session.error_message or 'start a new one'}")
        if write_offset != session.committed_size:
            raise WrongOffset(write_offset, session.committed_size)
        with locked():
            n = (LiveSession.update(generation=LiveSession.generation + 1, update_time=utcnow())
                 .where(LiveSession.id == session.id, LiveSession.state == ACTIVE,
                        LiveSession.committed_size == write_offset).execute())
            if n != 1:
                raise Superseded("the live session changed while this stream started; ask GetLiveSession for "
                                 "the acknowledged size and resume from there")
            self.s = LiveSession.get_by_id(session.id)
        self.generation = self.s.generation
        self.committed = write_offset
        self.buf = bytearray()

    def add(self, data: bytes) -> None:
        self.buf += data

    def flush(self) -> int:
        """Store the buffered bytes (one object), then record them; the committed size after."""
        if not self.buf:
            return self.committed
        data = bytes(self.buf)
        key = _chunk_key(self.s, self.committed, self.generation)
        store = runtime.get().store
        store.put_stream(key, io.BytesIO(data))
        with locked():
            moved = (LiveSession.update(committed_size=self.committed + len(data), update_time=utcnow())
                     .where(LiveSession.id == self.s.id, LiveSession.generation == self.generation,
                            LiveSession.committed_size == self.committed, LiveSession.state == ACTIVE).execute())
            if moved == 1:
                LiveChunk.create(session=self.s.id, offset=self.committed, size=len(data), key=key)
        if moved != 1:
            store.delete(key)  # nothing refers to it
            raise Superseded("another stream took over this live session; only the newest one writes")
        self.committed += len(data)
        del self.buf[:len(data)]
        return self.committed

    def segment(self, segment: dict[str, Any]) -> None:
        """Record a final segment (before it is sent: a resumed stream never sends it twice)."""
        with locked():
            row = LiveSession.get_or_none(LiveSession.id == self.s.id)
            if row is None or row.generation != self.generation or row.state != ACTIVE:
                raise Superseded("another stream took over this live session; only the newest one writes")
            row.segments = [*(row.segments or []), segment]
            row.update_time = utcnow()
            row.save()


def end(session_id: str, why: str = "finished", live_seconds: float | None = None,
        ) -> tuple[Media | None, Transcription | None]:
    """The recording becomes a media (and its job); idempotent. (None, None) when nothing was sent.
    ``live_seconds``: the audio decoded (the ledger's live seconds; default: from the PCM size)."""
    s = reload(session_id)
    if s.state == ENDED:
        return _media_and_job(s)
    if s.state != ACTIVE:
        raise NotActive(f"live session is {s.state}: {s.error_message}")
    if s.committed_size == 0:
        with connection():
            LiveSession.update(state=FAILED, error_message=f"{why} before any audio was stored", update_time=utcnow(),
                               ).where(LiveSession.id == s.id, LiveSession.state == ACTIVE).execute()
        return None, None
    key = original_key(s.tenant_id, s.media_id)
    _assemble(s, key)
    try:
        media = _record(s, key, live_seconds)
    except _AlreadyDone:
        fresh = reload(s.id)
        if fresh.state == ACTIVE:  # a stream stored more meanwhile: assemble again
            return end(session_id, why, live_seconds)
        return _media_and_job(fresh)
    job = _job(s, media)
    _drop_chunks(s)
    log.info("live_session_ended", live_session=s.id, media_id=media.id, job_id=job.id if job else None,
             size_bytes=media.size_bytes, why=why)
    return media, job


def _assemble(s: LiveSession, key: str) -> None:
    with tempfile.TemporaryDirectory(prefix="mp4t-live-") as tmp:
        path = os.path.join(tmp, "recording")
        with open(path, "wb") as out:
            if s.encoding == PCM16:
                out.write(_wav_header(s.committed_size))
            out.write(audio_from(s, 0))
        runtime.get().store.put_file(key, path, CONTENT_TYPE[s.encoding])


def _wav_header(data_bytes: int) -> bytes:
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, SAMPLE_RATE, PCM_BYTES_PER_S, 2, 16) + b"data" +
            struct.pack("<I", data_bytes))


class _AlreadyDone(Exception):
    pass


def _record(s: LiveSession, key: str, live_seconds: float | None) -> Media:
    """The media row, its preparation message, the session ENDED and the usage, in one transaction."""
    size = s.committed_size + (44 if s.encoding == PCM16 else 0)
    with outbox.sending(), locked():
        # only if no stream stored more since the recording was assembled from it
        n = (LiveSession.update(state=ENDED, update_time=utcnow())
             .where(LiveSession.id == s.id, LiveSession.state == ACTIVE,
                    LiveSession.committed_size == s.committed_size).execute())
        if n != 1:
            raise _AlreadyDone
        media = Media.create(id=s.media_id, tenant=s.tenant_id, filename=s.filename,
                             content_type=CONTENT_TYPE[s.encoding], size_bytes=size, object_key=key,
                             trace_context=tracing.inject(), owner=s.owner)
        outbox.add("prepare_media", media.id, broker_priority(Priority.NORMAL), tracing.inject())
        usage.on_upload(s.tenant_id, s.owner, size)
        usage.on_live(s.tenant_id, s.owner, seconds_of(s.encoding, s.committed_size) if live_seconds is None
                      else live_seconds)
    return media


def _job(s: LiveSession, media: Media) -> Transcription | None:
    if s.job_config is None:
        return None
    try:
        job = jobs.create(s.tenant_id, media, JobConfig.from_json(s.job_config), s.job_priority,
                          f"live:{s.id}", s.owner)
    except quotas.QuotaExceeded as exc:  # the recording is kept; the transcription can be asked again
        with connection():
            LiveSession.update(error_message=f"the transcription was not created: {exc}").where(
                LiveSession.id == s.id).execute()
        return None
    except pw.IntegrityError:  # created by a concurrent end
        return _media_and_job(reload(s.id))[1]
    with connection():
        LiveSession.update(transcription_id=job.id).where(LiveSession.id == s.id).execute()
    with outbox.sending():
        return jobs.to_waiting(job.id) or job


def _media_and_job(s: LiveSession) -> tuple[Media | None, Transcription | None]:
    with connection():
        media = Media.get_or_none(Media.id == s.media_id)
        job = (Transcription.get_or_none(Transcription.id == s.transcription_id) if s.transcription_id else
               Transcription.get_or_none(Transcription.tenant == s.tenant_id,
                                         Transcription.request_id == f"live:{s.id}"))
    return media, job


def _drop_chunks(s: LiveSession) -> None:
    store = runtime.get().store
    with connection():
        chunks = list(LiveChunk.select().where(LiveChunk.session == s.id))
    for c in chunks:
        store.delete(c.key)
    with connection():
        LiveChunk.delete().where(LiveChunk.session == s.id).execute()


def expire(limit: int = 50) -> int:
    """End up to ``limit`` ACTIVE sessions past their expire time (their recordings become media)."""
    with connection():
        quiet = utcnow() - dt.timedelta(seconds=IDLE_BEFORE_EXPIRY_S)  # a stream still writing is left alone
        due = list(LiveSession.select(LiveSession.id).where(LiveSession.state == ACTIVE,
                                                            LiveSession.expire_time < utcnow(),
                                                            LiveSession.update_time < quiet).limit(limit))
    for row in due:
        try:
            end(row.id, why="expired")
        except NotActive:
            continue
    return len(due)


def forget(limit: int = 200) -> int:
    """Delete sessions with nothing left to serve: FAILED ones past their expire time, and ENDED
    ones whose media was deleted (DeleteMedia, retention): their live transcript goes with it
    (deleted means gone), and any chunk objects left by a crash."""
    with connection():
        failed = list(LiveSession.select().where(LiveSession.state == FAILED, LiveSession.expire_time < utcnow())
                      .limit(limit))
        ended = list(LiveSession.select().where(
            LiveSession.state == ENDED, ~pw.fn.EXISTS(Media.select(Media.id).where(Media.id == LiveSession.media_id)))
            .limit(limit))
    for s in failed + ended:
        _drop_chunks(s)
        with connection():
            LiveSession.delete().where(LiveSession.id == s.id).execute()
    return len(failed) + len(ended)
