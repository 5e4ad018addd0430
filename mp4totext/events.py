"""Live progress bus: workers publish job events, every server process delivers them to its Watchers.

The database is the source of truth (Watch re-reads it on every heartbeat); the bus only
makes progress live. Two implementations:

- ``LocalBus``: in-process, for embedded mode.
- ``RabbitBus``: a RabbitMQ topic exchange (routing key = job id). Each server process
  binds its own exclusive queue, so any number of replicas each see every job's events.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import defaultdict
from typing import Any

import pika
import structlog

log = structlog.get_logger(__name__)

Event = dict[str, Any]


class Subscription:
    """Live events of one job, read by a coroutine on ``loop`` (the asyncio Watch): the bus's
    thread hands events over with call_soon_threadsafe, so no thread waits on a watcher."""

    def __init__(self, hub: "_Hub", job_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.hub = hub
        self.job_id = job_id
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue(maxsize=1000)

    def offer(self, event: Event) -> None:
        """Called by the bus's thread."""
        try:
            self.loop.call_soon_threadsafe(self._put, event)
        except RuntimeError:  # the loop has closed: nobody is watching any more
            pass

    def _put(self, event: Event) -> None:
        try:
            self.events.put_nowait(event)
        except asyncio.QueueFull:  # a stuck watcher loses live ticks; it re-reads the DB
            pass

    async def next(self, timeout: float) -> Event | None:
        try:
            return await asyncio.wait_for(self.events.get(), timeout)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.hub.unsubscribe(self)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Hub:
    """Fan-out of events to local subscribers, keyed by job id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, set[Subscription]] = defaultdict(set)

    def subscribe(self, job_id: str, loop: asyncio.AbstractEventLoop) -> Subscription:
        sub = Subscription(self, job_id, loop)
        with self._lock:
            self._subs[job_id].add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[sub.job_id]

    def dispatch(self, event: Event) -> None:
        with self._lock:
            subs = list(self._subs.get(event.get("id", ""), ()))
        for sub in subs:
            sub.offer(event)


class ProgressBus:
    def publish(self, event: Event) -> None:
        raise NotImplementedError

    def subscribe(self, job_id: str, loop: asyncio.AbstractEventLoop) -> Subscription:
        """Live events of ``job_id``, read with ``await sub.next(timeout)`` on ``loop``."""
        raise NotImplementedError

    def start(self) -> None:
        """Start receiving (server processes only)."""

    def close(self) -> None:
        pass


class LocalBus(ProgressBus):
    def __init__(self) -> None:
        self.hub = _Hub()

    def publish(self, event: Event) -> None:
        self.hub.dispatch(event)

    def subscribe(self, job_id: str, loop: asyncio.AbstractEventLoop) -> Subscription:
        return self.hub.subscribe(job_id, loop)


class RabbitBus(ProgressBus):
    def __init__(self, url: str, exchange: str) -> None:
        self.url = url
        self.exchange = exchange
        self.hub = _Hub()
        self._local = threading.local()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()

    # -- publishing (workers): one blocking connection per thread, best effort
    def _channel(self) -> Any:
        ch = getattr(self._local, "channel", None)
        if ch is None or ch.is_closed:
            conn = pika.BlockingConnection(pika.URLParameters(self.url))
            ch = conn.channel()
            ch.exchange_declare(self.exchange, exchange_type="topic", durable=True)
            self._local.conn, self._local.channel = conn, ch
        return ch

    def publish(self, event: Event) -> None:
        body = json.dumps(event, separators=(",", ":")).encode()
        for attempt in (1, 2):
            try:
                self._channel().basic_publish(self.exchange, routing_key=event["id"], body=body)
                return
            except Exception as exc:  # the DB already holds the truth; never fail a job for this
                self._drop_connection()
                if attempt == 2:
                    log.warning("progress_publish_failed", error=str(exc), job_id=event.get("id"))

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = self._local.channel = None
        try:
            if conn is not None and conn.is_open:
                conn.close()
        except Exception:
            pass

    # -- receiving (servers)
    def subscribe(self, job_id: str, loop: asyncio.AbstractEventLoop) -> Subscription:
        return self.hub.subscribe(job_id, loop)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._consume_forever, name="progress-bus", daemon=True)
            self._thread.start()

    def _consume_forever(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            conn = None
            try:
                conn = pika.BlockingConnection(pika.URLParameters(self.url))
                ch = conn.channel()
                ch.exchange_declare(self.exchange, exchange_type="topic", durable=True)
                q = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
                ch.queue_bind(q, self.exchange, routing_key="#")
                self.connected.set()
                backoff = 0.5
                for _method, _props, body in ch.consume(q, auto_ack=True, inactivity_timeout=1.0):
                    if self._stop.is_set():
                        break
                    if body is None:
                        continue
                    try:
                        self.hub.dispatch(json.loads(body))
                    except ValueError:
                        continue
            except Exception as exc:
                self.connected.clear()
                if self._stop.is_set():
                    break
                log.warning("progress_bus_reconnect", error=str(exc), retry_in_s=backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                try:
                    if conn is not None and conn.is_open:
                        conn.close()
                except Exception:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._drop_connection()
        if self._thread is not None:
            self._thread.join(timeout=5)


def make_bus(settings: Any) -> ProgressBus:
    if settings.broker_url == "memory":
        return LocalBus()
    return RabbitBus(settings.broker_url, settings.progress_exchange)
