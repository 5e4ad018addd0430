"""Upload streams of one replica: how many may run, and ending the ones that stall.

Each upload stream holds a handler thread while it lasts. Unbounded, 70 silent streams took
all 64 threads and the replica stopped answering anything, health included. So a replica runs
at most ``limit`` uploads (default: half its handler threads; unary calls always find one),
a tenant at most half of those, and a stream that sends no bytes for ``idle_s`` is ended with
DEADLINE_EXCEEDED (a zero-byte chunk is not progress). A refused upload gets RESOURCE_EXHAUSTED with RetryInfo
before it sends any data: the Client retries, HAProxy may send the retry elsewhere.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import structlog

from observability import metrics
from server.errors import exhausted

log = structlog.get_logger(__name__)


class Slot:
    def __init__(self, tenant: str, end: Callable[[str], None]) -> None:
        self.tenant, self.end = tenant, end
        self.last_progress = time.monotonic()
        self.expired = False

    def watch(self, requests: Iterator[Any]) -> Iterator[Any]:
        """``requests``, noting the time of every message that carries bytes."""
        for message in requests:
            chunk = getattr(message, "chunk", None)  # UploadMediaRequest; WriteUploadRequest carries data itself
            if (chunk.data if chunk is not None else getattr(message, "data", b"")):
                self.last_progress = time.monotonic()
            yield message


class UploadSlots:
    def __init__(self, limit: int, idle_s: float, retry_s: float) -> None:
        self.limit, self.per_tenant = limit, max(1, limit // 2)
        self.idle_s, self.retry_s = idle_s, retry_s
        self._slots: set[Slot] = set()
        self._tenants: Counter[str] = Counter()
        self._lock = threading.Lock()
        threading.Thread(target=self._reap, name="upload-idle", daemon=True).start()

    @contextmanager
    def slot(self, tenant: str, end: Callable[[str], None]) -> Iterator[Slot]:
        """An upload slot for ``tenant``; ``end(message)`` ends the call when it stalls."""
        with self._lock:
            if len(self._slots) >= self.limit:
                metrics.UPLOADS.labels("backpressure").inc()
                raise exhausted(f"this server is receiving {len(self._slots)} uploads, its maximum; retry in "
                                f"{self.retry_s:g} s", self.retry_s)
            if self._tenants[tenant] >= self.per_tenant:
                metrics.UPLOADS.labels("backpressure").inc()
                raise exhausted(f"you have {self._tenants[tenant]} uploads in progress on this server, the most "
                                f"one tenant may have; retry in {self.retry_s:g} s", self.retry_s)
            slot = Slot(tenant, end)
            self._slots.add(slot)
            self._tenants[tenant] += 1
            metrics.UPLOADS_IN_PROGRESS.inc()
        try:
            yield slot
        finally:
            with self._lock:
                metrics.UPLOADS_IN_PROGRESS.dec()
                self._slots.discard(slot)
                self._tenants[tenant] -= 1
                if not self._tenants[tenant]:
                    del self._tenants[tenant]

    def _reap(self) -> None:
        while True:
            time.sleep(min(1.0, self.idle_s / 4))
            now = time.monotonic()
            with self._lock:
                stalled = [s for s in self._slots if not s.expired and now - s.last_progress > self.idle_s]
                for s in stalled:
                    s.expired = True
            for s in stalled:
                log.warning("upload_idle_ended", tenant_id=s.tenant, idle_s=round(now - s.last_progress, 1))
                s.end(f"the upload sent no data for {self.idle_s:g} s and was ended; send it again")
