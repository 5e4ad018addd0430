"""Live sessions (core.live): a recording in progress, its stored audio chunks and its final
segments. Created and migrated with the rest by ``storage.schema.init_db``."""
from __future__ import annotations

import peewee as pw

from storage.db import BaseModel, JSONField, Tenant, new_id, utcnow


class LiveSession(BaseModel):
    """One live recording: any replica continues it from ``committed_size`` (the stored bytes)."""

    id = pw.CharField(primary_key=True, max_length=32, default=new_id)
    tenant = pw.ForeignKeyField(Tenant, on_delete="CASCADE")
    owner = pw.CharField(max_length=128, default="")
    request_id = pw.CharField(max_length=128, null=True)
    state = pw.CharField(max_length=16, default="ACTIVE")  # ACTIVE | ENDED | FAILED
    encoding = pw.CharField(max_length=16)  # pcm16 | ogg_opus
    filename = pw.CharField(max_length=1024, default="")
    language = pw.CharField(max_length=35, default="en")
    model = pw.CharField(max_length=200, default="")
    config = JSONField(default=dict)  # the live config as the client sent it (LiveConfig, JSON)
    job_config = JSONField(null=True)  # the validated transcription config to run at the end (None = none)
    job_priority = pw.IntegerField(default=0)
    committed_size = pw.BigIntegerField(default=0)
    generation = pw.IntegerField(default=0)  # bumped by each stream: only the newest one writes
    segments = JSONField(default=list)  # the final segments so far (dicts), in order
    media_id = pw.CharField(max_length=32)  # reserved at creation: the recording's media
    transcription_id = pw.CharField(max_length=32, null=True)
    error_message = pw.TextField(default="")
    create_time = pw.DateTimeField(default=utcnow)
    update_time = pw.DateTimeField(default=utcnow)
    expire_time = pw.DateTimeField(index=True)

    class Meta:
        indexes = ((("tenant", "request_id"), True), (("state", "expire_time"), False))


class LiveChunk(BaseModel):
    """Audio bytes [offset, offset + size) of a session, stored as one object (never sent again)."""

    id = pw.AutoField()
    session = pw.ForeignKeyField(LiveSession, on_delete="CASCADE")
    offset = pw.BigIntegerField()
    size = pw.IntegerField()
    key = pw.CharField(max_length=512)

    class Meta:
        indexes = ((("session", "offset"), True),)


MODELS = [LiveSession, LiveChunk]
