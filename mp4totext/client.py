"""Client library over the generated stubs: auth metadata, retries with backoff, upload, resumable Watch."""
from __future__ import annotations

import datetime as dt
import hashlib
import os
import random
import time
import uuid
from typing import Any, Callable, Iterator

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mp4totext import resumable
from mp4totext.v1 import (
    identity_pb2,
    identity_pb2_grpc,
    media_pb2,
    media_pb2_grpc,
    transcription_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
    webhooks_pb2,
    webhooks_pb2_grpc,
)
from mp4totext.v1 import transcription_pb2 as tpb

CHUNK = 1024 * 1024  # the server's per-message limit
RESUMABLE_MIN = 8 * 1024 * 1024  # larger files go through an upload session (mp4totext.resumable)
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
TERMINAL = (tpb.TRANSCRIPTION_STATE_SUCCEEDED, tpb.TRANSCRIPTION_STATE_FAILED, tpb.TRANSCRIPTION_STATE_CANCELLED)
ITEM_TERMINAL = (tpb.ENHANCEMENT_STATE_SUCCEEDED, tpb.ENHANCEMENT_STATE_FAILED, tpb.ENHANCEMENT_STATE_CANCELLED)


def ended(ev: tpb.WatchTranscriptionResponse) -> bool:
    """The last event of a Watch: the job ended and so did each of its AI items."""
    return ev.state in TERMINAL and all(i.state in ITEM_TERMINAL for i in ev.enhancements)


def enhancement_requests(cleanup: bool = False, translate: list[str] | None = None, summary: bool = False,
                         notes: bool = False, language: str = "") -> list[tpb.EnhancementRequest]:
    """AI items: a clean-up, translations into ``translate``, a summary and lecture notes (in ``language``,
    default the transcript's)."""
    out = [tpb.EnhancementRequest(kind=tpb.ENHANCEMENT_KIND_CLEANUP)] if cleanup else []
    out += [tpb.EnhancementRequest(kind=tpb.ENHANCEMENT_KIND_TRANSLATION, target_language_code=code)
            for code in translate or []]
    for wanted, kind in ((summary, tpb.ENHANCEMENT_KIND_SUMMARY), (notes, tpb.ENHANCEMENT_KIND_LECTURE_NOTES)):
        if wanted:
            out.append(tpb.EnhancementRequest(kind=kind, target_language_code=language))
    return out


RETRY_BUDGET_S = 60.0  # outlasts a broker or server restart (seen: the API back 7-14 s after RabbitMQ)


def backoff(attempt: int, base: float = 0.2, cap: float = 5.0) -> float:
    return random.uniform(0, min(cap, base * 2**attempt))


def _status_detail(exc: grpc.RpcError, detail_type: type) -> Any:
    """The first detail of ``detail_type`` in the error's google.rpc.Status, if it has one."""
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except (AttributeError, ValueError):
        return None
    for detail in status.details if status is not None else ():
        found = detail_type()
        if detail.Is(found.DESCRIPTOR) and detail.Unpack(found):
            return found
    return None


def quota_failure(exc: grpc.RpcError) -> error_details_pb2.QuotaFailure | None:
    """The google.rpc.QuotaFailure of an over-quota error (RESOURCE_EXHAUSTED), if it has one:
    a limit, not a passing overload, so the client does not retry it."""
    return _status_detail(exc, error_details_pb2.QuotaFailure)


def server_retry_delay(exc: grpc.RpcError) -> float | None:
    """The delay a server asked for in the status's google.rpc.RetryInfo, if any."""
    info = _status_detail(exc, error_details_pb2.RetryInfo)
    return None if info is None else info.retry_delay.ToTimedelta().total_seconds()


class Client:
    def __init__(self, target: str, api_key: str, retries: int | None = None, timeout: float = 30.0,
                 retry_budget_s: float = RETRY_BUDGET_S) -> None:
        """``retries`` caps the retries of one call (None: as many as ``retry_budget_s`` allows)."""
        self.channel = grpc.insecure_channel(
            target,
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024),
                     ("grpc.keepalive_time_ms", 30000)],
        )
        self.media = media_pb2_grpc.MediaServiceStub(self.channel)
        self.transcriptions = transcription_pb2_grpc.TranscriptionServiceStub(self.channel)
        self.webhooks = webhooks_pb2_grpc.WebhookServiceStub(self.channel)
        self.identity = identity_pb2_grpc.IdentityServiceStub(self.channel)
        self.usage_stub = usage_pb2_grpc.UsageServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),)
        self.retries = retries
        self.retry_budget_s = retry_budget_s
        self.timeout = timeout
        self.upload_stats = resumable.UploadStats()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _md(self) -> tuple[tuple[str, str], ...]:
        """Auth metadata plus the caller's W3C trace context, when the caller is inside a span."""
        try:
            from opentelemetry import propagate, trace

            if trace.get_current_span().get_span_context().is_valid:
                carrier: dict[str, str] = {}
                propagate.inject(carrier)
                return self.metadata + tuple(carrier.items())
        except ImportError:  # the client library works without OpenTelemetry
            pass
        return self.metadata

    def _retrying(self, attempt_once: Callable[[], Any]) -> Any:
        """Run ``attempt_once`` again after UNAVAILABLE/RESOURCE_EXHAUSTED, waiting what the server
        asked for (RetryInfo) or a jittered backoff, for up to ``retry_budget_s``."""
        deadline = time.monotonic() + self.retry_budget_s
        attempt = 0
        while True:
            try:
                return attempt_once()
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or (self.retries is not None and attempt >= self.retries):
                    raise
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and quota_failure(exc) is not None:
                    raise  # over a quota: retrying will not help
                delay = server_retry_delay(exc) or backoff(attempt)
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                attempt += 1

    def call(self, method: Callable, request: Any, timeout: float | None = None) -> Any:
        """Unary call with retry on UNAVAILABLE (safe: our mutating RPCs are idempotent or request_id-keyed)."""
        return self._retrying(lambda: method(request, metadata=self._md(), timeout=timeout or self.timeout))

    # -- media
    def upload(self, path: str, content_type: str = "", request_id: str | None = None,
               on_progress: Callable[[int, int], None] | None = None, timeout: float = 3600.0,
               checksum: bool = True, resumable_upload: bool | None = None) -> media_pb2.Media:
        """Upload a file. Files of RESUMABLE_MIN bytes or more (or with ``resumable_upload``) go
        through an upload session that resumes after a broken stream from the committed size, on
        any replica (``self.upload_stats`` tells what was sent); smaller ones in one stream,
        retried from the start on UNAVAILABLE with the same request_id.

        With ``checksum`` the file's sha256 is sent so the server rejects a corrupted transfer
        (always, for an upload session).
        """
        size = os.path.getsize(path)
        if resumable_upload or (resumable_upload is None and size >= RESUMABLE_MIN):
            self.upload_stats = resumable.UploadStats()
            return resumable.upload(self, path, _sha256_file(path), lambda exc, n: server_retry_delay(exc) or
                                    backoff(n), content_type, request_id, on_progress, timeout, self.upload_stats)
        sha = _sha256_file(path) if checksum else ""
        request_id = request_id or str(uuid.uuid4())

        def requests() -> Iterator[media_pb2.UploadMediaRequest]:
            yield media_pb2.UploadMediaRequest(metadata=media_pb2.UploadMetadata(
                filename=os.path.basename(path), content_type=content_type, size_bytes=size, sha256=sha,
                request_id=request_id))
            sent = 0
            with open(path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield media_pb2.UploadMediaRequest(chunk=media_pb2.UploadChunk(data=chunk, write_offset=sent))
                    sent += len(chunk)
                    if on_progress:
                        on_progress(sent, size)

        return self._retrying(lambda: self.media.UploadMedia(requests(), metadata=self._md(), timeout=timeout).media)

    def get_media(self, name: str) -> media_pb2.Media:
        return self.call(self.media.GetMedia, media_pb2.GetMediaRequest(name=name))

    def wait_media(self, name: str, timeout: float = 300.0) -> media_pb2.Media:
        """The media once its preparation has ended (READY or FAILED), polling GetMedia (0.2 s,
        growing to 2 s between polls)."""
        deadline, pause = time.monotonic() + timeout, 0.2
        while True:
            media = self.get_media(name)
            if media.state != media_pb2.MEDIA_STATE_PROCESSING:
                return media
            if time.monotonic() + pause > deadline:
                raise TimeoutError(f"{name} was still being prepared after {timeout:g} s")
            time.sleep(pause)
            pause = min(2.0, pause * 1.5)

    def known_speaker(self, display_name: str, path: str) -> tpb.KnownSpeaker:
        """Upload a reference recording of one person's voice and wait until it can be used in
        ``DiarizationConfig.known_speakers``."""
        media = self.wait_media(self.upload(path).name)
        if media.state != media_pb2.MEDIA_STATE_READY:
            raise ValueError(f"the reference voice {path!r} for {display_name!r} cannot be used: {media.error_message}")
        return tpb.KnownSpeaker(display_name=display_name, media=media.name)

    # -- transcriptions
    def create(self, media: str, request_id: str | None = None, **config: Any) -> tpb.Transcription:
        req = tpb.CreateTranscriptionRequest(media=media, config=tpb.TranscriptionConfig(**config),
                                             request_id=request_id or str(uuid.uuid4()))
        return self.call(self.transcriptions.CreateTranscription, req)

    def get(self, name: str, basic: bool = False) -> tpb.Transcription:
        view = tpb.TRANSCRIPTION_VIEW_BASIC if basic else tpb.TRANSCRIPTION_VIEW_FULL
        return self.call(self.transcriptions.GetTranscription, tpb.GetTranscriptionRequest(name=name, view=view))

    def watch(self, name: str, after_sequence: int = 0, max_reconnects: int = 50,
              ) -> Iterator[tpb.WatchTranscriptionResponse]:
        """Yield events until a terminal one; reconnects and resumes after broken streams."""
        last = after_sequence
        failures = 0
        while True:
            try:
                stream = self.transcriptions.WatchTranscription(
                    tpb.WatchTranscriptionRequest(name=name, after_sequence=last), metadata=self._md())
                for ev in stream:
                    failures = 0
                    if not ev.heartbeat:
                        last = max(last, ev.sequence)
                    yield ev
                    if ended(ev):
                        return
                # Stream ended without a terminal event (server shut down): resume.
            except grpc.RpcError as exc:
                if exc.code() not in (*RETRYABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
                                      grpc.StatusCode.UNKNOWN) or failures >= max_reconnects:
                    raise
            failures += 1
            time.sleep(backoff(failures))

    def enhance(self, name: str, items: list[tpb.EnhancementRequest], request_id: str | None = None,
                ) -> tpb.Transcription:
        """Ask for AI items on a transcription (idempotent by request_id)."""
        req = tpb.EnhanceTranscriptionRequest(name=name, enhancements=items, request_id=request_id or str(uuid.uuid4()))
        return self.call(self.transcriptions.EnhanceTranscription, req)

    def export(self, name: str, fmt: str, max_line_length: int = 0, max_lines_per_caption: int = 0,
               max_caption_s: float = 0.0, kind: str = "", language: str = "") -> bytes:
        """Download a SUCCEEDED transcription as txt, srt, vtt, json or tsv (whole stream retried),
        or one of its AI items (``kind``: cleanup, translation, summary, lecture_notes; md for documents)."""
        fmt = "markdown" if fmt == "md" else fmt
        req = tpb.ExportTranscriptionRequest(
            name=name, format=tpb.ExportFormat.Value(f"EXPORT_FORMAT_{fmt.upper()}"),
            max_line_length=max_line_length, max_lines_per_caption=max_lines_per_caption,
            enhancement_kind=tpb.EnhancementKind.Value(f"ENHANCEMENT_KIND_{kind.upper()}") if kind else 0,
            target_language_code=language)
        if max_caption_s:
            req.max_caption_duration.CopyFrom(duration_pb2.Duration(seconds=int(max_caption_s),
                                                                    nanos=int(max_caption_s % 1 * 1e9)))
        return self._retrying(lambda: b"".join(part.data for part in self.transcriptions.ExportTranscription(
            req, metadata=self._md(), timeout=self.timeout * 4)))

    def create_user_token(self, user_id: str, ttl_s: float | None = None,
                          scopes: tuple[str, ...] = ()) -> identity_pb2.CreateUserTokenResponse:
        """An end-user token for ``user_id`` (needs the tenant's API key): pass its ``token`` to
        ``Client(target, token)`` in the user's app."""
        req = identity_pb2.CreateUserTokenRequest(user_id=user_id, scopes=list(scopes))
        if ttl_s is not None:
            req.ttl.FromTimedelta(dt.timedelta(seconds=ttl_s))
        return self.call(self.identity.CreateUserToken, req)

    def usage(self, start_day: str = "", end_day: str = "", user_id: str = "",
              per_user: bool = False) -> usage_pb2.GetUsageResponse:
        """Usage per day (YYYY-MM-DD, UTC; default this month) with totals and the tenant's quotas."""
        return self.call(self.usage_stub.GetUsage, usage_pb2.GetUsageRequest(
            start_day=start_day, end_day=end_day, user_id=user_id, per_user=per_user))

    # -- webhooks (the tenant's API key only)
    def create_webhook(self, url: str, event_types: list[str] | None = None, description: str = "",
                       request_id: str | None = None) -> webhooks_pb2.CreateWebhookEndpointResponse:
        """A new endpoint; the response's ``secret`` (whsec_...) is shown only here."""
        spec = webhooks_pb2.WebhookEndpoint(url=url, event_types=event_types or [], description=description)
        return self.call(self.webhooks.CreateWebhookEndpoint, webhooks_pb2.CreateWebhookEndpointRequest(
            webhook_endpoint=spec, request_id=request_id or str(uuid.uuid4())))

    def list_webhooks(self) -> list[webhooks_pb2.WebhookEndpoint]:
        return list(self.call(self.webhooks.ListWebhookEndpoints,
                              webhooks_pb2.ListWebhookEndpointsRequest(page_size=1000)).webhook_endpoints)

    def webhook_deliveries(self, endpoint: str = "", event: str = "", page_size: int = 100,
                           ) -> list[webhooks_pb2.WebhookDelivery]:
        req = webhooks_pb2.ListWebhookDeliveriesRequest(parent=endpoint, event=event, page_size=page_size)
        return list(self.call(self.webhooks.ListWebhookDeliveries, req).webhook_deliveries)

    def redeliver_webhook(self, name: str) -> list[webhooks_pb2.WebhookDelivery]:
        """Send again (same webhook-id): ``webhookDeliveries/<id>`` or every delivery of ``webhookEvents/<id>``."""
        return list(self.call(self.webhooks.RedeliverWebhook,
                              webhooks_pb2.RedeliverWebhookRequest(name=name)).webhook_deliveries)

    def capabilities(self) -> tpb.Capabilities:
        return self.call(self.transcriptions.GetCapabilities, tpb.GetCapabilitiesRequest())

    def wait(self, name: str, timeout: float = 3600.0) -> tpb.Transcription:
        deadline = time.monotonic() + timeout
        for _ev in self.watch(name):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not finish within {timeout} s")
        return self.get(name)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()
