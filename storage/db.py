"""Database: peewee models and the small set of queries the services need.

SQLite by default (WAL, busy timeout), PostgreSQL through a pooled connection
when ``MP4T_DATABASE_URL`` starts with ``postgresql://``. The schema is created
(and new columns added) at start-up by ``storage.schema.init_db`` without touching data.
A tenant's business tables (webhooks, end-user tokens, quotas and usage, upload sessions)
are in ``storage.tenancy``.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import uuid
from typing import Any, Iterator

import peewee as pw

from mp4totext.contracts import JobState, MediaState, Priority, Stage, broker_priority

database = pw.DatabaseProxy()

__all__ = ["JobState", "MediaState", "Stage", "Tenant", "ApiKey", "Media", "Transcription", "Enhancement",
           "EnhancementChunk", "LlmUsage", "TranscriptionEvent", "WorkerInfo", "OutboxMessage", "MaintenanceState",
           "SchemaInfo", "call_scope", "connection", "locked", "database", "utcnow", "new_id"]

def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def new_id() -> str:
    return uuid.uuid4().hex


class JSONField(pw.TextField):
    def db_value(self, value: Any) -> str | None:
        return None if value is None else json.dumps(value, separators=(",", ":"))

    def python_value(self, value: str | None) -> Any:
        return None if value is None else json.loads(value)


class BaseModel(pw.Model):
    class Meta:
        database = database
        legacy_table_names = False


class Leased(BaseModel):
    """The lease columns of every table whose rows a worker claims and runs (core.leases): a
    Dramatiq message holds the row while ``heartbeat_time`` is fresh; ``attempts`` counts claims."""

    attempts = pw.IntegerField(default=0)
    claim_message_id = pw.CharField(max_length=64, null=True)
    heartbeat_time = pw.DateTimeField(null=True)


# A tenant's resources: idempotent creation (request_id), newest-first paging, listing by state.
TENANT_INDEXES = ((("tenant", "request_id"), True), (("tenant", "create_time", "id"), False),
                  (("tenant", "state"), False))


class Tenant(BaseModel):
    id = pw.CharField(primary_key=True, max_length=32, default=new_id)
    name = pw.CharField(max_length=200, unique=True)
    create_time = pw.DateTimeField(default=utcnow)
    # Days its finished transcriptions and their media are kept (core.retention); None = the
    # configured MP4T_RETENTION_DAYS, 0 = forever. Set by the operator: `mp4totext set-retention`.
    retention_days = pw.IntegerField(null=True, default=None)


class ApiKey(BaseModel):
    id = pw.CharField(primary_key=True, max_length=32, default=new_id)
    tenant = pw.ForeignKeyField(Tenant, backref="keys", on_delete="CASCADE")
    key_hash = pw.CharField(max_length=64, unique=True)
    prefix = pw.CharField(max_length=32)
    label = pw.CharField(max_length=200, default="")
    revoked = pw.BooleanField(default=False)
    create_time = pw.DateTimeField(default=utcnow)


class Media(Leased):
    id = pw.CharField(primary_key=True, max_length=32, default=new_id)
    tenant = pw.ForeignKeyField(Tenant, backref="media", on_delete="CASCADE")
    request_id = pw.CharField(max_length=128, null=True)
    filename = pw.CharField(max_length=1024, default="")
    content_type = pw.CharField(max_length=255, default="")
    size_bytes = pw.BigIntegerField(default=0)
    sha256 = pw.CharField(max_length=64, default="")
    object_key = pw.CharField(max_length=512)
    audio_key = pw.CharField(max_length=512, null=True)
    state = pw.CharField(max_length=16, default=MediaState.PROCESSING)
    error_message = pw.TextField(default="")
    duration_s = pw.DoubleField(null=True)
    format_name = pw.CharField(max_length=255, default="")
    audio_codec = pw.CharField(max_length=64, default="")
    trace_context = JSONField(null=True)  # W3C carrier of the upload RPC (jobs continue its trace)
    owner = pw.CharField(max_length=128, default="")  # end user who created it ("" = the tenant's API key)
    create_time = pw.DateTimeField(default=utcnow)
    update_time = pw.DateTimeField(default=utcnow)

    class Meta:
        indexes = TENANT_INDEXES


class Transcription(Leased):
    id = pw.CharField(primary_key=True, max_length=32, default=new_id)
    tenant = pw.ForeignKeyField(Tenant, backref="transcriptions", on_delete="CASCADE")
    media = pw.ForeignKeyField(Media, backref="transcriptions", on_delete="CASCADE")
    request_id = pw.CharField(max_length=128, null=True)
    config = JSONField(default=dict)
    # RabbitMQ broker_priority (mp4totext.contracts maps it to and from the API's Priority).
    priority = pw.IntegerField(default=broker_priority(Priority.NORMAL))
    state = pw.CharField(max_length=16, default=JobState.QUEUED)
    stage = pw.CharField(max_length=24, default=Stage.PREPARING_MEDIA)
    progress = pw.DoubleField(default=0.0)
    processed_s = pw.DoubleField(default=0.0)
    duration_s = pw.DoubleField(null=True)
    sequence = pw.BigIntegerField(default=1)
    total_attempts = pw.IntegerField(default=0)
    cancel_requested = pw.BooleanField(default=False)
    error_message = pw.TextField(default="")
    error_reason = pw.CharField(max_length=64, default="")
    result = JSONField(null=True)
    processing_s = pw.DoubleField(null=True)
    trace_context = JSONField(null=True)
    warnings = JSONField(null=True)  # problems that did not stop the job (list of strings)
    ai_items = pw.IntegerField(default=0)  # how many Enhancement rows it has (0: no query needed)
    owner = pw.CharField(max_length=128, default="")  # end user who created it ("" = the tenant's API key)
    create_time = pw.DateTimeField(default=utcnow)
    update_time = pw.DateTimeField(default=utcnow)
    start_time = pw.DateTimeField(null=True)
    end_time = pw.DateTimeField(null=True)

    class Meta:
        indexes = (*TENANT_INDEXES, (("media", "state"), False))


class Enhancement(Leased):
    """One AI item of a transcription (mp4totext.enhancements): a clean-up, a translation into one
    language, a summary or lecture notes, with its own state, usage and result."""

    id = pw.CharField(primary_key=True, max_length=32, default=new_id)
    tenant = pw.ForeignKeyField(Tenant, on_delete="CASCADE")
    transcription = pw.ForeignKeyField(Transcription, backref="enhancements", on_delete="CASCADE")
    kind = pw.CharField(max_length=24)
    language = pw.CharField(max_length=35, default="")  # as requested, lower case; "" = the transcript's
    output_language = pw.CharField(max_length=35, default="")  # what it was written in
    request_id = pw.CharField(max_length=128, null=True)
    state = pw.CharField(max_length=16, default="PENDING")
    error_reason = pw.CharField(max_length=64, default="")
    error_message = pw.TextField(default="")
    model = pw.CharField(max_length=200, default="")
    prompt_tokens = pw.BigIntegerField(default=0)
    completion_tokens = pw.BigIntegerField(default=0)
    cost = pw.DoubleField(default=0.0)
    requests = pw.IntegerField(default=0)  # requests sent, repairs and lost answers included
    chunks_done = pw.IntegerField(default=0)
    chunks_total = pw.IntegerField(default=0)
    cancel_requested = pw.BooleanField(default=False)
    run_seconds = pw.DoubleField(default=0.0)  # time its deliveries ran, summed (MP4T_AI_TIME_LIMIT_S bounds it)
    result = JSONField(null=True)
    create_time = pw.DateTimeField(default=utcnow)
    update_time = pw.DateTimeField(default=utcnow)
    start_time = pw.DateTimeField(null=True)
    end_time = pw.DateTimeField(null=True)

    class Meta:
        indexes = ((("transcription", "kind", "language"), True), (("state", "update_time"), False))


class EnhancementChunk(BaseModel):
    """A stored answer for one chunk of an item: a redelivered message resumes after it."""

    id = pw.AutoField()
    enhancement = pw.ForeignKeyField(Enhancement, backref="chunks", on_delete="CASCADE")
    key = pw.CharField(max_length=64)
    output = JSONField()
    prompt_tokens = pw.IntegerField(default=0)
    completion_tokens = pw.IntegerField(default=0)
    create_time = pw.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("enhancement", "key"), True),)


class LlmUsage(BaseModel):
    """LLM tokens and cost per tenant, day and model (every response counted once, as it arrives)."""

    id = pw.AutoField()
    tenant = pw.ForeignKeyField(Tenant, on_delete="CASCADE")
    day = pw.DateField()
    model = pw.CharField(max_length=200)
    prompt_tokens = pw.BigIntegerField(default=0)
    completion_tokens = pw.BigIntegerField(default=0)
    cost = pw.DoubleField(default=0.0)
    responses = pw.IntegerField(default=0)

    class Meta:
        indexes = ((("tenant", "day", "model"), True),)


class TranscriptionEvent(BaseModel):
    """Stage transitions and terminal events (progress ticks live on the row)."""

    id = pw.AutoField()
    transcription_id = pw.CharField(max_length=32, index=True)
    sequence = pw.BigIntegerField()
    state = pw.CharField(max_length=16)
    stage = pw.CharField(max_length=24)
    detail = pw.TextField(default="")
    create_time = pw.DateTimeField(default=utcnow)


class WorkerInfo(BaseModel):
    """Live workers and what they can do (servers read it to accept or refuse options)."""

    id = pw.CharField(primary_key=True, max_length=128)  # host:pid:random
    queues = pw.CharField(max_length=255)
    capabilities = JSONField(default=dict)  # e.g. {"diarization": "pipeline label"}
    started_time = pw.DateTimeField(default=utcnow)
    heartbeat_time = pw.DateTimeField(default=utcnow, index=True)


class OutboxMessage(BaseModel):
    """A message to publish, committed in the same transaction as the state change that needs it.

    A relay (core.outbox) publishes it with confirms and deletes it, so a crash or a broker
    outage between the commit and the publish delays the next stage by seconds, never loses it.
    """

    id = pw.AutoField()
    actor = pw.CharField(max_length=64)
    object_id = pw.CharField(max_length=32)
    priority = pw.IntegerField()
    trace_context = JSONField(null=True)
    create_time = pw.DateTimeField(default=utcnow)


class MaintenanceState(BaseModel):
    """Where a bounded maintenance sweep stopped, and when periodic work last ran (core.retention)."""

    name = pw.CharField(primary_key=True, max_length=64)
    value = pw.TextField(default="")
    update_time = pw.DateTimeField(default=utcnow)


class SchemaInfo(BaseModel):
    version = pw.IntegerField()


_calls = threading.local()


@contextlib.contextmanager
def call_scope() -> Iterator[None]:
    """One API call: a connection the first ``connection()`` block inside takes from the pool is
    kept for the later ones and returned when the call ends (taking and returning one per block
    was ~45 % of a GetTranscription's time: the pool's lock). A call that needs none takes none."""
    _calls.depth = getattr(_calls, "depth", 0) + 1
    try:
        yield
    finally:
        _calls.depth -= 1
        if not _calls.depth and not database.is_closed():
            database.close()


@contextlib.contextmanager
def connection() -> Iterator[None]:
    """Use the connection this thread already holds (a message's: observability's DbConnections
    middleware opens one per message; an API call's, see ``call_scope``), else one from the pool
    for the block."""
    if not database.is_closed():
        yield
        return
    if getattr(_calls, "depth", 0):
        database.connect()  # kept until call_scope ends
        yield
        return
    with database.connection_context():
        yield


def is_outage(exc: BaseException) -> bool:
    """The database is unreachable or dropped the connection (core.failures asks this)."""
    return isinstance(exc, (pw.OperationalError, pw.InterfaceError))


def drop_broken_connection() -> None:
    """After an error: let go of this thread's connection if the server closed it, so the next
    statement gets a fresh one from the pool (psycopg2 marks a connection the server dropped)."""
    if database.obj is not None and not database.is_closed() and getattr(database.connection(), "closed", 0):
        database.close()


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """A write transaction that serialises with other writers (IMMEDIATE on SQLite)."""
    with connection():
        if isinstance(database.obj, pw.SqliteDatabase):
            with database.atomic("IMMEDIATE"):
                yield
        else:
            with database.atomic():
                yield


def add_event(job: Transcription, detail: str = "") -> None:
    TranscriptionEvent.create(
        transcription_id=job.id, sequence=job.sequence, state=job.state, stage=job.stage, detail=detail
    )

