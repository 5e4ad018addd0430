"""Guarded state transitions of AI items (clean-up, translation, summary, lecture notes).

An item belongs to a transcription and runs on the ``default`` queue once the transcript
exists (core.items starts waiting items with the job's success). Like the job stages, an item
is claimed by the Dramatiq message that runs it; every answer the LLM gives for a chunk is
stored with its token usage in one transaction (``save_chunk``), so a redelivered message
resumes after the stored chunks instead of paying for them again. Every transition bumps the
job's sequence and publishes its event: Watch shows items like stages.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from core import jobs, leases, outbox, quotas, webhooks
from core.jobs import LostClaim
from mp4totext.contracts import ClaimOutcome, JobState
from mp4totext.enhancements import ITEM_TERMINAL, EnhancementRequest, EnhancementState, TokenUsage
from observability.metrics import AI_ITEMS_FINISHED
from storage.db import Enhancement, EnhancementChunk, LlmUsage, Transcription, connection, locked, utcnow

ACTOR = "enhance"
MAX_ITEMS = 20  # per transcription


class NotAllowed(Exception):
    """The transcription cannot take AI items now (failed, cancelled)."""


def _job_locked(job_id: str) -> Transcription | None:
    return jobs._get_locked(job_id)


def _item_locked(item_id: str) -> Enhancement | None:
    return jobs._for_update(Enhancement.select().where(Enhancement.id == item_id)).first()


def _lock(item_id: str) -> tuple[Transcription | None, Enhancement | None]:
    """The item's job and the item, locked in that order (the order of every writer here: job,
    then its items), inside the caller's transaction."""
    row = Enhancement.select(Enhancement.transcription).where(Enhancement.id == item_id).first()
    if row is None:
        return None, None
    job = _job_locked(row.transcription_id)
    return job, _item_locked(item_id)


def _publish(job_id: str) -> None:
    with connection():
        job = Transcription.get_or_none(Transcription.id == job_id)
    if job is not None:
        jobs.publish(job)


def request(job_id: str, tenant_id: str, wanted: list[EnhancementRequest], request_id: str | None) -> bool:
    """Create the items ``wanted`` of a transcription (one per kind and language; one that
    FAILED or was CANCELLED is asked again, the others are left as they are). Items of a
    SUCCEEDED job are queued now, the others when its transcript is done. Returns False when
    ``request_id`` was used on this transcription already (nothing changed: a retry)."""
    with outbox.sending():
        with locked():
            job = _job_locked(job_id)
            if job is None:
                raise LostClaim(job_id)
            if job.state in (JobState.FAILED, JobState.CANCELLED):
                raise NotAllowed(f"transcriptions/{job_id} is {job.state}: there is no transcript to work on")
            if request_id and Enhancement.select().where(Enhancement.transcription == job_id,
                                                         Enhancement.request_id == request_id).exists():
                return False
            existing = {(e.kind, e.language): e for e in Enhancement.select().where(
                Enhancement.transcription == job_id)}
            new = [w for w in wanted if w.key not in existing]
            if len(existing) + len(new) > MAX_ITEMS:
                raise NotAllowed(f"transcriptions/{job_id} would have {len(existing) + len(new)} AI items; "
                                 f"at most {MAX_ITEMS}")
            queued = []
            for w in wanted:
                item = existing.get(w.key)
                if item is None:
                    item = Enhancement.create(tenant=tenant_id, transcription=job_id, kind=w.kind.value,
                                              language=w.language.lower(), request_id=request_id)
                    existing[w.key] = item
                elif item.state in (EnhancementState.FAILED, EnhancementState.CANCELLED):
                    # runs afresh (its time limit too); the warning of the failure it replaces goes
                    job.warnings = [w for w in job.warnings or [] if not w.startswith(_failed_prefix(item))]
                    item.state, item.error_reason, item.error_message = EnhancementState.PENDING, "", ""
                    item.attempts, item.cancel_requested, item.end_time, item.start_time = 0, False, None, None
                    item.run_seconds = 0.0
                    item.request_id, item.update_time = request_id, utcnow()
                    item.save()
                else:  # waiting or running: asked again, a cancel requested for it no longer holds
                    if item.cancel_requested:
                        Enhancement.update(cancel_requested=False).where(Enhancement.id == item.id).execute()
                    continue
                queued.append(item)
            job.ai_items = len(existing)
            jobs._bump(job, "AI items requested: " + ", ".join(f"{i.kind} {i.language}".strip() for i in queued))
            if job.state == JobState.SUCCEEDED:
                for item in queued:
                    outbox.add(ACTOR, item.id, job.priority, job.trace_context)
    _publish(job_id)
    return True


@dataclasses.dataclass
class ItemClaim:
    outcome: ClaimOutcome
    item: Enhancement | None = None
    job: Transcription | None = None


def claim(item_id: str, message_id: str, max_attempts: int, lease_s: float) -> ItemClaim:
    """Claim ``item_id`` for ``message_id`` (see core.jobs.claim_stage for the outcomes)."""
    with locked():
        job, item = _lock(item_id)
        if item is None or item.state in ITEM_TERMINAL:
            return ItemClaim(ClaimOutcome.DONE, item)
        if job is None or job.state != JobState.SUCCEEDED:
            return ItemClaim(ClaimOutcome.SKIP, item, job)  # core.items starts it with the job's success
        if item.cancel_requested:
            _end(item, job, EnhancementState.CANCELLED, "CANCELLED", "cancelled by the client")
            outcome = ClaimOutcome.CANCELLED
        elif leases.held_elsewhere(item, message_id, lease_s):
            return ItemClaim(ClaimOutcome.SKIP, item, job)
        else:
            item.attempts += 1
            if item.attempts > max_attempts:
                last = f"; last error: {item.error_message}" if item.error_message else ""
                _end(item, job, EnhancementState.FAILED, "ATTEMPTS_EXHAUSTED",
                     f"attempted {max_attempts} times without finishing (a worker crashed or timed out each "
                     f"time){last}")
                outcome = ClaimOutcome.EXHAUSTED
            else:
                item.state = EnhancementState.RUNNING
                leases.take(item, message_id)
                item.start_time = item.start_time or utcnow()
                item.save()
                jobs._bump(job, f"{item.kind} attempt {item.attempts}")
                outcome = ClaimOutcome.RUN
    _publish(item.transcription_id)
    return ItemClaim(outcome, item, job)


def stored_chunks(item_id: str) -> dict[str, Any]:
    with connection():
        return {c.key: c.output for c in EnhancementChunk.select(EnhancementChunk.key, EnhancementChunk.output)
                .where(EnhancementChunk.enhancement == item_id)}


def _owned(item_id: str, message_id: str) -> tuple[Transcription | None, Enhancement]:
    job, item = _lock(item_id)
    if item is None or item.claim_message_id != message_id or item.state != EnhancementState.RUNNING:
        raise LostClaim(item_id)
    return job, item


def spend(item_id: str, message_id: str, usage: TokenUsage, model: str) -> None:
    """Record what one response cost, on the item and the tenant's ledger (every response, as it
    arrives: repairs and answers that failed validation are paid for too)."""
    with locked():
        n = Enhancement.update(prompt_tokens=Enhancement.prompt_tokens + usage.prompt_tokens,
                               completion_tokens=Enhancement.completion_tokens + usage.completion_tokens,
                               cost=Enhancement.cost + usage.cost, model=model).where(
            Enhancement.id == item_id, Enhancement.claim_message_id == message_id).execute()
        if n:
            row = Enhancement.select(Enhancement.tenant).where(Enhancement.id == item_id).first()
            _ledger(row.tenant_id, model, usage)
            quotas.debit(row.tenant_id, usage.cost)  # prepaid tenants pay the LLM as it answers


def count_request(item_id: str, message_id: str) -> None:
    """One more request sent for this item (before it is sent: a lost answer still counts)."""
    with connection():
        Enhancement.update(requests=Enhancement.requests + 1).where(
            Enhancement.id == item_id, Enhancement.claim_message_id == message_id).execute()


def set_progress(item_id: str, message_id: str, done: int, total: int) -> bool:
    """Record chunks done / total; returns whether the client asked to cancel."""
    return save_chunk(item_id, message_id, None, None, TokenUsage(), None, done, total)


def save_chunk(item_id: str, message_id: str, key: str | None, output: Any, usage: TokenUsage, model: str | None,
               done: int, total: int) -> bool:
    """Store one chunk's answer (with what it cost, for the record: ``spend`` bills it) and the
    progress, in one transaction (no ``key``: the progress only); returns whether the client
    asked to cancel. Raises LostClaim if the item is not ours."""
    with locked():
        job, item = _owned(item_id, message_id)
        # The item is locked and ours: nobody else can store this key now (checked, not inferred from
        # an ignored insert, whose result SQLite does not report).
        if key is not None and not EnhancementChunk.select().where(EnhancementChunk.enhancement == item_id,
                                                                   EnhancementChunk.key == key).exists():
            EnhancementChunk.create(enhancement=item_id, key=key, output=output, prompt_tokens=usage.prompt_tokens,
                                    completion_tokens=usage.completion_tokens)
        item.model = model or item.model
        item.chunks_done, item.chunks_total = done, total
        item.heartbeat_time = item.update_time = utcnow()
        item.save()
        if job is not None:
            jobs._bump(job, "")
    _publish(item.transcription_id)
    return item.cancel_requested


def _ledger(tenant_id: str, model: str, usage: TokenUsage) -> None:
    day = dt.datetime.now(dt.timezone.utc).date()
    LlmUsage.insert(tenant=tenant_id, day=day, model=model, prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens, cost=usage.cost, responses=1).on_conflict(
        conflict_target=[LlmUsage.tenant, LlmUsage.day, LlmUsage.model],
        update={LlmUsage.prompt_tokens: LlmUsage.prompt_tokens + usage.prompt_tokens,
                LlmUsage.completion_tokens: LlmUsage.completion_tokens + usage.completion_tokens,
                LlmUsage.cost: LlmUsage.cost + usage.cost, LlmUsage.responses: LlmUsage.responses + 1}).execute()


def _end(item: Enhancement, job: Transcription | None, state: str, reason: str, message: str,
         result: Any = None, output_language: str = "", bump: bool = True) -> None:
    """End the item (its webhook event names the job's owner); the job gets a new sequence
    unless ``bump`` is False (the caller bumps it once for several items)."""
    now = utcnow()
    item.state, item.error_reason, item.error_message = state, reason, message
    item.claim_message_id, item.end_time, item.update_time = None, now, now
    if result is not None:
        item.result, item.output_language = result, output_language
        item.chunks_total = item.chunks_done = max(item.chunks_done, 1)  # done: the estimate gives way
    item.save()
    AI_ITEMS_FINISHED.labels(item.kind, state, reason or state).inc()
    webhooks.item_finished(item, job)  # committed with the item's end
    if job is None or not bump:
        return
    if state == EnhancementState.FAILED:
        warning = f"{_failed_prefix(item)} {message}"
        job.warnings = list(dict.fromkeys([*(job.warnings or []), warning]))
    jobs._bump(job, f"{item.kind} {state}")


def _failed_prefix(item: Enhancement) -> str:
    what = f"{item.kind.lower().replace('_', ' ')}{' (' + item.language + ')' if item.language else ''}"
    return f"{what} failed, the transcript is unaffected:"


def finish(item_id: str, message_id: str | None, state: str, reason: str = "", message: str = "",
           result: Any = None, output_language: str = "") -> bool:
    """End the item (SUCCEEDED with its result, FAILED with a warning on the job, CANCELLED).
    With a ``message_id`` only while that message holds it. Returns whether it changed."""
    with locked():
        job, item = _lock(item_id)
        if item is None or item.state in ITEM_TERMINAL:
            return False
        if message_id is not None and item.claim_message_id != message_id:
            return False
        _end(item, job, state, reason, message, result, output_language)
    _publish(item.transcription_id)
    return True


def release_for_retry(item_id: str, message_id: str, error: str, outage: bool = False, ran_s: float = 0.0) -> None:
    """A transient failure: give the item back for the next delivery (an outage's attempt is not
    counted; the ``ran_s`` seconds this delivery ran are, toward the item's time limit)."""
    leases.release(Enhancement, item_id, message_id, uncount=outage, error_message=error,
                   run_seconds=Enhancement.run_seconds + max(0.0, ran_s))


def request_cancel(job_id: str) -> int:
    """Cancel the job's unfinished items: waiting ones now, running ones between chunks."""
    with locked():
        job = _job_locked(job_id)
        if job is None or not job.ai_items:
            return 0
        items = list(Enhancement.select().where(Enhancement.transcription == job_id,
                                                Enhancement.state.not_in(list(ITEM_TERMINAL))))
        for item in items:  # locked after the job, as everywhere
            item = _item_locked(item.id)
            if item is None or item.state in ITEM_TERMINAL:
                continue
            if item.state == EnhancementState.PENDING:
                _end(item, job, EnhancementState.CANCELLED, "CANCELLED", "cancelled by the client", bump=False)
            else:
                Enhancement.update(cancel_requested=True).where(Enhancement.id == item.id).execute()
        if items:
            jobs._bump(job, "AI items: cancel requested")
    _publish(job_id)
    return len(items)


def stuck(older_than: dt.timedelta) -> tuple[list[tuple[str, int, Any]], list[tuple[str, int, Any]], int]:
    """Items of succeeded jobs that made no progress for ``older_than`` (message lost), highest
    priority first, then oldest, as (item id, priority, trace context) to enqueue again: the stale PENDING ones (which
    may only wait in a backlog), the RUNNING ones whose heartbeat stopped, and how many items are
    PENDING in all (what the default queue should hold a message for)."""
    cutoff = utcnow() - older_than
    fields = (Enhancement.id, Transcription.priority, Transcription.trace_context)
    pending = (Enhancement.state == EnhancementState.PENDING) & (Transcription.state == JobState.SUCCEEDED)
    with connection():
        waiting = list(Enhancement.select(*fields).join(Transcription)
                       .where(pending & (Enhancement.update_time < cutoff))
                       .order_by(Transcription.priority.desc(), Enhancement.update_time).tuples())
        running = list(Enhancement.select(*fields).join(Transcription)
                       .where(Transcription.state == JobState.SUCCEEDED, Enhancement.state == EnhancementState.RUNNING,
                              Enhancement.heartbeat_time < cutoff).tuples())
        total = Enhancement.select().join(Transcription).where(pending).count()
    return waiting, running, total


def items(job_id: str, with_results: bool = True) -> list[Enhancement]:
    """A transcription's items, oldest first (without their results unless asked)."""
    fields = [f for f in Enhancement._meta.sorted_fields if with_results or f.name != "result"]
    with connection():
        return list(Enhancement.select(*fields).where(Enhancement.transcription == job_id)
                    .order_by(Enhancement.create_time, Enhancement.id))


def find(job_id: str, kind: str, language: str) -> Enhancement | None:
    with connection():
        return Enhancement.get_or_none(Enhancement.transcription == job_id, Enhancement.kind == kind,
                                       Enhancement.language == language.lower())
