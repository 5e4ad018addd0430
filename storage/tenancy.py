"""A tenant's business tables: webhooks (core.webhooks), end-user tokens (core.identity),
quotas and the usage ledger (core.quotas, core.usage), resumable upload sessions
(core.upload_sessions). Created and migrated with the rest by ``storage.schema.init_db``."""
from __future__ import annotations

import peewee as pw

from storage.db import BaseModel, JSONField, Tenant, Transcription, new_id, utcnow

__all__ = ["WebhookEndpoint", "WebhookEvent", "WebhookDelivery", "TokenKey", "UserTokenRevocation", "Quota",
           "UsageDaily", "JobCharge", "UsageReport", "UploadSession", "UploadPart"]


class WebhookEndpoint(BaseModel):
    """A tenant's webhook receiver (core.webhooks): the events it wants and its signing secrets."""

    id = pw.CharField(primary_key=True, max_length=32, default=new_id)
    tenant = pw.ForeignKeyField(Tenant, on_delete="CASCADE")
    request_id = pw.CharField(max_length=128, null=True)
    url = pw.CharField(max_length=2048)
    description = pw.CharField(max_length=1024, default="")
    event_types = JSONField(default=list)  # [] = every event type
    disabled = pw.BooleanField(default=False)
    disabled_reason = pw.CharField(max_length=512, default="")
    secret = pw.CharField(max_length=128)  # whsec_<base64>: signing needs it in clear
    previous_secret = pw.CharField(max_length=128, default="")  # still signs until previous_secret_expire_time
    previous_secret_expire_time = pw.DateTimeField(null=True)
    create_time = pw.DateTimeField(default=utcnow)
    update_time = pw.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("tenant", "request_id"), True), (("tenant", "create_time", "id"), False))


class WebhookEvent(BaseModel):
    """One event (its JSON body, fixed at the state change that made it: every attempt sends the same bytes)."""

    id = pw.CharField(primary_key=True, max_length=32, default=new_id)
    tenant = pw.ForeignKeyField(Tenant, on_delete="CASCADE")
    type = pw.CharField(max_length=64)
    body = pw.TextField()
    create_time = pw.DateTimeField(default=utcnow)


class WebhookDelivery(BaseModel):
    """An event for one endpoint: its retry schedule lives here, so it survives worker restarts."""

    id = pw.CharField(primary_key=True, max_length=32, default=new_id)
    tenant = pw.ForeignKeyField(Tenant, on_delete="CASCADE")
    endpoint = pw.ForeignKeyField(WebhookEndpoint, backref="deliveries", on_delete="CASCADE")
    event = pw.ForeignKeyField(WebhookEvent, backref="deliveries", on_delete="CASCADE")
    event_type = pw.CharField(max_length=64)
    state = pw.CharField(max_length=16, default="PENDING")  # PENDING | SUCCEEDED | FAILED
    attempts = pw.IntegerField(default=0)  # HTTP attempts, all rounds
    round_attempts = pw.IntegerField(default=0)  # attempts since it was created or redelivered
    next_attempt_time = pw.DateTimeField(null=True)
    claim_until = pw.DateTimeField(null=True)  # an attempt in flight (a worker's lease)
    last_status_code = pw.IntegerField(default=0)
    last_error = pw.TextField(default="")
    last_attempt_time = pw.DateTimeField(null=True)
    create_time = pw.DateTimeField(default=utcnow)
    update_time = pw.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("tenant", "create_time", "id"), False), (("state", "next_attempt_time"), False))


class TokenKey(BaseModel):
    """A tenant's end-user token signing key (HS256). ``id`` is the JWT ``kid``; the secret is a
    server-generated random value stored as is (protect the database as you protect API keys).
    The newest key without ``retire_time`` signs; a rotated key verifies until ``retire_time``."""

    id = pw.CharField(primary_key=True, max_length=32, default=new_id)
    tenant = pw.ForeignKeyField(Tenant, on_delete="CASCADE")
    secret = pw.CharField(max_length=128)
    create_time = pw.DateTimeField(default=utcnow)
    retire_time = pw.DateTimeField(null=True)

    class Meta:
        indexes = ((("tenant", "create_time"), False),)


class UserTokenRevocation(BaseModel):
    """Tokens of ``user_id`` issued before ``not_before`` are revoked (RevokeUserTokens)."""

    id = pw.AutoField()
    tenant = pw.ForeignKeyField(Tenant, on_delete="CASCADE")
    user_id = pw.CharField(max_length=128)
    not_before = pw.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("tenant", "user_id"), True),)


class Quota(BaseModel):
    """A tenant's limits (set by the operator: ``mp4totext set-quota``). NULL = the configured
    default (MP4T_QUOTA_*), 0 = unlimited. ``credits`` NULL = no prepaid credits; else the balance
    left after every charge so far (core.quotas). The row is locked by every create of a job."""

    tenant = pw.ForeignKeyField(Tenant, primary_key=True, on_delete="CASCADE")
    concurrent_jobs = pw.IntegerField(null=True)
    monthly_audio_minutes = pw.DoubleField(null=True)
    storage_bytes = pw.BigIntegerField(null=True)
    max_upload_bytes = pw.BigIntegerField(null=True)
    credits = pw.DoubleField(null=True)
    update_time = pw.DateTimeField(default=utcnow)


class UsageDaily(BaseModel):
    """The usage ledger: per tenant, end user ("" = the API key) and UTC day (core.usage)."""

    id = pw.AutoField()
    tenant = pw.ForeignKeyField(Tenant, on_delete="CASCADE")
    owner = pw.CharField(max_length=128, default="")
    day = pw.DateField()
    audio_seconds = pw.DoubleField(default=0.0)
    speaker_seconds = pw.DoubleField(default=0.0)
    transcriptions = pw.IntegerField(default=0)
    upload_bytes = pw.BigIntegerField(default=0)
    cost = pw.DoubleField(default=0.0)  # credits charged for transcription + speaker recognition
    live_seconds = pw.DoubleField(default=0.0)  # audio streamed for live captions (core.live)

    class Meta:
        indexes = ((("tenant", "owner", "day"), True),)


class JobCharge(BaseModel):
    """What a job reserved against its tenant's quotas when it was created (RESERVED), and what it
    was charged when it succeeded (CHARGED) or that it was not (RELEASED: failed or cancelled)."""

    job = pw.ForeignKeyField(Transcription, primary_key=True, on_delete="CASCADE")
    tenant = pw.ForeignKeyField(Tenant, on_delete="CASCADE")
    state = pw.CharField(max_length=16, default="RESERVED")
    reserved_seconds = pw.DoubleField(default=0.0)
    reserved_credits = pw.DoubleField(default=0.0)
    charged_credits = pw.DoubleField(default=0.0)
    create_time = pw.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("tenant", "state"), False),)


class UsageReport(BaseModel):
    """The weekly usage report of a tenant, one per ISO week (core.usage.weekly_report)."""

    id = pw.AutoField()
    tenant = pw.ForeignKeyField(Tenant, on_delete="CASCADE")
    week = pw.CharField(max_length=10)  # e.g. 2026-W47
    report = JSONField()
    create_time = pw.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("tenant", "week"), True),)


class UploadSession(BaseModel):
    """A resumable upload (core.upload_sessions): the file's declared size and sha256, its parts'
    multipart upload in object storage, and the media id it becomes. Any replica continues it."""

    id = pw.CharField(primary_key=True, max_length=32, default=new_id)
    tenant = pw.ForeignKeyField(Tenant, on_delete="CASCADE")
    owner = pw.CharField(max_length=128, default="")
    request_id = pw.CharField(max_length=128, null=True)
    filename = pw.CharField(max_length=1024, default="")
    content_type = pw.CharField(max_length=255, default="")
    size_bytes = pw.BigIntegerField()
    sha256 = pw.CharField(max_length=64)
    part_size = pw.BigIntegerField()
    media_id = pw.CharField(max_length=32)  # reserved at creation: the object key is the media's
    object_key = pw.CharField(max_length=512)
    upload_id = pw.CharField(max_length=1024)
    state = pw.CharField(max_length=16, default="ACTIVE")  # ACTIVE | COMPLETED | FAILED
    committed_size = pw.BigIntegerField(default=0)
    generation = pw.IntegerField(default=0)  # bumped by each WriteUpload stream: the newest one writes
    error_message = pw.TextField(default="")
    create_time = pw.DateTimeField(default=utcnow)
    update_time = pw.DateTimeField(default=utcnow)
    expire_time = pw.DateTimeField(index=True)

    class Meta:
        indexes = ((("tenant", "request_id"), True),)


class UploadPart(BaseModel):
    """A part of an upload session stored in object storage (never sent again)."""

    id = pw.AutoField()
    session = pw.ForeignKeyField(UploadSession, backref="parts", on_delete="CASCADE")
    number = pw.IntegerField()
    size = pw.BigIntegerField()
    etag = pw.CharField(max_length=128)

    class Meta:
        indexes = ((("session", "number"), True),)


MODELS = [WebhookEndpoint, WebhookEvent, WebhookDelivery, TokenKey, UserTokenRevocation, Quota, UsageDaily, JobCharge,
          UsageReport, UploadSession, UploadPart]
