"""The Watch loop: a job's progress events from the bus, checked against the database.

The database is the truth; the bus only makes progress live. The loop subscribes before
reading the row (no event can fall in between), sends every newer state once, a heartbeat
when nothing happened for ``heartbeat_s`` (re-reading the row then), and ends after the
terminal event. Pure apart from the callables it is given, so the unit tests drive it.
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager, Iterator, Protocol

import grpc

from mp4totext.contracts import DeletedEvent, ProgressEvent, parse_event
from server.errors import ApiError


class Subscription(Protocol):
    def get(self, timeout: float) -> dict[str, Any] | None: ...


def watch_events(job_id: str, after: int, *, subscribe: Callable[[str], ContextManager[Subscription]],
                 read: Callable[[str], ProgressEvent | None], is_active: Callable[[], bool],
                 heartbeat_s: float) -> Iterator[ProgressEvent]:
    """Events of ``job_id`` with a sequence above ``after``, heartbeats between them.

    Ends after the terminal event (at once if the job had ended at or before ``after``),
    when the client goes away, or with NOT_FOUND when the job is deleted.
    """
    with subscribe(job_id) as sub:
        last = after
        ev: ProgressEvent | DeletedEvent | None = read(job_id)
        while True:
            if ev is None or isinstance(ev, DeletedEvent):
                raise ApiError(grpc.StatusCode.NOT_FOUND, f"transcriptions/{job_id} was deleted")
            if ev.sequence > last:
                last = ev.sequence
                yield ev
                if ev.terminal:
                    return
            elif ev.terminal:  # the client has seen the end already
                return
            elif ev.heartbeat:
                yield ev.model_copy(update={"sequence": last})
            if not is_active():
                return
            raw = sub.get(timeout=heartbeat_s)
            if raw is not None:
                ev = parse_event(raw)
                continue
            ev = read(job_id)  # quiet: re-read the truth, send it or a heartbeat
            if ev is not None and ev.sequence <= last:
                ev = ev.model_copy(update={"heartbeat": True})
