"""Schema creation on a real PostgreSQL server (the SQLite migration test is in unit/test_db.py)."""
from __future__ import annotations

import peewee as pw

from storage import db as dbmod
from storage import schema


def test_postgres_schema(pg_url: str) -> None:
    database = schema.init_db(pg_url, pool_size=2)
    assert isinstance(database, pw.PostgresqlDatabase)
    schema.init_db(pg_url, pool_size=2)  # idempotent
    with dbmod.database.connection_context():
        indexes = {i.name for i in dbmod.database.get_indexes("transcription")}
        assert any("tenant_id_request_id" in i for i in indexes)
