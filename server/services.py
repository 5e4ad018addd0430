"""Thin gRPC servicers: validate, read/write rows, enqueue work. No media processing here."""
from __future__ import annotations

import base64
import contextvars
import datetime as dt
import json
import re
import time
from typing import Any, Iterator

import grpc
import peewee as pw
import structlog

from mp4totext import runtime
from mp4totext.v1 import media_pb2, media_pb2_grpc, transcription_pb2 as tpb, transcription_pb2_grpc
from observability import metrics, tracing
from server import convert
from server.upload import ClientGone, UploadReader, UploadRejected
from storage.db import JobState, Media, MediaState, Stage, Transcription, WorkerInfo, database, new_id, utcnow
from workers import jobs
from workers.broker import PRIORITY_MAP

log = structlog.get_logger(__name__)

current_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("current_tenant")

_ID = re.compile(r"^[0-9a-f]{32}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
MAX_PAGE = 1000
DEFAULT_PAGE = 50


class ApiError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(msg: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, msg)


def parse_name(name: str, collection: str, field: str = "name") -> str:
    prefix = collection + "/"
    if not name:
        raise invalid(f"{field} is required, e.g. {prefix}<id>")
    if not name.startswith(prefix) or not _ID.match(name[len(prefix):]):
        raise invalid(f"{field}={name!r} is not a valid resource name; expected {prefix}<32 hex characters>")
    return name[len(prefix):]


def not_found(name: str) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, f"{name} not found")


def get_media(name: str, field: str = "name") -> Media:
    media_id = parse_name(name, "media", field)
    with database.connection_context():
        m = Media.get_or_none(Media.id == media_id, Media.tenant == current_tenant.get())
    if m is None:
        raise not_found(f"media/{media_id}")
    return m


def get_job(name: str) -> Transcription:
    job_id = parse_name(name, "transcriptions")
    with database.connection_context():
        j = Transcription.get_or_none(Transcription.id == job_id, Transcription.tenant == current_tenant.get())
    if j is None:
        raise not_found(f"transcriptions/{job_id}")
    return j


# ---------------------------------------------------------------- paging


def page_size(n: int) -> int:
    if n < 0:
        raise invalid("page_size must not be negative")
    return min(n or DEFAULT_PAGE, MAX_PAGE)


def encode_token(row: Any, filters: dict[str, Any]) -> str:
    payload = {"t": row.create_time.isoformat(), "id": row.id, "f": filters}
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


def apply_token(query: pw.ModelSelect, model: Any, token: str, filters: dict[str, Any]) -> pw.ModelSelect:
    if not token:
        return query
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        t, last_id = dt.datetime.fromisoformat(data["t"]), data["id"]
    except Exception:
        raise invalid("page_token is not valid; pass next_page_token from a previous response") from None
    if data.get("f") != filters:
        raise invalid("page_token was issued for different filters; restart the listing without it")
    return query.where((model.create_time < t) | ((model.create_time == t) & (model.id < last_id)))


def paged(query: pw.ModelSelect, model: Any, size: int, token: str, filters: dict[str, Any]) -> tuple[list, str]:
    q = apply_token(query, model, token, filters).order_by(model.create_time.desc(), model.id.desc())
    with database.connection_context():
        rows = list(q.limit(size + 1))
    nxt = encode_token(rows[size - 1], filters) if len(rows) > size else ""
    return rows[:size], nxt


# ---------------------------------------------------------------- tracing

# A CreateTranscription without a client trace context continues its media's upload trace
# when the upload is this recent (older uploads start a new trace: a trace spanning days
# helps nobody).
TRACE_CONTINUE_S = 3600.0


def trace_parent_for(method: str, request: Any) -> dict[str, str] | None:
    if request is None or not method.endswith("/CreateTranscription"):
        return None
    name = getattr(request, "media", "")
    if not name.startswith("media/") or not _ID.match(name[6:]):
        return None
    with database.connection_context():
        row = Media.select(Media.trace_context, Media.create_time).where(Media.id == name[6:]).first()
    if row is None or not row.trace_context:
        return None
    if (utcnow() - row.create_time).total_seconds() > TRACE_CONTINUE_S:
        return None
    return row.trace_context


# ---------------------------------------------------------------- media


def _enqueue(actor: str, obj_id: str, priority: int) -> None:
    from workers.actors import enqueue

    try:
        enqueue(actor, obj_id, priority)
    except Exception as exc:
        raise ApiError(grpc.StatusCode.UNAVAILABLE, f"the job queue is unavailable ({exc}); retry shortly") from exc


class MediaService(media_pb2_grpc.MediaServiceServicer):
    def UploadMedia(self, request_iterator: Iterator[media_pb2.UploadMediaRequest], context: grpc.ServicerContext):
        rt = runtime.get()
        tenant = current_tenant.get()
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "metadata":
            raise invalid("the first UploadMediaRequest must carry metadata (filename, size_bytes, sha256)")
        md = first.metadata
        if not md.filename or len(md.filename) > 1024:
            raise invalid("metadata.filename is required (at most 1024 characters)")
        if md.size_bytes < 0:
            raise invalid("metadata.size_bytes must not be negative")
        if md.size_bytes > rt.settings.max_upload_bytes:
            raise invalid(f"metadata.size_bytes={md.size_bytes} is over the upload limit of "
                          f"{rt.settings.max_upload_bytes} bytes")
        sha = md.sha256.lower()
        if sha and not _SHA.match(sha):
            raise invalid("metadata.sha256 must be 64 hex characters")
        if len(md.request_id) > 128:
            raise invalid("metadata.request_id must be at most 128 characters")
        if md.request_id:
            with database.connection_context():
                existing = Media.get_or_none(Media.tenant == tenant, Media.request_id == md.request_id)
            if existing is not None:
                return media_pb2.UploadMediaResponse(media=convert.media_to_proto(existing),
                                                     committed_size=existing.size_bytes)
        media_id = new_id()
        key = f"media/{tenant}/{media_id}/original"
        reader = UploadReader(request_iterator, rt.settings.max_upload_bytes, md.size_bytes, sha, context.is_active)
        started = time.monotonic()
        tracing.set_attributes(**{"mp4t.media_id": media_id, "mp4t.upload.declared_bytes": md.size_bytes})
        try:
            size = rt.store.put_stream(key, reader, md.content_type or "application/octet-stream")
        except UploadRejected as exc:
            metrics.UPLOADS.labels("rejected").inc()
            raise invalid(str(exc)) from None
        except (grpc.RpcError, ClientGone):
            metrics.UPLOADS.labels("cancelled").inc()
            log.info("upload_aborted_by_client", received=reader.received)
            raise ApiError(grpc.StatusCode.CANCELLED, "upload cancelled by the client") from None
        except Exception as exc:
            metrics.UPLOADS.labels("storage_error").inc()
            raise ApiError(grpc.StatusCode.UNAVAILABLE, f"object storage failed ({exc}); retry the upload") from exc
        elapsed = time.monotonic() - started
        if not context.is_active():  # cancelled after the last byte: the client will retry (request_id)
            metrics.UPLOADS.labels("cancelled").inc()
            rt.store.delete(key)
            raise ApiError(grpc.StatusCode.CANCELLED, "upload cancelled by the client")
        try:
            with database.connection_context():
                media = Media.create(id=media_id, tenant=tenant, request_id=md.request_id or None,
                                     filename=md.filename, content_type=md.content_type, size_bytes=size,
                                     sha256=reader.sha256, object_key=key, trace_context=tracing.inject())
        except pw.IntegrityError:  # the same request_id won a race
            rt.store.delete(key)
            with database.connection_context():
                media = Media.get(Media.tenant == tenant, Media.request_id == md.request_id)
            return media_pb2.UploadMediaResponse(media=convert.media_to_proto(media), committed_size=media.size_bytes)
        except Exception:
            rt.store.delete(key)
            raise
        try:
            _enqueue("prepare_media", media_id, PRIORITY_MAP[0])
        except ApiError:
            with database.connection_context():
                media.delete_instance()
            rt.store.delete(key)
            raise
        metrics.UPLOADS.labels("stored").inc()
        metrics.UPLOAD_BYTES.inc(size)
        metrics.UPLOAD_SIZE.observe(size)
        metrics.UPLOAD_THROUGHPUT.observe(size / max(elapsed, 1e-6))
        tracing.set_attributes(**{"mp4t.upload.bytes": size, "mp4t.upload.seconds": round(elapsed, 3)})
        log.info("upload_stored", media_id=media_id, size_bytes=size, seconds=round(elapsed, 3),
                 mib_per_s=round(size / 1048576 / max(elapsed, 1e-6), 1))
        return media_pb2.UploadMediaResponse(media=convert.media_to_proto(media), committed_size=size)

    def GetMedia(self, request: media_pb2.GetMediaRequest, context: grpc.ServicerContext):
        return convert.media_to_proto(get_media(request.name))

    def ListMedia(self, request: media_pb2.ListMediaRequest, context: grpc.ServicerContext):
        q = Media.select().where(Media.tenant == current_tenant.get())
        filters: dict[str, Any] = {}
        if request.state:
            state = media_pb2.MediaState.Name(request.state).removeprefix("MEDIA_STATE_")
            q = q.where(Media.state == state)
            filters["state"] = state
        rows, nxt = paged(q, Media, page_size(request.page_size), request.page_token, filters)
        return media_pb2.ListMediaResponse(media=[convert.media_to_proto(m) for m in rows], next_page_token=nxt)

    def DeleteMedia(self, request: media_pb2.DeleteMediaRequest, context: grpc.ServicerContext):
        media = get_media(request.name)
        with database.connection_context():
            children = list(Transcription.select().where(Transcription.media == media.id))
        if children and not request.force:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"media/{media.id} has {len(children)} transcription(s); delete them first or set "
                           "force=true to delete them with it")
        for job in children:
            delete_transcription(job)
        store = runtime.get().store
        for key in (media.object_key, media.audio_key):
            if key:
                store.delete(key)
        with database.connection_context():
            Media.delete().where(Media.id == media.id).execute()
        return media_pb2.DeleteMediaResponse(deleted_transcriptions=len(children))


# ---------------------------------------------------------------- transcriptions


def _language(code: str) -> str | None:
    """BCP-47 -> Whisper language (primary subtag), None for auto. Raises on unknown codes."""
    code = code.strip()
    if not code or code.lower() == "auto":
        return None
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    primary = code.replace("_", "-").split("-")[0].lower()
    if primary not in _LANGUAGE_CODES:
        raise invalid(f"config.language_code={code!r} is not a language Whisper knows; use a BCP-47 code "
                      "such as 'en' or 'tr-TR', or 'auto'")
    return primary


MAX_PROMPT = 1000
MAX_HOTWORDS = 50
MAX_SPEAKERS = 20
WORKER_FRESH_S = 90.0  # a worker whose heartbeat is older than this is gone


def english_only(model: str) -> bool:
    return model.endswith(".en")


def diarization_status() -> tuple[bool, str]:
    """(available, reason): is a worker with a loaded diarization pipeline alive?"""
    from workers.stages.diarize import HOW_TO

    cutoff = utcnow() - dt.timedelta(seconds=WORKER_FRESH_S)
    with database.connection_context():
        live = [w for w in WorkerInfo.select().where(WorkerInfo.heartbeat_time >= cutoff)
                if (w.capabilities or {}).get("diarization")]
    if live:
        return True, ""
    return False, f"speaker recognition is not available on this server: no diarization worker is running. " \
                  f"Operators: {HOW_TO}"


def validate_config(cfg: tpb.TranscriptionConfig) -> tuple[dict[str, Any], int]:
    """Check every option (INVALID_ARGUMENT names the field) and return the stored form."""
    language = _language(cfg.language_code)
    model = runtime.get().settings.model_label
    if language not in (None, "en") and english_only(model):
        raise invalid(f"config.language_code={cfg.language_code!r}: the server's model {model} only recognises "
                      "English; use 'en' or ask the operator for a multilingual model")
    if not 0 <= cfg.beam_size <= 10:
        raise invalid(f"config.beam_size={cfg.beam_size} is out of range; use 1..10 (0 = default)")
    if cfg.priority not in PRIORITY_MAP:
        raise invalid(f"config.priority={cfg.priority} is not a known Priority")
    if cfg.task not in (tpb.TRANSCRIPTION_TASK_UNSPECIFIED, tpb.TRANSCRIPTION_TASK_TRANSCRIBE,
                        tpb.TRANSCRIPTION_TASK_TRANSLATE):
        raise invalid(f"config.task={cfg.task} is not a known TranscriptionTask")
    task = "translate" if cfg.task == tpb.TRANSCRIPTION_TASK_TRANSLATE else "transcribe"
    if task == "translate" and english_only(model):
        raise invalid(f"config.task=TRANSLATE needs a multilingual model; the server's model {model} is "
                      "English-only (its output is already English). Use TRANSCRIBE, or ask the operator for a "
                      "multilingual model (MP4T_WHISPER_MODEL)")
    if len(cfg.initial_prompt) > MAX_PROMPT:
        raise invalid(f"config.initial_prompt has {len(cfg.initial_prompt)} characters; at most {MAX_PROMPT}")
    if len(cfg.hotwords) > MAX_HOTWORDS:
        raise invalid(f"config.hotwords has {len(cfg.hotwords)} entries; at most {MAX_HOTWORDS}")
    hotwords = []
    for i, word in enumerate(cfg.hotwords):
        word = " ".join(word.split())
        if not 1 <= len(word) <= 100:
            raise invalid(f"config.hotwords[{i}] must be 1..100 characters (got {len(word)})")
        hotwords.append(word)
    dia = cfg.diarization_config
    lo, hi = dia.min_speaker_count, dia.max_speaker_count
    for field, n in (("min_speaker_count", lo), ("max_speaker_count", hi)):
        if not 0 <= n <= MAX_SPEAKERS:
            raise invalid(f"config.diarization_config.{field}={n} is out of range; use 1..{MAX_SPEAKERS} "
                          "(0 = unknown)")
    if lo and hi and lo > hi:
        raise invalid(f"config.diarization_config.min_speaker_count={lo} is above max_speaker_count={hi}")
    if (lo or hi) and not dia.enable_speaker_diarization:
        raise invalid("config.diarization_config: speaker counts are set but enable_speaker_diarization is false")
    if dia.enable_speaker_diarization:
        available, reason = diarization_status()
        if not available:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, reason)
    out = {
        "language_code": cfg.language_code,
        "language": language,
        "beam_size": cfg.beam_size or None,
        "vad": cfg.enable_vad if cfg.HasField("enable_vad") else True,
        "word_timestamps": cfg.enable_word_time_offsets if cfg.HasField("enable_word_time_offsets") else True,
        "task": task,
        "initial_prompt": cfg.initial_prompt or None,
        "hotwords": hotwords,
        "diarization": {"enabled": bool(dia.enable_speaker_diarization), "min_speakers": lo or None,
                        "max_speakers": hi or None},
    }
    return out, PRIORITY_MAP[cfg.priority]


def delete_transcription(job: Transcription) -> None:
    # Deleting the row is what stops a running worker: its next progress report finds no claim.
    with database.connection_context():
        Transcription.delete().where(Transcription.id == job.id).execute()
    jobs.publish_deleted(job)


class TranscriptionService(transcription_pb2_grpc.TranscriptionServiceServicer):
    def CreateTranscription(self, request: tpb.CreateTranscriptionRequest, context: grpc.ServicerContext):
        tenant = current_tenant.get()
        if len(request.request_id) > 128:
            raise invalid("request_id must be at most 128 characters")
        media = get_media(request.media, field="media")
        if request.request_id:
            existing = self._by_request_id(tenant, request.request_id)
            if existing is not None:
                return self._idempotent_hit(existing, media)
        cfg, priority = validate_config(request.config)
        if media.state == MediaState.FAILED:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"media/{media.id} cannot be transcribed: {media.error_message}")
        try:
            with database.connection_context():
                job = Transcription.create(tenant=tenant, media=media.id, request_id=request.request_id or None,
                                           config=cfg, priority=priority, duration_s=media.duration_s,
                                           trace_context=tracing.inject())
        except pw.IntegrityError:
            existing = self._by_request_id(tenant, request.request_id)
            if existing is None:
                raise
            return self._idempotent_hit(existing, media)
        # The media may have become READY while we inserted: exactly one of us and
        # prepare_media wins the PREPARING_MEDIA -> WAITING transition and enqueues.
        moved = jobs.to_waiting(job.id)
        if moved is not None:
            try:
                _enqueue("transcribe", job.id, priority)
            except ApiError:
                with database.connection_context():
                    job.delete_instance()
                raise
            job = moved
        tracing.set_attributes(**{"mp4t.job_id": job.id, "mp4t.media_id": media.id, "mp4t.priority": priority,
                                  "mp4t.media.duration_s": media.duration_s})
        log.info("transcription_created", job_id=job.id, media_id=media.id, priority=priority)
        return convert.transcription_to_proto(job)

    @staticmethod
    def _by_request_id(tenant: str, request_id: str) -> Transcription | None:
        with database.connection_context():
            return Transcription.get_or_none(Transcription.tenant == tenant, Transcription.request_id == request_id)

    @staticmethod
    def _idempotent_hit(job: Transcription, media: Media) -> tpb.Transcription:
        if job.media_id != media.id:
            raise invalid(f"request_id was already used for transcriptions/{job.id} of media/{job.media_id}; "
                          "use a new request_id for a different media")
        if job.state == JobState.QUEUED and job.stage == Stage.WAITING:
            # A retry after a lost response may also follow a lost enqueue: a duplicate is harmless.
            _enqueue("transcribe", job.id, job.priority)
        return convert.transcription_to_proto(job)

    def GetTranscription(self, request: tpb.GetTranscriptionRequest, context: grpc.ServicerContext):
        return convert.transcription_to_proto(get_job(request.name),
                                              full=request.view != tpb.TRANSCRIPTION_VIEW_BASIC)

    def ListTranscriptions(self, request: tpb.ListTranscriptionsRequest, context: grpc.ServicerContext):
        q = Transcription.select().where(Transcription.tenant == current_tenant.get())
        filters: dict[str, Any] = {}
        if request.state:
            state = tpb.TranscriptionState.Name(request.state).removeprefix("TRANSCRIPTION_STATE_")
            q = q.where(Transcription.state == state)
            filters["state"] = state
        if request.media:
            media_id = parse_name(request.media, "media", "media")
            q = q.where(Transcription.media == media_id)
            filters["media"] = media_id
        rows, nxt = paged(q, Transcription, page_size(request.page_size), request.page_token, filters)
        return tpb.ListTranscriptionsResponse(
            transcriptions=[convert.transcription_to_proto(j, full=False) for j in rows], next_page_token=nxt)

    def CancelTranscription(self, request: tpb.CancelTranscriptionRequest, context: grpc.ServicerContext):
        return convert.transcription_to_proto(jobs.request_cancel(get_job(request.name)))

    def DeleteTranscription(self, request: tpb.DeleteTranscriptionRequest, context: grpc.ServicerContext):
        delete_transcription(get_job(request.name))
        return tpb.DeleteTranscriptionResponse()

    def WatchTranscription(self, request: tpb.WatchTranscriptionRequest, context: grpc.ServicerContext):
        job = get_job(request.name)
        return watch_events(job.id, request.after_sequence, context)

    def ExportTranscription(self, request: tpb.ExportTranscriptionRequest, context: grpc.ServicerContext):
        from workers.stages import export

        job = get_job(request.name)
        fmt = EXPORT_FORMATS.get(request.format)
        if fmt is None:
            raise invalid("format is required: one of TXT, SRT, VTT, JSON, TSV")
        line = request.max_line_length or 42
        lines = request.max_lines_per_caption or 2
        max_dur = request.max_caption_duration.ToTimedelta().total_seconds() if request.HasField(
            "max_caption_duration") else 0.0
        max_dur = max_dur or 6.0
        if not 10 <= line <= 200:
            raise invalid(f"max_line_length={line} is out of range; use 10..200 (0 = 42)")
        if not 1 <= lines <= 3:
            raise invalid(f"max_lines_per_caption={lines} is out of range; use 1..3 (0 = 2)")
        if not 1.0 <= max_dur <= 30.0:
            raise invalid(f"max_caption_duration={max_dur:g}s is out of range; use 1..30 s (0 = 6 s)")
        if job.state != JobState.SUCCEEDED or job.result is None:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"transcriptions/{job.id} is {job.state}; only a SUCCEEDED transcription can be exported")
        document = None
        if fmt == "json":
            from google.protobuf import json_format

            document = json_format.MessageToDict(convert.transcription_to_proto(job), preserving_proto_field_name=True)
        opts = export.SubtitleOptions(max_line_length=line, max_lines=lines, max_duration_s=max_dur)
        content_type, ext = export.FORMATS[fmt]
        first = True
        for block in export.chunks(export.export(fmt, job.result, opts, document)):
            if first:
                first = False
                yield tpb.ExportTranscriptionResponse(data=block, content_type=content_type,
                                                      filename=f"{job.id}.{ext}")
            else:
                yield tpb.ExportTranscriptionResponse(data=block)
        if first:  # empty transcript: still tell the client what it got
            yield tpb.ExportTranscriptionResponse(data=b"", content_type=content_type, filename=f"{job.id}.{ext}")

    def GetCapabilities(self, request: tpb.GetCapabilitiesRequest, context: grpc.ServicerContext):
        s = runtime.get().settings
        available, reason = diarization_status()
        multilingual = not english_only(s.model_label)
        return convert._set(tpb.Capabilities(
            model=s.model_label, multilingual=multilingual, translation_available=multilingual,
            diarization_available=available, diarization_unavailable_reason=reason,
            export_formats=sorted(EXPORT_FORMATS), max_upload_bytes=s.max_upload_bytes, max_beam_size=10),
            max_media_duration=convert.dur(s.max_media_duration_s))


EXPORT_FORMATS = {tpb.EXPORT_FORMAT_TXT: "txt", tpb.EXPORT_FORMAT_SRT: "srt", tpb.EXPORT_FORMAT_VTT: "vtt",
                  tpb.EXPORT_FORMAT_JSON: "json", tpb.EXPORT_FORMAT_TSV: "tsv"}


def watch_events(job_id: str, after: int, context: grpc.ServicerContext) -> Iterator[tpb.WatchTranscriptionResponse]:
    rt = runtime.get()
    heartbeat_s = rt.settings.watch_heartbeat_s
    # Subscribe before reading the row so no event falls between the read and the subscription.
    with rt.bus.subscribe(job_id) as sub:
        last = after
        ev = _row_event(job_id)
        while True:
            if ev is None:  # deleted while watched
                context.abort(grpc.StatusCode.NOT_FOUND, f"transcriptions/{job_id} was deleted")
            if ev["sequence"] > last:
                last = ev["sequence"]
                yield convert.event_to_proto(ev)
                if ev["state"] in JobState.TERMINAL:
                    return
            elif ev.get("heartbeat"):
                yield convert.event_to_proto({**ev, "sequence": last})
            if not context.is_active():
                return
            ev = sub.get(timeout=heartbeat_s)
            if ev is None:  # quiet: re-read the truth, send it or a heartbeat
                ev = _row_event(job_id)
                if ev is not None and ev["sequence"] <= last:
                    ev["heartbeat"] = True
            elif ev.get("deleted"):
                ev = None


def _row_event(job_id: str) -> dict[str, Any] | None:
    with database.connection_context():
        job = Transcription.get_or_none(Transcription.id == job_id)
    return None if job is None else jobs.event_of(job)
