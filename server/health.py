"""grpc.health.v1 for the API: whether the database, object storage and broker are usable."""
from __future__ import annotations

import threading

import structlog
from grpc_health.v1 import health, health_pb2

from core import runtime
from mp4totext.v1 import media_pb2, transcription_pb2
from storage.db import connection, database

log = structlog.get_logger(__name__)

SERVICE_NAMES = (
    media_pb2.DESCRIPTOR.services_by_name["MediaService"].full_name,
    transcription_pb2.DESCRIPTOR.services_by_name["TranscriptionService"].full_name,
)


class HealthMonitor:
    """Reflects whether DB, broker and storage are usable in grpc.health.v1, every few seconds."""

    def __init__(self, servicer: health.HealthServicer, interval_s: float = 5.0) -> None:
        self.servicer = servicer
        self.interval_s = interval_s
        self.stopping = threading.Event()
        self.problems: list[str] = []

    def check(self) -> list[str]:
        rt = runtime.get()
        problems = []
        try:
            with connection():
                database.execute_sql("SELECT 1")
        except Exception as exc:
            problems.append(f"database: {exc}")
        try:
            rt.store.ping()
        except Exception as exc:
            problems.append(f"storage: {exc}")
        connected = getattr(rt.bus, "connected", None)
        if connected is not None and not connected.wait(timeout=2.0):
            problems.append("broker: not connected to RabbitMQ")
        return problems

    def update(self) -> None:
        if self.stopping.is_set():
            return
        self.problems = self.check()
        status = health_pb2.HealthCheckResponse.NOT_SERVING if self.problems else health_pb2.HealthCheckResponse.SERVING
        for name in ("", *SERVICE_NAMES):
            self.servicer.set(name, status)
        if self.problems:
            log.warning("health_not_serving", problems=self.problems)

    def run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            try:
                self.update()
            except Exception as exc:  # never let the monitor die
                log.warning("health_check_error", error=str(exc))

    def shutdown(self) -> None:
        self.stopping.set()
        self.servicer.enter_graceful_shutdown()
