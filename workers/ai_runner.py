"""The runner of AI items (actor ``enhance``, queue ``default``): claims an item for its message,
runs the pure stage (workers.stages.enhance) with the stored chunks, and ends the item.

Stopping is cooperative: a thread beside the item (``Stop``) renews its claim and notes a
cancel, a lost claim or the time limit; the item checks before each request and after each
stored chunk, and every request's timeout ends by the item's deadline. Nothing is raised inside
the item's thread from outside, so an answer that arrives is always recorded (it was paid for)
and a concurrency slot is always given back. The time limit is the item's: the time its
deliveries ran, summed (a redelivery goes on with what is left; time waiting in the queue or
for an LLM outage to pass does not count).

Failure policy, as for the optional job stages (workers.pipeline):
- cancelled by the client (checked between chunks): CANCELLED;
- an outage of our own infrastructure: released uncounted, Dramatiq retries with backoff;
- the LLM server unreachable, overloaded or failing after the client's own retries: released,
  retried by Dramatiq with backoff (at least the server's Retry-After) until the item's attempts
  reach ``MP4T_LLM_MAX_ATTEMPTS``; an outage shorter than ``MP4T_OUTAGE_BUDGET_S`` since the
  item last made progress counts no attempt;
- an invalid answer after a repair, a refused request, the time limit: FAILED at once.
A failed item never touches the transcript: the job stays SUCCEEDED and gets a warning.
"""
from __future__ import annotations

import functools
import threading
import time
from typing import Any

import dramatiq
import structlog
from dramatiq.common import compute_backoff
from dramatiq.middleware import CurrentMessage
from dramatiq.middleware.retries import DEFAULT_MAX_BACKOFF

from core import enhancements, runtime
from core.failures import is_infrastructure
from core.jobs import LostClaim
from mp4totext.config import Settings
from mp4totext.contracts import ClaimOutcome, TranscriptResult
from mp4totext.enhancements import KINDS, EnhancementKind, EnhancementState, TokenUsage
from observability import tracing
from storage.db import Enhancement, EnhancementChunk, connection, drop_broken_connection, utcnow
from workers.pipeline import Cancelled, JobTimeout, finished, message_id
from workers.stages import enhance
from workers.stages import llm as llm_stage
from workers.stages.llm import LLM, LLMConfigError, LLMDeadline, LLMError, LLMOutputError, transient

log = structlog.get_logger(__name__)

MAX_RETRY_AFTER_S = 600.0  # a longer Retry-After is waited this long (the stuck-item sweep comes after 30 min)


@functools.lru_cache(maxsize=4)
def llm_for(s: Settings) -> LLM:
    """One client per process and configuration (it learns what JSON mode the server takes once)."""
    return LLM(s)


class Stop:
    """Cooperative stop of one item: a thread renews the claim every ``MP4T_CANCEL_POLL_S`` and
    notes a cancel or a lost claim; ``check()`` (the item's thread, between steps) raises it, or
    JobTimeout past the deadline. ``with Stop(...) as stop:`` runs the requests under the deadline."""

    def __init__(self, item_id: str, msg_id: str, deadline: float, s: Settings) -> None:
        self.item_id, self.msg_id, self.deadline, self.s = item_id, msg_id, deadline, s
        self.reason: type[BaseException] | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ai-item-stop", daemon=True)
        self._deadline_cm = llm_stage.deadline(deadline)

    def __enter__(self) -> "Stop":
        self._thread.start()
        self._deadline_cm.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._deadline_cm.__exit__(None, None, None)
        self._done.set()
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        while not self._done.wait(self.s.cancel_poll_s):
            try:  # the latest word: a cancel the client withdrew (asked again) no longer stops it
                reason = _stop_reason(self.item_id, self.msg_id, self.s.lease_s)
                self.reason = LostClaim if self.reason is LostClaim else reason
            except Exception as exc:  # noqa: BLE001 - an outage: the item meets it itself
                log.warning("ai_stop_check_failed", error=f"{type(exc).__name__}: {exc}")

    def check(self) -> None:
        if self.reason is not None:
            raise self.reason()
        if time.monotonic() >= self.deadline:
            raise JobTimeout()


class StoredChunks:
    """``enhance.Chunks`` on the database: each answer saved with its usage as it arrives."""

    def __init__(self, item_id: str, msg_id: str, model: str, stop: Stop) -> None:
        self.item_id, self.msg_id, self.model, self.stop = item_id, msg_id, model, stop
        self.stored: dict[str, Any] = enhancements.stored_chunks(item_id)

    def put(self, key: str, value: Any, usage: TokenUsage, done: int, total: int) -> None:
        if enhancements.save_chunk(self.item_id, self.msg_id, key, value, usage, self.model, done, total):
            raise Cancelled()
        self.stored[key] = value
        self.stop.check()

    def progress(self, done: int, total: int) -> None:
        if enhancements.set_progress(self.item_id, self.msg_id, done, total):
            raise Cancelled()
        self.stop.check()

    def request(self) -> None:
        self.stop.check()
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
    kind = EnhancementKind(item.kind)
    result = TranscriptResult.from_json(job.result)
    language = item.language or result.language or "en"
    structlog.contextvars.bind_contextvars(job_id=job.id, tenant_id=job.tenant_id, kind=kind.value,
                                           attempt=item.attempts)
    tracing.set_attributes(**{"mp4t.job_id": job.id, "mp4t.item_id": item_id, "mp4t.ai.kind": kind.value,
                              "mp4t.ai.language": language, "mp4t.attempt": item.attempts, "mp4t.model": s.llm_model})
    started = time.monotonic()
    deadline = _deadline(started, item.run_seconds or 0.0, s)
    try:
        llm = llm_for(s)
        budget = enhance.Budget(s.llm_context_tokens, s.llm_max_output_tokens)
        with Stop(item_id, msg_id, deadline, s) as stop:
            stop.check()  # a redelivery past the item's time limit does not start again
            out = enhance.run(kind, result, language, llm, StoredChunks(item_id, msg_id, llm.model, stop), budget)
    except BaseException as exc:  # noqa: BLE001 - classified below; Dramatiq's own exits re-raised there
        if isinstance(exc, Exception) and not isinstance(exc, (Cancelled, LostClaim, JobTimeout)) and \
                time.monotonic() >= deadline:
            # whatever the last request did (its timeout was cut to the deadline), the item's time is up
            exc = JobTimeout(f"last error: {type(exc).__name__}: {exc}")
        _failed(item_id, msg_id, exc, item.attempts, s, started)
        return
    written_in = result.language if KINDS[kind].keeps_language else language  # e.g. a clean-up
    enhancements.finish(item_id, msg_id, EnhancementState.SUCCEEDED, result=out, output_language=written_in)
    finished("enhance", "succeeded", started, kind=kind.value, language=language, model=llm.model)


def _failed(item_id: str, msg_id: str, exc: BaseException, attempts: int, s: Settings, started: float) -> None:
    if isinstance(exc, Cancelled):  # only while this message holds it (the client may have asked again since)
        enhancements.finish(item_id, msg_id, EnhancementState.CANCELLED, "CANCELLED", "cancelled by the client")
        finished("enhance", "cancelled", started)
        return
    if isinstance(exc, LostClaim):
        finished("enhance", "lost_claim", started)
        return
    error = f"{type(exc).__name__}: {exc}"
    ran = time.monotonic() - started
    if isinstance(exc, (JobTimeout, LLMDeadline)):
        final = "TIME_LIMIT", (f"the AI item ran longer than its time limit of {s.ai_time_limit_s} s "
                               f"(MP4T_AI_TIME_LIMIT_S){'; ' + str(exc) if str(exc) else ''}")
    elif isinstance(exc, LLMConfigError):
        final = "CONTEXT_TOO_SMALL", str(exc)
    elif isinstance(exc, LLMError):
        final = "LLM_OUTPUT_INVALID" if isinstance(exc, LLMOutputError) else "LLM_REFUSED", str(exc)
    elif is_infrastructure(exc):
        drop_broken_connection()
        enhancements.release_for_retry(item_id, msg_id, error, outage=True, ran_s=ran)
        finished("enhance", "outage", started, level="warning", error=error, retrying=True)
        raise exc
    elif isinstance(exc, Exception) and transient(exc) and _outage_budget_left(item_id, s):
        # the LLM server is down or overloaded: wait it out uncounted, as an outage of our own services
        enhancements.release_for_retry(item_id, msg_id, error, outage=True, ran_s=ran)
        finished("enhance", "llm_unavailable", started, level="warning", error=error, retrying=True)
        raise _again(exc, s, _retries())
    elif isinstance(exc, Exception) and attempts < s.llm_max_attempts:
        enhancements.release_for_retry(item_id, msg_id, error, ran_s=ran)
        finished("enhance", "error", started, level="warning", error=error, retrying=True)
        raise _again(exc, s, _retries())
    elif isinstance(exc, Exception):
        why = "the LLM server could not be reached or kept failing" if transient(exc) else "it kept failing"
        final = "ATTEMPTS_EXHAUSTED", f"{why} ({attempts} attempts); last error: {error}"
    else:
        raise exc  # Dramatiq's time limit or shutdown: the message is redelivered
    reason, message = final
    enhancements.finish(item_id, msg_id, EnhancementState.FAILED, reason, message)
    tracing.set_attributes(**{"mp4t.error": message})
    finished("enhance", reason.lower(), started, level="warning", error=message)


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
