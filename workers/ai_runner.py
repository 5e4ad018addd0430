"""The runner of AI items (actor ``enhance``, queue ``default``): claims an item for its message,
runs the pure stage (workers.stages.enhance) with the stored chunks, and ends the item.

Failure policy, as for the optional job stages (workers.pipeline):
- cancelled by the client (checked between chunks, and by the watchdog): CANCELLED;
- an outage of our own infrastructure: released uncounted, Dramatiq retries with backoff;
- the LLM server unreachable, overloaded or failing after the client's own retries: released,
  retried by Dramatiq with backoff until the item's attempts reach ``MP4T_LLM_MAX_ATTEMPTS``;
- an invalid answer after a repair, a refused request, the time limit: FAILED at once.
A failed item never touches the transcript: the job stays SUCCEEDED and gets a warning.
"""
from __future__ import annotations

import functools
import time
from typing import Any

import structlog

from core import enhancements, runtime
from core.failures import is_infrastructure
from core.jobs import LostClaim
from mp4totext.config import Settings
from mp4totext.contracts import ClaimOutcome, TranscriptResult
from mp4totext.enhancements import EnhancementKind, EnhancementState, TokenUsage
from observability import tracing
from storage.db import Enhancement, connection, drop_broken_connection, utcnow
from workers.pipeline import Cancelled, JobTimeout, finished, message_id
from workers.stages import enhance
from workers.stages.llm import LLM, LLMError, LLMOutputError, transient
from workers.watchdog import Watchdog

log = structlog.get_logger(__name__)


@functools.lru_cache(maxsize=4)
def llm_for(s: Settings) -> LLM:
    """One client per process and configuration (it learns what JSON mode the server takes once)."""
    return LLM(s)


class StoredChunks:
    """``enhance.Chunks`` on the database: each answer saved with its usage as it arrives."""

    def __init__(self, item_id: str, msg_id: str, model: str) -> None:
        self.item_id, self.msg_id, self.model = item_id, msg_id, model
        self.stored: dict[str, Any] = enhancements.stored_chunks(item_id)

    def put(self, key: str, value: Any, usage: TokenUsage, done: int, total: int) -> None:
        if enhancements.save_chunk(self.item_id, self.msg_id, key, value, usage, self.model, done, total):
            raise Cancelled()
        self.stored[key] = value

    def progress(self, done: int, total: int) -> None:
        if enhancements.set_progress(self.item_id, self.msg_id, done, total):
            raise Cancelled()

    def request(self) -> None:
        enhancements.count_request(self.item_id, self.msg_id)

    def spent(self, usage: TokenUsage) -> None:
        enhancements.spend(self.item_id, self.msg_id, usage, self.model)


def _stop_reason(item_id: str, msg_id: str, lease_s: float) -> type[BaseException] | None:
    enhancements.heartbeat(item_id, msg_id, lease_s / 3)
    with connection():
        row = (Enhancement.select(Enhancement.cancel_requested, Enhancement.claim_message_id)
               .where(Enhancement.id == item_id).first())
    if row is None or row.claim_message_id != msg_id:
        return LostClaim
    return Cancelled if row.cancel_requested else None


def _outage_budget_left(item_id: str, s: Settings) -> bool:
    """Whether the item started less than MP4T_OUTAGE_BUDGET_S ago (an LLM outage shorter than
    that fails nothing; after it, each try counts toward MP4T_LLM_MAX_ATTEMPTS)."""
    with connection():
        row = Enhancement.select(Enhancement.start_time).where(Enhancement.id == item_id).first()
    return row is not None and row.start_time is not None and \
        (utcnow() - row.start_time).total_seconds() < s.outage_budget_s


def run_enhancement(item_id: str) -> None:
    """The body of the ``enhance`` actor."""
    s = runtime.get().settings
    msg_id = message_id()
    structlog.contextvars.bind_contextvars(item_id=item_id, stage="enhance")
    claim = enhancements.claim(item_id, msg_id, s.llm_max_attempts, s.lease_s)
    if claim.outcome != ClaimOutcome.RUN:
        log.info("stage_skipped", outcome=claim.outcome.value)
        return
    item, job = claim.item, claim.job
    assert item is not None and job is not None
    kind = EnhancementKind(item.kind)
    result = TranscriptResult.from_json(job.result)
    language = item.language or result.language or "en"
    structlog.contextvars.bind_contextvars(job_id=job.id, tenant_id=job.tenant_id, kind=kind.value,
                                           attempt=item.attempts)
    tracing.set_attributes(**{"mp4t.job_id": job.id, "mp4t.item_id": item_id, "mp4t.ai.kind": kind.value,
                              "mp4t.ai.language": language, "mp4t.attempt": item.attempts, "mp4t.model": s.llm_model})
    started = time.monotonic()
    try:
        llm = llm_for(s)
        chunks = StoredChunks(item_id, msg_id, llm.model)
        budget = enhance.Budget(s.llm_context_tokens, s.llm_max_output_tokens)
        with Watchdog(started + s.ai_time_limit_s, lambda: _stop_reason(item_id, msg_id, s.lease_s), s.cancel_poll_s,
                      timeout=JobTimeout):
            out = enhance.run(kind, result, language, llm, chunks, budget)
    except BaseException as exc:  # noqa: BLE001 - classified below; Dramatiq's own exits re-raised there
        _failed(item_id, msg_id, exc, item.attempts, s, started)
        return
    written_in = result.language if kind == EnhancementKind.CLEANUP else language  # a clean-up keeps the language
    enhancements.finish(item_id, msg_id, EnhancementState.SUCCEEDED, result=out, output_language=written_in)
    finished("enhance", "succeeded", started, kind=kind.value, language=language, model=llm.model)


def _failed(item_id: str, msg_id: str, exc: BaseException, attempts: int, s: Settings, started: float) -> None:
    if isinstance(exc, Cancelled):
        enhancements.finish(item_id, None, EnhancementState.CANCELLED, "CANCELLED", "cancelled by the client")
        finished("enhance", "cancelled", started)
        return
    if isinstance(exc, LostClaim):
        finished("enhance", "lost_claim", started)
        return
    error = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, JobTimeout):
        final = "TIME_LIMIT", f"the AI item exceeded the time limit of {s.ai_time_limit_s} s (MP4T_AI_TIME_LIMIT_S)"
    elif isinstance(exc, LLMError):
        final = "LLM_OUTPUT_INVALID" if isinstance(exc, LLMOutputError) else "LLM_REFUSED", str(exc)
    elif is_infrastructure(exc):
        drop_broken_connection()
        enhancements.release_for_retry(item_id, msg_id, error, outage=True)
        finished("enhance", "outage", started, level="warning", error=error, retrying=True)
        raise exc
    elif isinstance(exc, Exception) and transient(exc) and _outage_budget_left(item_id, s):
        # the LLM server is down or overloaded: wait it out uncounted, as an outage of our own services
        enhancements.release_for_retry(item_id, msg_id, error, outage=True)
        finished("enhance", "llm_unavailable", started, level="warning", error=error, retrying=True)
        raise exc
    elif isinstance(exc, Exception) and attempts < s.llm_max_attempts:
        enhancements.release_for_retry(item_id, msg_id, error)
        finished("enhance", "error", started, level="warning", error=error, retrying=True)
        raise exc
    elif isinstance(exc, Exception):
        why = "the LLM server could not be reached or kept failing" if transient(exc) else "it kept failing"
        final = "ATTEMPTS_EXHAUSTED", f"{why} ({attempts} attempts); last error: {error}"
    else:
        raise exc  # Dramatiq's time limit or shutdown: the message is redelivered
    reason, message = final
    enhancements.finish(item_id, msg_id, EnhancementState.FAILED, reason, message)
    tracing.set_attributes(**{"mp4t.error": message})
    finished("enhance", reason.lower(), started, level="warning", error=message)
