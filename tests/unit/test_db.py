"""Schema creation and forward migration without data loss (SQLite; PostgreSQL is in e2e/test_db_postgres.py)."""
from __future__ import annotations

import pathlib

from storage import db as dbmod
from storage import schema


def test_sqlite_pragmas_and_migration_keeps_data(tmp_path: pathlib.Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    database = schema.init_db(url)
    with database.connection_context():
        assert database.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert database.execute_sql("PRAGMA busy_timeout").fetchone()[0] == 10000
        tenant = dbmod.Tenant.create(name="t")
        media = dbmod.Media.create(tenant=tenant, object_key="k")
        # simulate an older schema: drop a column the current model has
        database.execute_sql('ALTER TABLE "media" DROP COLUMN "audio_codec"')
    schema.init_db(url)  # start-up again: migrates
    with dbmod.database.connection_context():
        cols = {c.name for c in dbmod.database.get_columns("media")}
        assert "audio_codec" in cols
        assert dbmod.Media.get_by_id(media.id).object_key == "k"
        assert dbmod.SchemaInfo.select().count() == 1
