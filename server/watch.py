"""The Watch loop: a job's progress events from the bus, checked against the database.

The database is the truth; the bus only makes progress live. The loop subscribes before
reading the row (no event can fall in between), sends every newer state once, a heartbeat
when nothing happened for ``heartbeat_s`` (re-reading the row then), and ends after the
terminal event.

It is a coroutine on the server's event loop, so a watcher costs a task and a queue, never a
thread: a replica holds thousands while its handler threads serve unary calls. The rows of
all quiet watchers are re-read together (``BatchReader``: one query per window, not one per
watcher). Pure apart from the callables it is given, so the unit tests drive it.
"""
from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable, Callable, ContextManager, Protocol, TypeVar

import grpc

from mp4totext.contracts import DeletedEvent, ProgressEvent, parse_event
from server.errors import ApiError

T = TypeVar("T")

# Blocking work of the asyncio handlers (database reads, key lookups): a few threads of their
# own, so thousands of watchers never take the threads that serve unary calls.
_BLOCKING = ThreadPoolExecutor(max_workers=4, thread_name_prefix="async-db")


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the blocking pool, with the caller's context variables (tenant, log ids)."""
    ctx = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(_BLOCKING, ctx.run, fn, *args)


class Subscription(Protocol):
    async def next(self, timeout: float) -> dict[str, Any] | None: ...


class BatchReader:
    """Reads the rows many coroutines ask for with one ``read_many(ids)`` call per window.

    ``await reader.read(id)`` joins the current batch; one task per batch waits ``window_s``
    for others to join, runs the query on the blocking pool and hands each caller its row
    (None when the row is gone). A failed query fails every caller of that batch.
    """

    def __init__(self, read_many: Callable[[list[str]], dict[str, Any]], window_s: float = 0.05) -> None:
        self.read_many = read_many
        self.window_s = window_s
        self._pending: dict[str, list[asyncio.Future[Any]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def read(self, key: str) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append(fut)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        while self._pending:
            await asyncio.sleep(self.window_s)
            batch, self._pending = self._pending, {}
            try:
                rows = await in_thread(self.read_many, list(batch))
            except Exception as exc:
                for futs in batch.values():
                    for fut in futs:
                        if not fut.done():
                            fut.set_exception(exc)
                continue
            for key, futs in batch.items():
                for fut in futs:
                    if not fut.done():  # a caller that went away cancelled its future
                        fut.set_result(rows.get(key))


async def watch_events(job_id: str, after: int, *, subscribe: Callable[[str], ContextManager[Subscription]],
                       read: Callable[[str], Awaitable[ProgressEvent | None]],
                       heartbeat_s: float) -> AsyncIterator[ProgressEvent]:
    """Events of ``job_id`` with a sequence above ``after``, heartbeats between them.

    Ends after the terminal event (at once if the job had ended at or before ``after``), with
    NOT_FOUND when the job is deleted; a client that goes away cancels the coroutine.
    """
    with subscribe(job_id) as sub:
        last = after
        ev: ProgressEvent | DeletedEvent | None = await read(job_id)
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
            raw = await sub.next(heartbeat_s)
            if raw is not None:
                ev = parse_event(raw)
                continue
            ev = await read(job_id)  # quiet: re-read the truth, send it or a heartbeat
            if ev is not None and ev.sequence <= last:
                ev = ev.model_copy(update={"heartbeat": True})
