"""mp4totext.v1.TranscriptionService: create, read, watch, cancel, delete and export transcriptions."""
from __future__ import annotations

import asyncio

import grpc
import peewee as pw
import structlog
from google.protobuf import json_format

from core import ai_export, enhancements, export, jobs, outbox, quotas, registry, runtime
from core.models import ModelSet
from mp4totext.contracts import TERMINAL_STATES, JobConfig, JobState, MediaState, TranscriptResult
from mp4totext.enhancements import KINDS, EnhancementState
from mp4totext.v1 import transcription_pb2 as tpb
from mp4totext.v1 import transcription_pb2_grpc
from observability import tracing
from server import convert
from server.auth import current_tenant
from server.errors import failed_precondition, invalid, not_found
from server.paging import page_size, paged, tenant_listing
from server.resources import delete_transcription, get_job, get_media, job_by_request_id, owner
from server.validation import (
    EXPORT_FORMATS,
    KIND_NAMES,
    check_ai,
    check_reference,
    enhancement_requests,
    enum_filter,
    export_options,
    job_config,
    parse_name,
    request_id,
)
from server.watch import BatchReader, in_thread, watch_events
from storage.db import Media, Transcription

log = structlog.get_logger(__name__)


def _with_references(config: JobConfig) -> JobConfig:
    """The config with each known speaker's media checked (the caller's, READY, long enough) and
    its stretch resolved."""
    refs = config.diarization.known_speakers
    if not refs:
        return config
    checked = []
    for i, ref in enumerate(refs):
        m = get_media(f"media/{ref.media_id}", field=f"config.diarization_config.known_speakers[{i}].media")
        checked.append(check_reference(ref, i, str(m.state), m.duration_s))
    return config.model_copy(update={"diarization": config.diarization.model_copy(update={"known_speakers": checked})})


def _idempotent_hit(job: Transcription, media: Media) -> tpb.Transcription:
    """The answer to a retried CreateTranscription (same request_id)."""
    if job.media_id != media.id:
        raise invalid(f"request_id was already used for transcriptions/{job.id} of media/{job.media_id}; "
                      "use a new request_id for a different media")
    return convert.transcription_to_proto(job)


class TranscriptionService(transcription_pb2_grpc.TranscriptionServiceServicer):
    def __init__(self) -> None:
        self.rows = BatchReader(jobs.current_events)  # quiet watchers' re-reads, batched

    def CreateTranscription(self, request: tpb.CreateTranscriptionRequest, context: grpc.ServicerContext):
        tenant = current_tenant.get()
        rid = request_id(request.request_id)
        media = get_media(request.media, field="media")
        existing = job_by_request_id(tenant, rid) if rid else None
        if existing is not None:
            return _idempotent_hit(existing, media)
        config, priority = job_config(request.config, ModelSet.of(runtime.get().settings.model_sources),
                                      registry.diarization_status, registry.ai_status)
        if media.state == MediaState.FAILED:
            raise failed_precondition(f"media/{media.id} cannot be transcribed: {media.error_message}")
        config = _with_references(config)
        try:
            job = jobs.create(tenant, media, config, priority, rid or None,
                              owner() or media.owner)  # the key acting for a user: theirs
        except pw.IntegrityError:  # (over quota: nothing was written, nothing queued; server/status_map.py)
            existing = job_by_request_id(tenant, rid)
            if existing is None:
                raise
            return _idempotent_hit(existing, media)
        # The media may have become READY while we inserted: exactly one of us and
        # prepare_media wins the PREPARING_MEDIA -> WAITING transition (and sends its message).
        with outbox.sending():
            job = jobs.to_waiting(job.id) or job
        tracing.set_attributes(**{"mp4t.job_id": job.id, "mp4t.media_id": media.id, "mp4t.priority": priority,
                                  "mp4t.media.duration_s": media.duration_s})
        log.info("transcription_created", job_id=job.id, media_id=media.id, priority=priority)
        return convert.transcription_to_proto(job)

    def GetTranscription(self, request: tpb.GetTranscriptionRequest, context: grpc.ServicerContext):
        return convert.transcription_to_proto(get_job(request.name),
                                              full=request.view != tpb.TRANSCRIPTION_VIEW_BASIC)

    def ListTranscriptions(self, request: tpb.ListTranscriptionsRequest, context: grpc.ServicerContext):
        state = enum_filter(request.state, tpb.TranscriptionState, "TRANSCRIPTION_STATE_", "state")
        # A listing shows no transcript: reading 50 of them (JSON of every segment and word)
        # only to drop them made a page cost ~3 Gets.
        q, filters = tenant_listing(Transcription, current_tenant.get(), state, without=("result",))
        if request.media:
            media_id = parse_name(request.media, "media", "media")
            q = q.where(Transcription.media == media_id)
            filters["media"] = media_id
        rows, nxt = paged(q, Transcription, page_size(request.page_size), request.page_token, filters)
        return tpb.ListTranscriptionsResponse(
            transcriptions=[convert.transcription_to_proto(j, full=False) for j in rows], next_page_token=nxt)

    def CancelTranscription(self, request: tpb.CancelTranscriptionRequest, context: grpc.ServicerContext):
        job = jobs.request_cancel(get_job(request.name))
        if job.state in TERMINAL_STATES and job.ai_items:  # a finished transcript: cancel its AI items
            enhancements.request_cancel(job.id)
            job = get_job(request.name)
        return convert.transcription_to_proto(job)

    def EnhanceTranscription(self, request: tpb.EnhanceTranscriptionRequest, context: grpc.ServicerContext):
        wanted = enhancement_requests(request.enhancements, "enhancements", None, required=True)
        rid = request_id(request.request_id)
        job = get_job(request.name)
        check_ai(registry.ai_status)
        quotas.check_ai(job.tenant_id)  # a prepaid tenant needs credits left
        try:
            enhancements.request(job.id, job.tenant_id, wanted, rid or None)
        except jobs.LostClaim:
            raise not_found(f"transcriptions/{job.id}") from None
        log.info("enhancements_requested", job_id=job.id, items=[w.key for w in wanted])
        return convert.transcription_to_proto(get_job(request.name))

    def DeleteTranscription(self, request: tpb.DeleteTranscriptionRequest, context: grpc.ServicerContext):
        delete_transcription(get_job(request.name))
        return tpb.DeleteTranscriptionResponse()

    async def WatchTranscription(self, request: tpb.WatchTranscriptionRequest, context: grpc.ServicerContext):
        """A coroutine, not a thread: a replica holds thousands of these (server/watch.py)."""
        job = await in_thread(get_job, request.name)
        rt, loop = runtime.get(), asyncio.get_running_loop()
        events = watch_events(job.id, request.after_sequence, subscribe=lambda j: rt.bus.subscribe(j, loop),
                              read=self.rows.read, heartbeat_s=rt.settings.watch_heartbeat_s)
        async for ev in events:
            yield convert.event_to_proto(ev)

    def ExportTranscription(self, request: tpb.ExportTranscriptionRequest, context: grpc.ServicerContext):
        fmt, opts = export_options(request)  # the request's own errors first, before any lookup
        if request.enhancement_kind:
            yield from self._export_item(request, fmt, opts)
            return
        if fmt == "md":
            raise invalid("format=MARKDOWN is for summaries and lecture notes (set enhancement_kind)")
        job = get_job(request.name)
        if job.state != JobState.SUCCEEDED or job.result is None:
            raise failed_precondition(f"transcriptions/{job.id} is {job.state}; only a SUCCEEDED transcription "
                                      "can be exported")
        document = None
        if fmt == "json":
            document = json_format.MessageToDict(convert.transcription_to_proto(job), preserving_proto_field_name=True)
        content_type, ext = export.FORMATS[fmt]
        blocks = export.chunks(export.export(fmt, TranscriptResult.from_json(job.result), opts, document))
        first = next(blocks, b"")  # an empty transcript still tells the client what it got
        yield tpb.ExportTranscriptionResponse(data=first, content_type=content_type, filename=f"{job.id}.{ext}")
        for block in blocks:
            yield tpb.ExportTranscriptionResponse(data=block)

    def _export_item(self, request: tpb.ExportTranscriptionRequest, fmt: str, opts: export.SubtitleOptions):
        kind = KIND_NAMES.get(request.enhancement_kind)
        if kind is None:
            raise invalid(f"enhancement_kind={request.enhancement_kind} is not a known EnhancementKind")
        if fmt not in ai_export.ITEM_FORMATS[kind]:
            raise invalid(f"{kind} exports as {', '.join(f.upper() for f in ai_export.ITEM_FORMATS[kind])}, "
                          f"not {fmt.upper()}")
        job = get_job(request.name)
        lang = request.target_language_code.strip().lower()
        item = enhancements.find(job.id, kind, lang)
        if item is None:
            asked = f" in {lang!r}" if lang else ""
            raise not_found(f"transcriptions/{job.id} has no {kind}{asked}; ask for it with EnhanceTranscription")
        if item.state != EnhancementState.SUCCEEDED:
            why = f": {item.error_message}" if item.error_message else ""
            raise failed_precondition(f"the {kind} of transcriptions/{job.id} is {item.state}{why}")
        name = f"{job.id}.{kind.lower()}{'.' + lang if lang else ''}"
        if KINDS[kind].segments:
            content_type, ext = export.FORMATS[fmt]
            document = (json_format.MessageToDict(convert.enhancement_to_proto(item), preserving_proto_field_name=True)
                        if fmt == "json" else None)
            blocks = export.chunks(export.export(fmt, TranscriptResult.from_json(item.result), opts, document))
        else:
            content_type, ext = ai_export.MARKDOWN if fmt == "md" else export.FORMATS[fmt]
            blocks = export.chunks(iter([ai_export.document(kind, fmt, item.result)]))
        yield tpb.ExportTranscriptionResponse(data=next(blocks, b""), content_type=content_type,
                                              filename=f"{name}.{ext}")
        for block in blocks:
            yield tpb.ExportTranscriptionResponse(data=block)

    def GetCapabilities(self, request: tpb.GetCapabilitiesRequest, context: grpc.ServicerContext):
        s = runtime.get().settings
        available, reason = registry.diarization_status()
        models = ModelSet.of(s.model_sources)
        infos = [tpb.ModelInfo(name=m.name, multilingual=m.multilingual, language_codes=m.languages,
                               translation_available=m.multilingual) for m in models.specs]
        multilingual = models.multilingual is not None
        ai_available, ai_model, ai_reason = registry.ai_status()
        return convert._set(tpb.Capabilities(
            ai_available=ai_available, ai_model=ai_model, ai_unavailable_reason=ai_reason,
            enhancement_kinds=sorted(KIND_NAMES) if ai_available else [],
            model=models.default.name, models=infos, multilingual=multilingual, translation_available=multilingual,
            diarization_available=available, diarization_unavailable_reason=reason,
            export_formats=sorted(EXPORT_FORMATS), max_upload_bytes=s.max_upload_bytes, max_beam_size=10),
            max_media_duration=convert.dur(s.max_media_duration_s))
