"""Worker process: consume a subset of queues, so each kind of work scales on its own."""
from __future__ import annotations

import signal
import threading
import time
from typing import Any

import dramatiq
import structlog

from core import outbox, registry, runtime
from core.plan import QUEUES, queues_needing
from core.queue import make_broker
from mp4totext.config import Settings
from observability import metrics, tracing
from workers import actors, maintenance, retention
from workers.stages.diarize import DiarizationUnavailable, pipeline_label

log = structlog.get_logger(__name__)


def _timed(load: Any, settings: Settings) -> float:
    started = time.monotonic()
    load(settings)
    return time.monotonic() - started


def _capabilities(settings: Settings, queues: list[str],
                  optional_diarization: bool) -> tuple[list[str], dict[str, Any], str]:
    """Load the models this worker's queues need, before the first job; return (queues,
    capabilities, why speaker recognition is unavailable or "").

    A worker for "diarize" exits with the reason if it cannot load its pipeline; with
    ``optional_diarization`` (embedded mode) it leaves that queue alone instead, so the
    server refuses speaker recognition (FAILED_PRECONDITION, saying how to install it)
    rather than accepting jobs nothing can finish.
    """
    capabilities: dict[str, Any] = {}
    unavailable = ""
    if queues_needing("transcription") & set(queues):
        seconds = _timed(actors.whisper_model, settings)
        metrics.MODEL_LOAD.labels("whisper", settings.model_label).set(seconds)
        log.info("model_loaded", model=settings.model_label, seconds=round(seconds, 3))
        capabilities["transcription"] = settings.model_label
    speaker_queues = queues_needing("diarization")
    if speaker_queues & set(queues):
        try:
            seconds = _timed(actors.diarization_pipeline, settings)
        except DiarizationUnavailable as exc:
            if not optional_diarization:
                raise SystemExit(f"diarize worker cannot start: {exc}") from None
            log.warning("diarization_unavailable", reason=str(exc))
            queues = [q for q in queues if q not in speaker_queues]
            unavailable = str(exc)
        else:
            label = pipeline_label(settings.diarization_pipeline)
            metrics.MODEL_LOAD.labels("diarization", label).set(seconds)
            log.info("diarization_pipeline_loaded", pipeline=label, seconds=round(seconds, 3))
            capabilities["diarization"] = label
    if "default" in queues and settings.ai_enabled:
        capabilities["ai"] = settings.llm_model  # servers accept AI items while such a worker lives
    elif "default" in queues:
        # The default queue holds only AI items: a worker without a model leaves them to one that has one.
        log.info("ai_unavailable", reason="MP4T_LLM_MODEL is not set: not consuming the default queue")
        queues = [q for q in queues if q != "default"]
        if not queues:  # an empty list would make Dramatiq consume every queue
            raise SystemExit("worker for the default queue cannot start: no language model is configured "
                             "(set MP4T_LLM_MODEL, MP4T_LLM_BASE_URL and MP4T_LLM_API_KEY)")
    return queues, capabilities, unavailable


class Worker:
    """A Dramatiq worker for some queues, with its registration row and maintenance scheduler."""

    def __init__(self, broker: dramatiq.Broker, settings: Settings, queues: list[str], threads: int,
                 optional_diarization: bool = False) -> None:
        unknown = set(queues) - set(QUEUES)
        if unknown:
            raise SystemExit(f"unknown queue(s) {sorted(unknown)}; choose from {', '.join(QUEUES)}")
        if not settings.resolved_database_url.startswith("sqlite") and 2 * threads + 2 > settings.database_pool_size:
            raise SystemExit(f"{threads} worker threads need a database pool of at least {2 * threads + 2} connections "
                             "(each thread holds one for a whole message, its stage's watchdog one more at times; the "
                             "heartbeat and outbox relay use more): "
                             "raise MP4T_DATABASE_POOL_SIZE or lower MP4T_WORKER_THREADS")
        actors.register(broker, settings)
        queues, capabilities, self.diarization_unavailable = _capabilities(settings, queues, optional_diarization)
        self.worker = dramatiq.Worker(broker, queues=set(queues), worker_threads=threads)
        # Unacked messages per queue: the threads shared among its queues (a worker takes no more
        # than it can run: priorities apply across workers, a crash redelivers only what was
        # running). With 1 (until 2026-11-25) the threads of a one-queue worker ran one at a time.
        self.worker.queue_prefetch = max(1, threads // len(queues))
        self.worker.start()
        self.registration = registry.Registration(queues, capabilities, settings.worker_heartbeat_s)
        self.stopping = threading.Event()
        if "low" in queues and settings.maintenance_interval_s > 0:
            maintenance.schedule(settings.maintenance_interval_s, self.stopping)
        if "low" in queues and settings.retention_interval_s > 0:
            retention.schedule(settings.retention_interval_s, self.stopping)
        log.info("worker_started", queues=queues, threads=threads)

    def stop(self, timeout_s: float) -> None:
        """In-flight jobs get ``timeout_s`` to finish; unfinished messages are redelivered."""
        self.stopping.set()
        self.worker.stop(timeout=int(timeout_s * 1000))
        self.registration.close()


def run(settings: Settings, queues: list[str], threads: int) -> None:
    """The worker process: runs until SIGTERM/SIGINT, then stops gracefully."""
    tracing.setup_tracing("mp4totext-worker", **{"mp4t.queues": ",".join(queues)})
    runtime.init(settings)
    broker = make_broker(settings)
    http = None
    if settings.http_listen:
        if settings.broker_url != "memory":
            metrics.install_collector("queues", metrics.QueueDepthCollector(settings.broker_url, QUEUES))
        http = metrics.HttpEndpoint(settings.http_listen)
    worker = Worker(broker, settings, queues, threads)
    relay = outbox.Relay(settings.outbox_interval_s)
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    stop.wait()
    worker.stop(settings.worker_shutdown_s)
    relay.close()
    runtime.get().bus.close()
    if http is not None:
        http.close()
    log.info("worker_stopped")
    tracing.shutdown()
