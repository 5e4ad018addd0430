"""The caller's resources: tenant-scoped lookups, deletion, and a new job's trace parent."""
from __future__ import annotations

from typing import Any, Callable

import structlog

from core import jobs
from server.auth import current_tenant
from server.errors import not_found
from server.validation import is_name, parse_name
from storage.db import Media, Transcription, connection, utcnow

log = structlog.get_logger(__name__)

# A CreateTranscription without a client trace context continues its media's upload trace
# when the upload is this recent (older uploads start a new trace: a trace spanning days
# helps nobody).
TRACE_CONTINUE_S = 3600.0


def get_media(name: str, field: str = "name") -> Media:
    media_id = parse_name(name, "media", field)
    with connection():
        m = Media.get_or_none(Media.id == media_id, Media.tenant == current_tenant.get())
    if m is None:
        raise not_found(f"media/{media_id}")
    return m


def get_job(name: str) -> Transcription:
    job_id = parse_name(name, "transcriptions")
    with connection():
        j = Transcription.get_or_none(Transcription.id == job_id, Transcription.tenant == current_tenant.get())
    if j is None:
        raise not_found(f"transcriptions/{job_id}")
    return j


def job_by_request_id(tenant: str, request_id: str) -> Transcription | None:
    with connection():
        return Transcription.get_or_none(Transcription.tenant == tenant, Transcription.request_id == request_id)


def media_by_request_id(tenant: str, request_id: str) -> Media | None:
    with connection():
        return Media.get_or_none(Media.tenant == tenant, Media.request_id == request_id)


def delete_transcription(job: Transcription) -> None:
    # Deleting the row is what stops a running worker: its next progress report finds no claim.
    with connection():
        Transcription.delete().where(Transcription.id == job.id).execute()
    jobs.publish_deleted(job)


def trace_parent_for(method: str, request: Any, tenant: Callable[[], str | None]) -> dict[str, str] | None:
    """The stored upload trace a CreateTranscription continues: only the caller's own media
    (``tenant()`` resolves the caller's key; None for other RPCs, for a caller without a valid
    key, and when it cannot be read: a trace parent is never worth failing a call for)."""
    if request is None or not method.endswith("/CreateTranscription"):
        return None
    name = getattr(request, "media", "")
    if not is_name(name, "media"):
        return None
    try:
        owner = tenant()
        if owner is None:
            return None
        with connection():
            row = (Media.select(Media.trace_context, Media.create_time)
                   .where(Media.id == name[6:], Media.tenant == owner).first())
    except Exception as exc:
        log.warning("trace_parent_unavailable", error=f"{type(exc).__name__}: {exc}")
        return None
    if row is None or not row.trace_context:
        return None
    if (utcnow() - row.create_time).total_seconds() > TRACE_CONTINUE_S:
        return None
    return row.trace_context

