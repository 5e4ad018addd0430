"""Schema creation and forward migration without data loss (SQLite and PostgreSQL)."""
from __future__ import annotations

import pathlib

import peewee as pw

from storage import db as dbmod


def test_sqlite_pragmas_and_migration_keeps_data(tmp_path: pathlib.Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    database = dbmod.init_db(url)
    with database.connection_context():
        assert database.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert database.execute_sql("PRAGMA busy_timeout").fetchone()[0] == 10000
        tenant = dbmod.Tenant.create(name="t")
        media = dbmod.Media.create(tenant=tenant, object_key="k")
        # simulate an older schema: drop a column the current model has
        database.execute_sql('ALTER TABLE "media" DROP COLUMN "audio_codec"')
    dbmod.init_db(url)  # start-up again: migrates
    with dbmod.database.connection_context():
        cols = {c.name for c in dbmod.database.get_columns("media")}
        assert "audio_codec" in cols
        assert dbmod.Media.get_by_id(media.id).object_key == "k"
        assert dbmod.SchemaInfo.select().count() == 1


def test_postgres_schema(pg_url: str) -> None:
    database = dbmod.init_db(pg_url, pool_size=2)
    assert isinstance(database, pw.PostgresqlDatabase)
    dbmod.init_db(pg_url, pool_size=2)  # idempotent
    with dbmod.database.connection_context():
        indexes = {i.name for i in dbmod.database.get_indexes("transcription")}
        assert any("tenant_id_request_id" in i for i in indexes)
