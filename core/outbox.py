"""The transactional outbox: the next stage's message is committed with the state change.

``add`` writes the message row inside the caller's transaction (the one that moves the job
or media on). After the commit, the writer calls ``publish`` for the rows it wrote (the fast
path: the message goes out at once, as before); a ``Relay`` thread in every server and worker
process publishes whatever is still there every ``MP4T_OUTBOX_INTERVAL_S``. So a crash or a
broker outage between the commit and the publish delays work by seconds, instead of leaving
it stuck until the maintenance sweep. Publishing is at-least-once (a row is deleted only after
its publish was confirmed); every stage is idempotent, so a duplicate is harmless.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Iterable, Iterator, Mapping

import peewee as pw
import structlog

from core.queue import enqueue
from storage.db import OutboxMessage, connection, database, locked

log = structlog.get_logger(__name__)

BATCH = 200
_written: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("outbox_written", default=None)


def add(actor: str, object_id: str, priority: int, trace_context: Mapping[str, str] | None = None) -> int:
    """Queue ``actor(object_id)`` for publishing; call inside the transaction of the state change."""
    row_id = OutboxMessage.insert(actor=actor, object_id=object_id, priority=priority,
                                  trace_context=dict(trace_context) if trace_context else None).execute()
    written = _written.get()
    if written is not None:
        written.append(row_id)
    return row_id


@contextlib.contextmanager
def sending() -> Iterator[None]:
    """Publish the messages ``add``ed in this block when it ends (after their transactions)."""
    token = _written.set([])
    try:
        yield
    finally:
        written = _written.get() or []
        _written.reset(token)
        publish(written)


def publish(ids: Iterable[int] | None = None) -> int:
    """Publish the rows ``ids`` (or the oldest pending ones) and delete them; return how many.

    Never raises: what could not be published stays for the relay (logged once here).
    """
    ids = list(ids) if ids is not None else None
    if ids == []:
        return 0
    try:
        if ids is None and not _any_pending():  # the relay's usual case: no write lock taken
            return 0
        with locked():
            query = OutboxMessage.select().order_by(OutboxMessage.id).limit(BATCH)
            if ids is not None:
                query = query.where(OutboxMessage.id.in_(ids))
            if isinstance(database.obj, pw.PostgresqlDatabase):
                query = query.for_update(skip_locked=True)  # several relays share the work
            rows = list(query)
            for row in rows:
                enqueue(row.actor, row.object_id, row.priority, row.trace_context)
            if rows:
                OutboxMessage.delete().where(OutboxMessage.id.in_([r.id for r in rows])).execute()
        return len(rows)
    except Exception as exc:  # the rows stay: the relay tries again
        log.warning("outbox_publish_failed", error=f"{type(exc).__name__}: {exc}", pending=ids or "oldest")
        return 0


def _any_pending() -> bool:
    with connection():
        return OutboxMessage.select(OutboxMessage.id).exists()


class Relay:
    """Publishes pending outbox rows every ``interval_s`` until closed."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            while publish() == BATCH and not self._stop.is_set():
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
