"""Worker process: consume a subset of queues, so each kind of work scales on its own."""
from __future__ import annotations

import signal
import threading
import time
from typing import Any

import dramatiq
import structlog

from mp4totext import runtime
from mp4totext.config import Settings
from observability import metrics, tracing
from workers.broker import QUEUES, setup_broker

log = structlog.get_logger(__name__)


def prewarm(settings: Settings) -> float:
    """Load the whisper model once, before the first job (returns load seconds)."""
    from workers.stages.transcribe import load_model

    started = time.monotonic()
    load_model(settings.whisper_model, settings.whisper_device, settings.whisper_compute_type,
               settings.whisper_cpu_threads, settings.whisper_download_root, settings.whisper_local_files_only)
    return time.monotonic() - started


def prewarm_diarization(settings: Settings) -> float:
    """Load the diarization pipeline once, before the first job (raises DiarizationUnavailable)."""
    from workers.stages.diarize import load_pipeline

    started = time.monotonic()
    load_pipeline(settings.diarization_pipeline, settings.diarization_device, settings.hf_token,
                  settings.diarization_batch_size)
    return time.monotonic() - started


class Registration:
    """This worker's row in WorkerInfo (queues, capabilities), refreshed by a heartbeat thread."""

    def __init__(self, queues: list[str], capabilities: dict[str, Any], interval_s: float) -> None:
        import os
        import socket
        import uuid

        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.queues, self.capabilities, self.interval_s = queues, capabilities, interval_s
        self.stop_event = threading.Event()
        self.beat()
        threading.Thread(target=self._run, name="worker-heartbeat", daemon=True).start()

    def beat(self) -> None:
        from storage.db import WorkerInfo, database, utcnow

        with database.connection_context():
            WorkerInfo.insert(id=self.id, queues=",".join(self.queues), capabilities=self.capabilities,
                              heartbeat_time=utcnow()).on_conflict(
                conflict_target=[WorkerInfo.id],
                update={WorkerInfo.heartbeat_time: utcnow(), WorkerInfo.capabilities: self.capabilities}).execute()

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            try:
                self.beat()
            except Exception as exc:
                log.warning("worker_heartbeat_failed", error=str(exc))

    def close(self) -> None:
        from storage.db import WorkerInfo, database

        self.stop_event.set()
        try:
            with database.connection_context():
                WorkerInfo.delete().where(WorkerInfo.id == self.id).execute()
        except Exception:
            pass


def start_worker(broker: Any, settings: Settings, queues: list[str], threads: int,
                 optional_diarization: bool = False) -> dramatiq.Worker:
    """Start consuming ``queues``. A worker for "diarize" loads its pipeline first and exits
    with the reason if it cannot; with ``optional_diarization`` (embedded mode) it just
    leaves that queue alone and speaker recognition stays unavailable."""
    unknown = set(queues) - set(QUEUES)
    if unknown:
        raise SystemExit(f"unknown queue(s) {sorted(unknown)}; choose from {', '.join(QUEUES)}")
    capabilities: dict[str, Any] = {}
    if "high" in queues:
        seconds = prewarm(settings)
        metrics.MODEL_LOAD.labels("whisper", settings.model_label).set(seconds)
        log.info("model_loaded", model=settings.model_label, seconds=round(seconds, 3))
        capabilities["transcription"] = settings.model_label
    if "diarize" in queues:
        from workers.actors import pipeline_label
        from workers.stages.diarize import DiarizationUnavailable

        try:
            seconds = prewarm_diarization(settings)
        except DiarizationUnavailable as exc:
            if not optional_diarization:
                raise SystemExit(f"diarize worker cannot start: {exc}") from None
            log.warning("diarization_unavailable", reason=str(exc))
            queues = [q for q in queues if q != "diarize"]
        else:
            label = pipeline_label(settings.diarization_pipeline)
            metrics.MODEL_LOAD.labels("diarization", label).set(seconds)
            log.info("diarization_pipeline_loaded", pipeline=label, seconds=round(seconds, 3))
            capabilities["diarization"] = label
    worker = dramatiq.Worker(broker, queues=set(queues), worker_threads=threads)
    # One unacked message per consumer: a crashed worker holds nothing hostage and
    # priorities apply across workers.
    worker.queue_prefetch = 1
    worker.start()
    worker.registration = Registration(queues, capabilities, settings.worker_heartbeat_s)  # type: ignore[attr-defined]
    if "low" in queues and settings.maintenance_interval_s > 0:
        threading.Thread(target=_schedule_maintenance, args=(settings.maintenance_interval_s,),
                         name="maintenance-scheduler", daemon=True).start()
    log.info("worker_started", queues=queues, threads=threads)
    return worker


def _schedule_maintenance(interval_s: float) -> None:
    """Enqueue the maintenance actor periodically (several schedulers are harmless: it is idempotent)."""
    from workers.actors import enqueue

    while True:
        try:
            enqueue("maintenance", "", 0)
        except Exception as exc:
            log.warning("maintenance_enqueue_failed", error=str(exc))
        time.sleep(interval_s)


def run(settings: Settings, queues: list[str], threads: int) -> None:
    tracing.setup_tracing("mp4totext-worker", **{"mp4t.queues": ",".join(queues)})
    runtime.init(settings)
    broker = setup_broker(settings)
    http = None
    if settings.http_listen:
        if settings.broker_url != "memory":
            metrics.install_collector("queues", metrics.QueueDepthCollector(settings.broker_url, QUEUES))
        http = metrics.HttpEndpoint(settings.http_listen)
    worker = start_worker(broker, settings, queues, threads)
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    stop.wait()
    # In-flight jobs get the time limit to finish; unfinished messages are redelivered.
    worker.stop(timeout=int(settings.worker_shutdown_s * 1000))
    worker.registration.close()
    runtime.get().bus.close()
    if http is not None:
        http.close()
    log.info("worker_stopped")
    tracing.shutdown()
