"""grpc.health.v1 for the API: whether the database, object storage and broker are usable."""
from __future__ import annotations

import threading
from typing import Callable

import structlog
from grpc_health.v1 import health_pb2

from core import runtime
from mp4totext.v1 import identity_pb2, live_pb2, media_pb2, transcription_pb2, usage_pb2, webhooks_pb2
from storage.db import connection, database

log = structlog.get_logger(__name__)

SERVICE_NAMES = (
    media_pb2.DESCRIPTOR.services_by_name["MediaService"].full_name,
    transcription_pb2.DESCRIPTOR.services_by_name["TranscriptionService"].full_name,
    webhooks_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name,
    identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name,
    usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
    live_pb2.DESCRIPTOR.services_by_name["LiveService"].full_name,
)


class HealthMonitor:
    """Checks the database, object storage and broker every few seconds.

    Without the database nothing works: the server is down (grpc.health.v1 NOT_SERVING). Without
    storage or the broker it is degraded: reads (Get, List, Watch, Export) and creates (their
    messages wait in the outbox) still work, only uploads wait for storage, so it stays SERVING
    and the proxy keeps routing to it.
    """

    def __init__(self, set_status: Callable[[str, int], None], interval_s: float = 5.0) -> None:
        self.set_status = set_status  # (service name, grpc.health.v1 status)
        self.interval_s = interval_s
        self.stopping = threading.Event()
        self.problems: list[str] = []  # down: nothing works
        self.degraded: list[str] = []  # some calls answer UNAVAILABLE

    def check(self) -> tuple[list[str], list[str]]:
        rt = runtime.get()
        down, degraded = [], []
        try:
            with connection():
                database.execute_sql("SELECT 1")
        except Exception as exc:
            down.append(f"database: {exc}")
        try:
            rt.store.ping()
        except Exception as exc:
            degraded.append(f"storage: {exc}")
        connected = getattr(rt.bus, "connected", None)
        if connected is not None and not connected.wait(timeout=2.0):
            degraded.append("broker: not connected to RabbitMQ")
        return down, degraded

    def update(self) -> None:
        if self.stopping.is_set():
            return
        self.problems, self.degraded = self.check()
        status = health_pb2.HealthCheckResponse.NOT_SERVING if self.problems else health_pb2.HealthCheckResponse.SERVING
        for name in ("", *SERVICE_NAMES):
            self.set_status(name, status)
        if self.problems:
            log.warning("health_not_serving", problems=self.problems, degraded=self.degraded)
        elif self.degraded:
            log.warning("health_degraded", degraded=self.degraded)

    def run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            try:
                self.update()
            except Exception as exc:  # never let the monitor die
                log.warning("health_check_error", error=str(exc))

    def shutdown(self) -> None:
        self.stopping.set()
