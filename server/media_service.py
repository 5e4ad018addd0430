"""mp4totext.v1.MediaService: streaming upload into object storage, then media preparation."""
from __future__ import annotations

import functools
import threading
import time
from typing import Any, Iterator

import grpc
import peewee as pw
import structlog

from core import outbox, quotas, retention, runtime, usage
from mp4totext.contracts import MediaState, Priority, broker_priority
from mp4totext.v1 import media_pb2, media_pb2_grpc
from observability import metrics, tracing
from server import convert, resumable
from server.auth import current_tenant
from server.errors import ApiError, exhausted, failed_precondition, invalid, unavailable
from server.paging import page_size, paged, tenant_listing
from server.resources import delete_transcription, get_media, media_by_request_id, owner
from server.upload_reader import ClientGone, UploadReader, UploadRejected
from server.upload_slots import Slot, UploadSlots
from server.validation import UploadSpec, enum_filter, upload_metadata
from storage.db import Media, Transcription, connection, locked, new_id
from storage.objects import original_key

log = structlog.get_logger(__name__)

# A refused upload (over quota, backpressure, bad metadata) is answered only after the rest of a
# small stream was read and dropped: a status sent while the client is still sending makes
# HAProxy reset the stream, and the phone got CANCELLED (not retried) instead of the status
# (seen in the load test: 112 of 500 uploads). Larger streams, or slower ones, are not waited for.
DRAIN_BYTES = 4 * 1024 * 1024
DRAIN_S = 2.0
NOT_DRAINED = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


def _drain(requests: Iterator[Any], context: Any, exc: ApiError) -> None:
    """Read what is left of ``requests`` (DRAIN_BYTES, DRAIN_S at most) before ``exc`` is answered."""
    if exc.code in NOT_DRAINED:
        return
    def end() -> None:  # a stalled sender: the status goes out now, with its details
        if exc.rich:
            context.set_trailing_metadata(exc.status().trailing_metadata)
        context.end_call(exc.code, exc.message)

    timer = threading.Timer(DRAIN_S, end)
    timer.daemon = True
    timer.start()
    read = 0
    try:
        for message in requests:
            read += len(message.chunk.data) if message.HasField("chunk") else 0
            if read > DRAIN_BYTES:
                break
    except Exception:  # the stream broke or was ended: the status is what is left to send
        pass
    finally:
        timer.cancel()


def _response(media: Media) -> media_pb2.UploadMediaResponse:
    return media_pb2.UploadMediaResponse(media=convert.media_to_proto(media), committed_size=media.size_bytes)


def _store(spec: UploadSpec, key: str, requests: Iterator[Any], context: grpc.ServicerContext,
           slot: Slot, cap: int = 0) -> UploadReader:
    """Stream the chunks into the object store under ``key`` (at most ``cap`` bytes when set: the
    tenant's quota); nothing is left there on failure."""
    rt = runtime.get()
    limit = min(rt.settings.max_upload_bytes, cap or rt.settings.max_upload_bytes)
    reader = UploadReader(slot.watch(requests), limit, spec.size_bytes, spec.sha256,
                          lambda: context.is_active() and not slot.expired)
    try:
        rt.store.put_stream(key, reader, spec.content_type or "application/octet-stream")
    except Exception as exc:
        raise _upload_error(exc, slot, reader, rt.settings.upload_idle_timeout_s) from None
    if context.ended_within(0.02):  # cancelled after the last byte: the client will retry (request_id)
        metrics.UPLOADS.labels("cancelled").inc()
        rt.store.delete(key)
        raise ApiError(grpc.StatusCode.CANCELLED, "upload cancelled by the client")
    return reader


def _upload_error(exc: Exception, slot: Slot, reader: UploadReader, idle_s: float) -> ApiError:
    """The status of an upload whose stream or storage failed (nothing was stored)."""
    if slot.expired:  # ended for idleness: whatever the stream raised after that
        metrics.UPLOADS.labels("idle").inc()
        return ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, f"the upload sent no data for {idle_s:g} s and was "
                        "ended; send it again")
    if isinstance(exc, UploadRejected):
        metrics.UPLOADS.labels("rejected").inc()
        return invalid(str(exc))
    if isinstance(exc, (grpc.RpcError, ClientGone)):
        metrics.UPLOADS.labels("cancelled").inc()
        log.info("upload_aborted_by_client", received=reader.received)
        return ApiError(grpc.StatusCode.CANCELLED, "upload cancelled by the client")
    metrics.UPLOADS.labels("storage_error").inc()
    log.warning("upload_storage_failed", error=f"{type(exc).__name__}: {exc}")
    return unavailable(f"object storage failed ({exc}); retry the upload", retry_after_s=5.0)


def _record(spec: UploadSpec, media_id: str, key: str, reader: UploadReader) -> Media:
    """The media row of a stored upload, committed with its preparation message (core.outbox)."""
    store, tenant = runtime.get().store, current_tenant.get()
    try:
        with outbox.sending(), locked():
            media = Media.create(id=media_id, tenant=tenant, request_id=spec.request_id or None,
                                 filename=spec.filename, content_type=spec.content_type,
                                 size_bytes=reader.received, sha256=reader.sha256, object_key=key,
                                 trace_context=tracing.inject(), owner=owner())
            outbox.add("prepare_media", media_id, broker_priority(Priority.NORMAL), tracing.inject())
            usage.on_upload(tenant, owner(), reader.received)  # the ledger, with the row
    except pw.IntegrityError:  # the same request_id won a race
        store.delete(key)
        with connection():
            return media_by_request_id(tenant, spec.request_id) or Media.get(Media.tenant == tenant,
                                                                             Media.request_id == spec.request_id)
    except Exception:
        store.delete(key)
        raise
    return media


def _upload_quota(size_bytes: int) -> int:
    """Refuse an upload over the tenant's upload-size or storage quota before any byte is stored;
    the most bytes it may have (0 = no tenant limit)."""
    return quotas.check_upload(current_tenant.get(), size_bytes)


def _backpressure(tenant: str) -> None:
    """Refuse a new upload while the workers have too much preparing to do (before any byte is sent)."""
    s = runtime.get().settings
    with connection():
        mine = Media.select().where(Media.tenant == tenant, Media.state == MediaState.PROCESSING).count()
        total = Media.select().where(Media.state == MediaState.PROCESSING).count()
    if mine >= s.max_preparing_per_tenant:
        metrics.UPLOADS.labels("backpressure").inc()
        raise exhausted(f"{mine} of your uploads are still being prepared (at most {s.max_preparing_per_tenant}); "
                        f"retry in {s.backpressure_retry_s:g} s", s.backpressure_retry_s)
    if total >= s.max_preparing_total:
        metrics.UPLOADS.labels("backpressure").inc()
        raise exhausted(f"the service is preparing {total} uploads; retry in {s.backpressure_retry_s:g} s",
                        s.backpressure_retry_s)


class MediaService(media_pb2_grpc.MediaServiceServicer):
    def __init__(self) -> None:
        s = runtime.get().settings
        self.uploads = UploadSlots(s.max_uploads or max(1, s.grpc_max_workers // 2), s.upload_idle_timeout_s,
                                   s.backpressure_retry_s)

    def UploadMedia(self, request_iterator: Iterator[media_pb2.UploadMediaRequest], context: grpc.ServicerContext):
        end = functools.partial(context.end_call, grpc.StatusCode.DEADLINE_EXCEEDED)
        # A refusal for want of a slot is not drained: draining holds a handler thread, which is
        # what the slot limit protects.
        with self.uploads.slot(current_tenant.get(), end) as slot:
            try:
                return self._upload(request_iterator, context, slot)
            except ApiError as exc:
                _drain(request_iterator, context, exc)
                raise

    def _upload(self, request_iterator: Iterator[media_pb2.UploadMediaRequest], context: grpc.ServicerContext,
                slot: Slot) -> media_pb2.UploadMediaResponse:
        first = next(request_iterator, None)
        if first is None and context.ended_within(0.02):
            raise ApiError(grpc.StatusCode.CANCELLED, "the client cancelled the upload before its first message")
        spec = upload_metadata(first, runtime.get().settings.max_upload_bytes)
        if spec.request_id:
            existing = media_by_request_id(current_tenant.get(), spec.request_id)
            if existing is not None:
                return _response(existing)
        cap = _upload_quota(spec.size_bytes)
        _backpressure(current_tenant.get())
        media_id = new_id()
        key = original_key(current_tenant.get(), media_id)
        started = time.monotonic()
        tracing.set_attributes(**{"mp4t.media_id": media_id, "mp4t.upload.declared_bytes": spec.size_bytes})
        reader = _store(spec, key, request_iterator, context, slot, cap)
        elapsed = time.monotonic() - started
        media = _record(spec, media_id, key, reader)
        if media.id != media_id:  # a concurrent retry of the same request_id stored it first
            return _response(media)
        size = reader.received
        metrics.UPLOADS.labels("stored").inc()
        metrics.UPLOAD_BYTES.inc(size)
        metrics.UPLOAD_SIZE.observe(size)
        metrics.UPLOAD_THROUGHPUT.observe(size / max(elapsed, 1e-6))
        tracing.set_attributes(**{"mp4t.upload.bytes": size, "mp4t.upload.seconds": round(elapsed, 3)})
        log.info("upload_stored", media_id=media_id, size_bytes=size, seconds=round(elapsed, 3),
                 mib_per_s=round(size / 1048576 / max(elapsed, 1e-6), 1))
        return _response(media)

    def GetMedia(self, request: media_pb2.GetMediaRequest, context: grpc.ServicerContext):
        return convert.media_to_proto(get_media(request.name))

    def ListMedia(self, request: media_pb2.ListMediaRequest, context: grpc.ServicerContext):
        state = enum_filter(request.state, media_pb2.MediaState, "MEDIA_STATE_", "state")
        q, filters = tenant_listing(Media, current_tenant.get(), state)
        rows, nxt = paged(q, Media, page_size(request.page_size), request.page_token, filters)
        return media_pb2.ListMediaResponse(media=[convert.media_to_proto(m) for m in rows], next_page_token=nxt)

    def DeleteMedia(self, request: media_pb2.DeleteMediaRequest, context: grpc.ServicerContext):
        media = get_media(request.name)
        with connection():
            children = list(Transcription.select().where(Transcription.media == media.id))
        if children and not request.force:
            raise failed_precondition(f"media/{media.id} has {len(children)} transcription(s); delete them first "
                                      "or set force=true to delete them with it")
        for job in children:
            delete_transcription(job)
        # The row goes first: a preparation still running then finds it gone when it saves and
        # removes the audio it wrote; the objects go after, the audio's key even if not written yet.
        with connection():
            Media.delete().where(Media.id == media.id).execute()
        retention.delete_objects(runtime.get().store, media)  # original, audio, anything derived
        return media_pb2.DeleteMediaResponse(deleted_transcriptions=len(children))

    # -- resumable upload (server.resumable, core.upload_sessions)
    def CreateUploadSession(self, request: media_pb2.CreateUploadSessionRequest, context: grpc.ServicerContext):
        found = resumable.existing(request)  # a retry after a lost answer: its session, whatever the load
        if found is not None:
            return found
        _upload_quota(request.metadata.size_bytes)
        _backpressure(current_tenant.get())
        return resumable.create(request)

    def GetUploadSession(self, request: media_pb2.GetUploadSessionRequest, context: grpc.ServicerContext):
        return resumable.to_proto(resumable.lookup(request.name))

    def WriteUpload(self, request_iterator: Iterator[media_pb2.WriteUploadRequest], context: grpc.ServicerContext):
        end = functools.partial(context.end_call, grpc.StatusCode.DEADLINE_EXCEEDED)
        with self.uploads.slot(current_tenant.get(), end) as slot:
            return resumable.write(request_iterator, context, slot)

    def DeleteUploadSession(self, request: media_pb2.DeleteUploadSessionRequest, context: grpc.ServicerContext):
        return resumable.delete(request)
