"""The caller's resources: tenant- and owner-scoped lookups, deletion, and a new job's trace parent.

Every lookup of a tenant's media or transcription by name, by request_id or in a listing goes
through ``visible`` (the one place ownership is decided): the tenant's API key sees all of its
tenant's rows, an end-user token (``current_user``) only the rows it created (``owner``).
Anything else is NOT_FOUND, exactly as if it did not exist.
"""
from __future__ import annotations

from typing import Any, Callable

import grpc
import peewee as pw
import structlog

from core import jobs
from server.auth import current_tenant, current_user
from server.errors import ApiError, not_found
from server.validation import is_name, parse_name
from storage.db import Media, Transcription, connection, utcnow

log = structlog.get_logger(__name__)

# A CreateTranscription without a client trace context continues its media's upload trace
# when the upload is this recent (older uploads start a new trace: a trace spanning days
# helps nobody).
TRACE_CONTINUE_S = 3600.0


def visible(model: Any) -> pw.Expression:
    """The WHERE clause of the rows of ``model`` (Media, Transcription) the caller may see."""
    clause = model.tenant == current_tenant.get()
    user = current_user.get("")
    return clause & (model.owner == user) if user else clause


def owner() -> str:
    """The ``owner`` of a row the caller creates ("" for the tenant's API key)."""
    return current_user.get("")


def get_media(name: str, field: str = "name") -> Media:
    media_id = parse_name(name, "media", field)
    with connection():
        m = Media.get_or_none(Media.id == media_id, visible(Media))
    if m is None:
        raise not_found(f"media/{media_id}")
    return m


def get_job(name: str) -> Transcription:
    job_id = parse_name(name, "transcriptions")
    with connection():
        j = Transcription.get_or_none(Transcription.id == job_id, visible(Transcription))
    if j is None:
        raise not_found(f"transcriptions/{job_id}")
    return j


def _own_retry(row: Any, request_id: str) -> Any:
    """A row found by request_id is the caller's retry only if the caller created it: request ids
    are unique per tenant, so another user's (or the API key's) use of it is a conflict that
    shows nothing of that row."""
    if row is None or row.owner == current_user.get(""):
        return row
    raise ApiError(grpc.StatusCode.ALREADY_EXISTS,
                   f"request_id {request_id[:128]!r} was already used by another caller of this tenant; "
                   "use a new unique request_id (a UUID) for each new request")


def job_by_request_id(tenant: str, request_id: str) -> Transcription | None:
    with connection():
        row = Transcription.get_or_none(Transcription.tenant == tenant, Transcription.request_id == request_id)
    return _own_retry(row, request_id)


def media_by_request_id(tenant: str, request_id: str) -> Media | None:
    with connection():
        row = Media.get_or_none(Media.tenant == tenant, Media.request_id == request_id)
    return _own_retry(row, request_id)


def delete_transcription(job: Transcription) -> None:
    # Deleting the row is what stops a running worker: its next progress report finds no claim.
    with connection():
        Transcription.delete().where(Transcription.id == job.id).execute()
    jobs.publish_deleted(job)


def trace_parent_for(method: str, request: Any, caller: Callable[[], tuple[str, str] | None]) -> dict[str, str] | None:
    """The stored upload trace a CreateTranscription continues: only the caller's own media
    (``caller()`` resolves the caller's credential to (tenant, user); None for other RPCs, for a
    caller without valid credentials, and when it cannot be read: a trace parent is never worth
    failing a call for)."""
    if request is None or not method.endswith("/CreateTranscription"):
        return None
    name = getattr(request, "media", "")
    if not is_name(name, "media"):
        return None
    try:
        who = caller()
        if who is None:
            return None
        tenant, user = who
        mine = (Media.tenant == tenant) & (Media.owner == user) if user else (Media.tenant == tenant)
        with connection():
            row = (Media.select(Media.trace_context, Media.create_time)
                   .where(Media.id == name[6:], mine).first())
    except Exception as exc:
        log.warning("trace_parent_unavailable", error=f"{type(exc).__name__}: {exc}")
        return None
    if row is None or not row.trace_context:
        return None
    if (utcnow() - row.create_time).total_seconds() > TRACE_CONTINUE_S:
        return None
    return row.trace_context

