"""The lease on a claimed row (storage.db.Leased: a job, a media file, an AI item), in one place.

A Dramatiq message holds a row while its heartbeat is fresh; another message (a redelivery after
a crash, a duplicate) may take it over once the lease has run out. Each table's claim function
(core.jobs, core.enhancements) decides what the row's own state allows and uses these to take,
keep, give back and check the lease. Webhook deliveries hold a time-bounded lease of their own
(``claim_until``: one HTTP attempt, no heartbeat).
"""
from __future__ import annotations

import datetime as dt
import enum
from typing import Any

import peewee as pw

from storage.db import Leased, connection, utcnow


class Holder(str, enum.Enum):
    """What a running unit finds when it looks at its row."""

    OURS = "ours"
    CANCEL = "cancel"  # still ours, and the client asked to cancel it
    LOST = "lost"  # deleted, or taken over after the lease ran out


def fresh(heartbeat: dt.datetime | None, lease_s: float) -> bool:
    return heartbeat is not None and (utcnow() - heartbeat).total_seconds() < lease_s


def held_elsewhere(row: Leased, message_id: str, lease_s: float) -> bool:
    """Whether another message holds ``row`` with a lease that has not run out."""
    return row.claim_message_id not in (None, message_id) and fresh(row.heartbeat_time, lease_s)


def take(row: Leased, message_id: str) -> None:
    """Give ``row`` (locked by the caller, saved by it) to ``message_id``, heartbeat now."""
    row.claim_message_id = message_id
    row.heartbeat_time = row.update_time = utcnow()


def heartbeat(model: type[Leased], row_id: str, message_id: str, older_than_s: float = 0.0) -> int:
    """Keep the lease fresh (written only when older than ``older_than_s``); 0 when not ours."""
    now = utcnow()
    with connection():
        return model.update(heartbeat_time=now).where(
            model.id == row_id, model.claim_message_id == message_id,
            model.heartbeat_time < now - dt.timedelta(seconds=older_than_s)).execute()


def holder(model: type[Leased], row_id: str, message_id: str) -> Holder:
    """Whether ``message_id`` still holds the row, and whether a cancel was asked for."""
    cancel = getattr(model, "cancel_requested", None)
    columns = [model.claim_message_id] + ([cancel] if cancel is not None else [])
    with connection():
        row = model.select(*columns).where(model.id == row_id).first()
    if row is None or row.claim_message_id != message_id:
        return Holder.LOST
    return Holder.CANCEL if cancel is not None and row.cancel_requested else Holder.OURS


def release(model: type[Leased], row_id: str, message_id: str, *where: pw.Expression, uncount: bool = False,
            **fields: Any) -> int:
    """Give the row back for the next delivery, with ``fields`` set; ``uncount`` takes back the
    attempt its claim counted (an outage of a service is not the work's failure)."""
    changes: dict[Any, Any] = {model.claim_message_id: None, model.update_time: utcnow(), **{
        getattr(model, name): value for name, value in fields.items()}}
    if uncount:
        changes[model.attempts] = pw.Case(None, [(model.attempts > 0, model.attempts - 1)], 0)
    with connection():
        return model.update(changes).where(model.id == row_id, model.claim_message_id == message_id,
                                           *where).execute()
