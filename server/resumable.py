"""The resumable-upload RPCs of MediaService (CreateUploadSession, GetUploadSession, WriteUpload,
DeleteUploadSession) over core.upload_sessions: requests checked, core errors turned into statuses."""
from __future__ import annotations

import time
from typing import Any, Iterator

import grpc
import structlog

from core import quotas, runtime
from core import upload_sessions as sessions
from core.failures import is_infrastructure
from mp4totext.v1 import media_pb2
from observability import metrics
from server import convert
from server.auth import current_tenant, current_user
from server.errors import ApiError, failed_precondition, invalid, not_found, unavailable
from server.upload_reader import MAX_CHUNK
from server.upload_slots import Slot
from server.validation import content_type, parse_name, request_id
from storage.tenancy import UploadSession

log = structlog.get_logger(__name__)

COLLECTION = "uploadSessions"
STATES = {sessions.ACTIVE: media_pb2.UPLOAD_SESSION_STATE_ACTIVE,
          sessions.COMPLETED: media_pb2.UPLOAD_SESSION_STATE_COMPLETED,
          sessions.FAILED: media_pb2.UPLOAD_SESSION_STATE_FAILED}


def to_proto(s: UploadSession) -> media_pb2.UploadSession:
    msg = media_pb2.UploadSession(
        name=f"{COLLECTION}/{s.id}", filename=s.filename, content_type=s.content_type, size_bytes=s.size_bytes,
        sha256=s.sha256, committed_size=s.committed_size, part_size_bytes=s.part_size, state=STATES[s.state],
        media=f"media/{s.media_id}" if s.state == sessions.COMPLETED else "", error_message=s.error_message,
        request_id=s.request_id or "")
    for field, value in (("create_time", s.create_time), ("update_time", s.update_time),
                         ("expire_time", s.expire_time)):
        getattr(msg, field).CopyFrom(convert.ts(value))
    return msg


def _declared(request: media_pb2.CreateUploadSessionRequest, max_bytes: int) -> sessions.Declared:
    md = request.metadata
    if not md.filename or len(md.filename) > 1024:
        raise invalid("metadata.filename is required (at most 1024 characters)")
    if md.size_bytes <= 0:
        raise invalid("metadata.size_bytes is required for a resumable upload (the file's size in bytes)")
    if md.size_bytes > max_bytes:
        raise invalid(f"metadata.size_bytes={md.size_bytes} is over the upload limit of {max_bytes} bytes")
    sha = md.sha256.lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise invalid("metadata.sha256 is required for a resumable upload: the file's sha256, 64 hex characters")
    return sessions.Declared(md.filename, content_type(md.content_type), md.size_bytes, sha,
                             request_id(md.request_id, "metadata.request_id"))


def lookup(name: str, field: str = "name") -> UploadSession:
    session_id = parse_name(name, COLLECTION, field)
    s = sessions.get(current_tenant.get(), current_user.get(""), session_id)
    if s is None:
        raise not_found(f"{COLLECTION}/{session_id}")
    return s


def _mine(s: UploadSession) -> UploadSession:
    if s.owner != current_user.get(""):  # another caller's request_id: show nothing of it
        raise ApiError(grpc.StatusCode.ALREADY_EXISTS, "metadata.request_id was already used by another caller "
                       "of this tenant; use a new unique request_id (a UUID)")
    return s


def existing(request: media_pb2.CreateUploadSessionRequest) -> media_pb2.UploadSession | None:
    """The caller's session with this request's request_id, if any: a retry gets it back before
    any quota or backpressure check (those are for new sessions)."""
    rid = request_id(request.metadata.request_id, "metadata.request_id")
    s = sessions.by_request_id(current_tenant.get(), rid) if rid else None
    return to_proto(_mine(s)) if s is not None else None


def create(request: media_pb2.CreateUploadSessionRequest) -> media_pb2.UploadSession:
    declared = _declared(request, runtime.get().settings.max_upload_bytes)
    s = _mine(sessions.create(current_tenant.get(), current_user.get(""), declared))
    log.info("upload_session_created", upload_session=s.id, size_bytes=s.size_bytes, part_size=s.part_size)
    return to_proto(s)


def delete(request: media_pb2.DeleteUploadSessionRequest) -> media_pb2.DeleteUploadSessionResponse:
    sessions.delete(lookup(request.name))
    return media_pb2.DeleteUploadSessionResponse()


def _response(s: UploadSession, committed: int, media: Any = None) -> media_pb2.WriteUploadResponse:
    resp = media_pb2.WriteUploadResponse(committed_size=committed, upload_session=to_proto(s))
    if media is not None:
        resp.media.CopyFrom(convert.media_to_proto(media))
    return resp


def write(requests: Iterator[media_pb2.WriteUploadRequest], context: Any, slot: Slot
          ) -> media_pb2.WriteUploadResponse:
    """One WriteUpload stream: append from the committed size, finish at the declared size."""
    first = next(requests, None)
    if first is None:
        raise invalid("the first WriteUploadRequest must name the upload_session and carry write_offset")
    s = lookup(first.upload_session, "upload_session")
    if s.state == sessions.COMPLETED:  # a retry after the answer was lost: the same media again
        return _response(s, s.size_bytes, _call(sessions.finish, s))
    started, writer = time.monotonic(), _call(sessions.Writer, s, first.write_offset)
    try:
        _feed(writer, first)
        for req in slot.watch(requests):
            _feed(writer, req)
        if not writer.complete:
            if slot.expired or not context.is_active() or context.ended_within(0.02):
                raise ApiError(grpc.StatusCode.CANCELLED, f"the stream ended; {writer.committed} bytes are "
                               "committed, resume from there")
            return _response(s, writer.committed)  # the client paused: resume at committed_size
        media = _call(sessions.finish, s, writer.sha256)
    except grpc.RpcError:
        raise ApiError(grpc.StatusCode.CANCELLED, "upload stream cancelled by the client") from None
    finally:
        log.info("upload_session_write", upload_session=s.id, parts_stored=writer.parts_stored,
                 committed_size=writer.committed, seconds=round(time.monotonic() - started, 3))
    metrics.UPLOADS.labels("stored").inc()
    metrics.UPLOAD_BYTES.inc(s.size_bytes)
    metrics.UPLOAD_SIZE.observe(s.size_bytes)
    with_state = sessions.get(s.tenant_id, "", s.id) or s
    return _response(with_state, s.size_bytes, media)


def _feed(writer: sessions.Writer, req: media_pb2.WriteUploadRequest) -> None:
    if len(req.data) > MAX_CHUNK:
        raise invalid(f"data of {len(req.data)} bytes is over the 1 MiB ({MAX_CHUNK} bytes) limit per message")
    if req.data:
        _call(writer.feed, req.data, req.write_offset)


def _call(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with core's refusals as statuses and a failing object store as UNAVAILABLE."""
    try:
        return fn(*args)
    except (ApiError, grpc.RpcError, sessions.SessionError, quotas.QuotaExceeded):
        raise  # refusals: server/status_map.py (over the storage quota on completing: it FAILED)
    except Exception as exc:
        if getattr(exc, "code", None) == "NoSuchUpload":  # S3: the parts were aborted (session expired)
            raise failed_precondition("the upload session's stored parts are gone (it expired or was deleted); "
                                      "start a new upload session") from None
        if not (is_infrastructure(exc) or isinstance(exc, OSError)):
            raise
        log.warning("upload_session_storage_failed", error=f"{type(exc).__name__}: {exc}")
        raise unavailable(f"object storage failed ({type(exc).__name__}); ask GetUploadSession for the "
                          "committed size and resume", retry_after_s=2.0) from None
