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


def start_worker(broker: Any, settings: Settings, queues: list[str], threads: int) -> dramatiq.Worker:
    unknown = set(queues) - set(QUEUES)
    if unknown:
        raise SystemExit(f"unknown queue(s) {sorted(unknown)}; choose from {', '.join(QUEUES)}")
    if "high" in queues:
        seconds = prewarm(settings)
        metrics.MODEL_LOAD.labels("whisper", settings.model_label).set(seconds)
        log.info("model_loaded", model=settings.model_label, seconds=round(seconds, 3))
    worker = dramatiq.Worker(broker, queues=set(queues), worker_threads=threads)
    # One unacked message per consumer: a crashed worker holds nothing hostage and
    # priorities apply across workers.
    worker.queue_prefetch = 1
    worker.start()
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
    runtime.get().bus.close()
    if http is not None:
        http.close()
    log.info("worker_stopped")
    tracing.shutdown()
