"""How busy a replica's handler threads are: what /healthz and the HAProxy agent report.

Unary and upload calls run on a fixed pool of handler threads (Watch streams do not: they are
coroutines). When every thread has been busy for ``saturated_after_s``, new calls wait in a
queue and their deadlines run out there; the replica then tells HAProxy to send new calls
elsewhere (agent weight) and /healthz says SATURATED, without cutting the calls it serves.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

from prometheus_client import Gauge, Histogram

BUSY = Gauge("mp4t_grpc_handler_threads_busy", "Handler threads running a call now.")
CAPACITY = Gauge("mp4t_grpc_handler_threads", "Handler threads of this replica.")
QUEUE_WAIT = Histogram("mp4t_grpc_queue_wait_seconds", "Time a call waited for a handler thread.",
                       buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30))


class HandlerLoad:
    def __init__(self, capacity: int, saturated_after_s: float = 2.0) -> None:
        self.capacity = capacity
        self.saturated_after_s = saturated_after_s
        self.busy = 0
        self._full_since: float | None = None
        self._lock = threading.Lock()
        CAPACITY.set(capacity)

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            self.busy += 1
            if self.busy >= self.capacity and self._full_since is None:
                self._full_since = time.monotonic()
        BUSY.inc()
        try:
            yield
        finally:
            BUSY.dec()
            with self._lock:
                self.busy -= 1
                if self.busy < self.capacity:
                    self._full_since = None

    def waited(self, seconds: float) -> None:
        QUEUE_WAIT.observe(seconds)

    def saturation(self) -> str | None:
        """Why the replica is saturated, or None."""
        full_since = self._full_since
        if full_since is None or time.monotonic() - full_since < self.saturated_after_s:
            return None
        return (f"all {self.capacity} handler threads busy for {time.monotonic() - full_since:.0f} s; "
                "new calls wait in a queue")
