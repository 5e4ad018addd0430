"""The runner of AI items (actor ``enhance``, queue ``default``): claims an item for its message,
runs the pure stage (workers.stages.enhance) with the stored chunks under the supervisor, and
ends the item.

Stopping is the supervisor's (workers.watchdog), as for job stages, with one difference: every
"send a request, store and bill its answer" is a shielded section, so an answer that arrives is
always recorded (it was paid for) and a concurrency slot is always given back; a cancel, a lost
claim or the time limit found meanwhile stops the item when the section ends, or before its next
request. Every request's timeout ends by the item's deadline. The watcher renews the item's
claim. The time limit is the item's: the time its deliveries ran, summed (a redelivery goes on
with what is left; time waiting in the queue or for an LLM outage to pass does not count).

Failure policy (workers.supervisor.Policy), as for the optional job stages:
- cancelled by the client: CANCELLED;
- an outage of our own infrastructure: released uncounted, Dramatiq retries with backoff;
- the LLM server unreachable, overloaded or failing after the client's own retries: released,
  retried by Dramatiq with backoff (at least the server's Retry-After) until the item's attempts
  reach ``MP4T_LLM_MAX_ATTEMPTS``; an outage shorter than ``MP4T_OUTAGE_BUDGET_S`` since the
  item last made progress counts no attempt;
- an invalid answer after a repair, a refused request (``LLMError``: not retryable), the time
  limit: FAILED at once.
A failed item never touches the transcript: the job stays SUCCEEDED and gets a warning.
"""
from __future__ import annotations

import functools
import time
from typing import Any, ContextManager

import dramatiq
import structlog
from dramatiq.common import compute_backoff
from dramatiq.middleware import CurrentMessage
from dramatiq.middleware.retries import DEFAULT_MAX_BACKOFF

from core import enhancements, leases, runtime
from mp4totext.config import LLMSettings, Settings
from mp4totext.contracts import ClaimOutcome, TranscriptResult
from mp4totext.enhancements import KINDS, EnhancementKind, EnhancementState, TokenUsage
from observability import tracing
from storage.db import Enhancement, EnhancementChunk, connection, utcnow
from workers.pipeline import message_id, stop_reason
from workers.stages import enhance
from workers.stages import llm as llm_stage
from workers.stages.llm import LLM, LLMDeadline, transient
from workers.supervisor import Cancelled, JobTimeout, Policy, Unit, supervise
from workers.watchdog import Watchdog

log = structlog.get_logger(__name__)

MAX_RETRY_AFTER_S = 600.0  # a longer Retry-After is waited this long (the stuck-item sweep comes after 30 min)


@functools.lru_cache(maxsize=4)
def llm_for(s: LLMSettings) -> LLM:
    """One client per process and configuration (it learns what JSON mode the server takes once)."""
    return LLM(s)


class StoredChunks:
    """``enhance.Chunks`` on the database: each answer saved with its usage as it arrives."""

    def __init__(self, item_id: str, msg_id: str, model: str, dog: Watchdog) -> None:
        self.item_id, self.msg_id, self.model, self.dog = item_id, msg_id, model, dog
        self.stored: dict[str, Any] = enhancements.stored_chunks(item_id)

    def step(self) -> ContextManager[None]:
        return self.dog.shield()

    def put(self, key: str, value: Any, usage: TokenUsage, done: int, total: int) -> None:
        if enhancements.save_chunk(self.item_id, self.msg_id, key, value, usage, self.model, done, total):
            raise Cancelled()
        self.stored[key] = value
        self.dog.checkpoint()

    def progress(self, done: int, total: int) -> None:
        if enhancements.set_progress(self.item_id, self.msg_id, done, total):
            raise Cancelled()
        self.dog.checkpoint()

    def request(self) -> None:
        self.dog.checkpoint()
        enhancements.count_request(self.item_id, self.msg_id)

    def spent(self, usage: TokenUsage) -> None:
        enhancements.spend(self.item_id, self.msg_id, usage, self.model)


def _outage_budget_left(item_id: str, s: Settings) -> bool:
    """Whether the item made progress (started, or stored a chunk) less than MP4T_OUTAGE_BUDGET_S
    ago: an LLM outage shorter than that fails nothing, however long the item has run; after it,
    each try counts toward MP4T_LLM_MAX_ATTEMPTS."""
    with connection():
        row = Enhancement.select(Enhancement.start_time).where(Enhancement.id == item_id).first()
        last_chunk = (EnhancementChunk.select(EnhancementChunk.create_time)
                      .where(EnhancementChunk.enhancement == item_id)
                      .order_by(EnhancementChunk.create_time.desc()).scalar())
    if row is None or row.start_time is None:
        return False
    progress = max(row.start_time, last_chunk) if last_chunk is not None else row.start_time
    return (utcnow() - progress).total_seconds() < s.outage_budget_s


def _deadline(started: float, ran_s: float, s: Settings) -> float:
    """The item's deadline on this process's monotonic clock: MP4T_AI_TIME_LIMIT_S of running,
    less what its earlier deliveries ran."""
    return started + s.ai_time_limit_s - max(0.0, ran_s)


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
    unit = _ItemUnit(item, TranscriptResult.from_json(job.result), msg_id, s)
    structlog.contextvars.bind_contextvars(job_id=job.id, tenant_id=job.tenant_id, kind=unit.kind.value,
                                           attempt=item.attempts)
    tracing.set_attributes(**{"mp4t.job_id": job.id, "mp4t.item_id": item_id, "mp4t.ai.kind": unit.kind.value,
                              "mp4t.ai.language": unit.language, "mp4t.attempt": item.attempts,
                              "mp4t.model": s.llm_model})
    supervise(unit, s.cancel_poll_s)


class _ItemUnit(Unit):
    """An AI item as the supervisor runs it (workers.supervisor.Unit)."""

    stage = "enhance"

    def __init__(self, item: Enhancement, result: TranscriptResult, msg_id: str, s: Settings) -> None:
        self.item_id, self.msg_id, self.result, self.s = item.id, msg_id, result, s
        self.kind = EnhancementKind(item.kind)
        self.language = item.language or result.language or "en"
        self.started = time.monotonic()
        self.attempts, self.deadline = item.attempts, _deadline(self.started, item.run_seconds or 0.0, s)
        self.model = s.llm_model
        self.policy = Policy(
            what="the AI item", max_attempts=s.llm_max_attempts, timeouts=(JobTimeout, LLMDeadline),
            time_limit=f"the AI item ran longer than its time limit of {s.ai_time_limit_s} s (MP4T_AI_TIME_LIMIT_S)",
            wait_out=self._llm_down, exhausted=_exhausted)

    def _llm_down(self, exc: BaseException) -> str | None:
        """The LLM server is down or overloaded: wait it out uncounted, as an outage of our own services."""
        return "llm_unavailable" if transient(exc) and _outage_budget_left(self.item_id, self.s) else None

    def stop_reason(self) -> type[BaseException] | None:
        leases.heartbeat(Enhancement, self.item_id, self.msg_id, self.s.lease_s / 3)
        return stop_reason(Enhancement, self.item_id, self.msg_id)

    def run(self, dog: Watchdog) -> TranscriptResult:
        llm = llm_for(self.s.llm)
        self.model = llm.model
        budget = enhance.Budget(self.s.llm_context_tokens, self.s.llm_max_output_tokens)
        with llm_stage.deadline(self.deadline):
            dog.checkpoint()  # a redelivery past the item's time limit does not start again
            chunks = StoredChunks(self.item_id, self.msg_id, llm.model, dog)
            return enhance.run(self.kind, self.result, self.language, llm, chunks, budget)

    def succeeded(self, out: TranscriptResult) -> tuple[str, dict[str, Any]]:
        written_in = self.result.language if KINDS[self.kind].keeps_language else self.language  # e.g. a clean-up
        enhancements.finish(self.item_id, self.msg_id, EnhancementState.SUCCEEDED, result=out,
                            output_language=written_in)
        return "succeeded", {"kind": self.kind.value, "language": self.language, "model": self.model}

    def cancelled(self) -> None:  # only while this message holds it (the client may have asked again since)
        enhancements.finish(self.item_id, self.msg_id, EnhancementState.CANCELLED, "CANCELLED",
                            "cancelled by the client")

    def failed(self, reason: str, message: str) -> bool:
        enhancements.finish(self.item_id, self.msg_id, EnhancementState.FAILED, reason, message)
        return False  # recorded on the item; the message is done

    def release(self, error: str, counted: bool) -> None:
        enhancements.release_for_retry(self.item_id, self.msg_id, error, outage=not counted,
                                       ran_s=time.monotonic() - self.started)

    def retry(self, exc: BaseException) -> BaseException:
        return _again(exc, self.s, _retries()) if isinstance(exc, Exception) else exc


def _exhausted(exc: BaseException, attempts: int) -> str:
    why = "the LLM server could not be reached or kept failing" if transient(exc) else "it kept failing"
    return f"{why} ({attempts} attempts); last error: {type(exc).__name__}: {exc}"


def _again(exc: Exception, s: Settings, retries: int) -> BaseException:
    """What to raise for Dramatiq's retry: the error itself (its backoff), or, when the server
    asked for a longer wait (Retry-After), a Retry delayed that long (the backoff at least: the
    actor's retries are sized for it)."""
    wait_s = llm_stage.retry_after_s(exc)
    if wait_s is None or wait_s <= 0:
        return exc
    _, backoff_ms = compute_backoff(retries, factor=s.retry_min_backoff_ms,
                                    max_backoff=min(s.retry_max_backoff_ms, DEFAULT_MAX_BACKOFF))
    delay_ms = max(int(min(wait_s, MAX_RETRY_AFTER_S) * 1000), backoff_ms)
    return dramatiq.Retry(f"the LLM server asked to wait {wait_s:g} s: {exc}", delay=delay_ms)


def _retries() -> int:
    msg = CurrentMessage.get_current_message()
    return int(msg.options.get("retries", 0)) if msg is not None else 0
