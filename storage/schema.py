"""Creating and migrating the schema: every table of storage.db and storage.tenancy, created at
start-up (idempotent, one process at a time on PostgreSQL) and new columns added without touching data."""
from __future__ import annotations

import pathlib
import time
from typing import Any
from urllib.parse import urlparse

import peewee as pw
from playhouse.migrate import PostgresqlMigrator, SqliteMigrator, migrate
from playhouse.pool import PooledPostgresqlDatabase

from storage import live, tenancy
from storage.db import (
    ApiKey,
    Enhancement,
    EnhancementChunk,
    LlmUsage,
    MaintenanceState,
    Media,
    OutboxMessage,
    SchemaInfo,
    Tenant,
    Transcription,
    TranscriptionEvent,
    WorkerInfo,
    database,
)

SCHEMA_VERSION = 1
SCHEMA_LOCK_KEY = 0x6D70347474  # pg advisory lock held while the schema is created/migrated

MODELS = [Tenant, ApiKey, Media, Transcription, Enhancement, EnhancementChunk, LlmUsage, TranscriptionEvent,
          WorkerInfo, OutboxMessage, MaintenanceState, *tenancy.MODELS, *live.MODELS, SchemaInfo]


class _Pool(PooledPostgresqlDatabase):
    """Peewee's pool without its liveness round trip (``SELECT 1``) at check-out for a connection
    that was in use less than PING_AFTER_S ago.

    Peewee pings at every check-out while it holds the database's process-wide lock, so every
    API call of a replica waited on one round trip of every other (py-spy, GetTranscription
    through HAProxy with 32 in flight: most handler threads in Database.connect/close). A busy
    replica's connections go back and forth within milliseconds; one that PostgreSQL closed in
    that second fails its first statement instead (the call answers UNAVAILABLE, the client
    retries, and the broken connection is discarded at check-in). Idle connections are pinged
    as before.
    """

    PING_AFTER_S = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._returned: dict[int, float] = {}

    def _is_closed(self, conn: Any) -> bool:
        if conn.closed:
            return True
        recent = time.monotonic() - self._returned.get(id(conn), float("-inf")) < self.PING_AFTER_S
        if recent and conn.get_transaction_status() == 0:  # psycopg2 TRANSACTION_STATUS_IDLE (local flag)
            return False
        return super()._is_closed(conn)

    def _close_raw(self, conn: Any) -> None:  # discarded (stale, broken, close_idle): forget it
        self._returned.pop(id(conn), None)
        super()._close_raw(conn)

    def _close(self, conn: Any, close_conn: bool = False) -> None:
        super()._close(conn, close_conn)
        if close_conn or conn.closed:
            self._returned.pop(id(conn), None)
        else:
            self._returned[id(conn)] = time.monotonic()


def make_database(url: str, pool_size: int = 20) -> pw.Database:
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else parsed.path
        if path != ":memory:":
            pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        return pw.SqliteDatabase(
            path,
            pragmas={
                "journal_mode": "wal",
                "busy_timeout": 10000,
                "synchronous": "normal",
                "foreign_keys": 1,
            },
            check_same_thread=False,
        )
    if parsed.scheme in ("postgres", "postgresql"):
        return _Pool(
            parsed.path.lstrip("/"),
            user=parsed.username,
            password=parsed.password,
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or 5432,
            max_connections=pool_size,
            stale_timeout=300,
            timeout=10,
        )
    raise SystemExit(
        f"configuration error: MP4T_DATABASE_URL={url!r} is not supported; "
        "use sqlite:///path/to/file.db or postgresql://user:pass@host:5432/db"
    )


def init_db(url: str, pool_size: int = 20, create: bool = True) -> pw.Database:
    """Bind the models to ``url`` and create/migrate the schema (idempotent)."""
    db = make_database(url, pool_size)
    database.initialize(db)
    if create:
        with db.connection_context():
            with db.atomic():
                if isinstance(db, pw.PostgresqlDatabase):
                    # Processes starting together on an empty database would race in CREATE TABLE
                    # (UniqueViolation on pg_type): one at a time, until this transaction ends.
                    db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
                db.create_tables(MODELS, safe=True)
                _add_missing_columns(db)
                if not SchemaInfo.select().exists():
                    SchemaInfo.create(version=SCHEMA_VERSION)
    return db


def _add_missing_columns(db: pw.Database) -> None:
    """Forward-only migration: add columns the models have and the tables lack."""
    migrator = PostgresqlMigrator(db) if isinstance(db, pw.PostgresqlDatabase) else SqliteMigrator(db)
    ops = []
    for model in MODELS:
        existing = {c.name for c in db.get_columns(model._meta.table_name)}
        for field in model._meta.sorted_fields:
            if field.column_name not in existing:
                if not field.null and field.default is None:
                    field.null = True  # cannot add NOT NULL without a default to a filled table
                ops.append(migrator.add_column(model._meta.table_name, field.column_name, field))
    if ops:
        migrate(*ops)
