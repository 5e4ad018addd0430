"""The usage ledger (per tenant, end user and UTC day) and the weekly usage report.

A transcription is recorded once, when it SUCCEEDS, in the transaction that marks it so
(``on_finish``, called by core.jobs under the job's row lock: a redelivered message finds the job
terminal and records nothing). Uploads add their bytes in the transaction that creates the media.
LLM tokens and cost come from the AI layer: ``llm_usage`` per tenant and day, and, per end user,
the AI items of the user's transcriptions (day = the item's creation day).
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Iterable

import peewee as pw
import structlog

from core import quotas
from mp4totext.contracts import DiarizationState, JobConfig, JobState, TranscriptResult
from storage.db import Enhancement, LlmUsage, Tenant, Transcription, connection, locked, utcnow
from storage.tenancy import JobCharge, Quota, UsageDaily, UsageReport

log = structlog.get_logger(__name__)

FIELDS = ("audio_seconds", "speaker_seconds", "transcriptions", "upload_bytes", "llm_prompt_tokens",
          "llm_completion_tokens", "llm_cost", "transcription_cost")


def today() -> dt.date:
    return utcnow().date()


def _add(tenant_id: str, owner: str, **amounts: float) -> None:
    """Add to the tenant's (and owner's) row of today (an upsert: one statement, no read)."""
    UsageDaily.insert(tenant=tenant_id, owner=owner, day=today(), **amounts).on_conflict(
        conflict_target=[UsageDaily.tenant, UsageDaily.owner, UsageDaily.day],
        update={getattr(UsageDaily, k): getattr(UsageDaily, k) + v for k, v in amounts.items()}).execute()


def charge_of(job: Transcription) -> tuple[float, float]:
    """(audio seconds, speaker-recognition seconds) a succeeded job is charged for."""
    result = TranscriptResult.from_json(job.result)
    audio = result.duration or job.duration_s or 0.0
    diarized = (JobConfig.from_json(job.config).diarization.enabled
                and result.diarization.state == DiarizationState.SUCCEEDED)
    return float(audio), float(audio if diarized else 0.0)


def on_finish(job: Transcription, state: str) -> None:
    """The job reached ``state``: charge it (SUCCEEDED) or release its reservation. Inside the
    transaction of the state change (exactly once per job)."""
    charge = JobCharge.get_or_none(JobCharge.job == job.id)
    if state != JobState.SUCCEEDED:
        if charge is not None and charge.state == "RESERVED":
            JobCharge.update(state="RELEASED").where(JobCharge.job == job.id).execute()
        return
    if charge is not None and charge.state != "RESERVED":
        return  # charged already (cannot happen: _finish runs once per job)
    audio, speaker = charge_of(job)
    cost = quotas.cost_of(audio, speaker)
    _add(job.tenant_id, getattr(job, "owner", "") or "", audio_seconds=audio, speaker_seconds=speaker,
         transcriptions=1, cost=cost)
    if cost:
        quotas.debit(job.tenant_id, cost)
    if charge is not None:
        JobCharge.update(state="CHARGED", charged_credits=cost).where(JobCharge.job == job.id).execute()


def on_upload(tenant_id: str, owner: str, size_bytes: int) -> None:
    """A media of ``size_bytes`` was stored (inside the transaction that creates its row)."""
    _add(tenant_id, owner or "", upload_bytes=size_bytes)


def on_live(tenant_id: str, owner: str, seconds: float) -> None:
    """A live session streamed ``seconds`` of audio (inside the transaction that ends it)."""
    if seconds > 0:
        _add(tenant_id, owner or "", live_seconds=seconds)


# ---------------------------------------------------------------- reading it


def _empty(day: str = "", user: str = "") -> dict[str, Any]:
    return {"day": day, "user_id": user, **{k: 0 for k in FIELDS}}


def rows(tenant_id: str, start: dt.date, end: dt.date, user: str | None = None,
         per_user: bool = False) -> list[dict[str, Any]]:
    """Usage per day (and per end user with ``per_user``) in [start, end], oldest first.
    ``user`` (not None) keeps only that end user's usage ("" = the API key's)."""
    split = per_user or user is not None
    out: dict[tuple[str, str], dict[str, Any]] = {}

    def row(day: Any, owner: str) -> dict[str, Any]:
        key = (str(day), owner if split else "")
        return out.setdefault(key, _empty(*key))

    with connection():
        q = UsageDaily.select().where(UsageDaily.tenant == tenant_id, UsageDaily.day.between(start, end))
        if user is not None:
            q = q.where(UsageDaily.owner == user)
        for r in q:
            target = row(r.day, r.owner)
            target["audio_seconds"] += r.audio_seconds
            target["speaker_seconds"] += r.speaker_seconds
            target["transcriptions"] += r.transcriptions
            target["upload_bytes"] += r.upload_bytes
            target["transcription_cost"] += r.cost
        for day, owner, prompt, completion, cost in _llm(tenant_id, start, end, user, split):
            target = row(day, owner)
            target["llm_prompt_tokens"] += int(prompt or 0)
            target["llm_completion_tokens"] += int(completion or 0)
            target["llm_cost"] += float(cost or 0.0)
    return [out[k] for k in sorted(out)]


def _llm(tenant_id: str, start: dt.date, end: dt.date, user: str | None,
         split: bool) -> Iterable[tuple[Any, str, Any, Any, Any]]:
    if not split:  # the tenant's ledger: every response, on the day it arrived
        q = (LlmUsage.select(LlmUsage.day, pw.fn.SUM(LlmUsage.prompt_tokens), pw.fn.SUM(LlmUsage.completion_tokens),
                             pw.fn.SUM(LlmUsage.cost))
             .where(LlmUsage.tenant == tenant_id, LlmUsage.day.between(start, end)).group_by(LlmUsage.day).tuples())
        return [(day, "", p, c, cost) for day, p, c, cost in q]
    if not hasattr(Transcription, "owner"):
        return []
    day = pw.fn.DATE(Enhancement.create_time)
    q = (Enhancement.select(day, Transcription.owner, pw.fn.SUM(Enhancement.prompt_tokens),
                            pw.fn.SUM(Enhancement.completion_tokens), pw.fn.SUM(Enhancement.cost))
         .join(Transcription, on=(Enhancement.transcription == Transcription.id))
         .where(Enhancement.tenant == tenant_id, Enhancement.create_time >= dt.datetime.combine(start, dt.time()),
                Enhancement.create_time < dt.datetime.combine(end + dt.timedelta(days=1), dt.time()))
         .group_by(day, Transcription.owner).tuples())
    if user is not None:
        q = q.where(Transcription.owner == user)
    return list(q)


def totals(records: list[dict[str, Any]]) -> dict[str, Any]:
    out = _empty()
    for r in records:
        for k in FIELDS:
            out[k] += r[k]
    return out


def quota_status(tenant_id: str) -> tuple[list[dict[str, Any]], quotas.Limits]:
    """Each limit with what counts against it now, what remains and when it resets."""
    with connection():
        lim = quotas.limits_of(Quota.get_or_none(Quota.tenant == tenant_id))
        active = quotas.active_jobs(tenant_id)
        used_s, reserved_s = quotas.month_seconds(tenant_id)
        stored = quotas.stored_bytes(tenant_id)
        reserved_credits = quotas.reserved_credits(tenant_id)
    _, reset = quotas.month_bounds()
    items = [("concurrent_jobs", lim.concurrent_jobs, active, None),
             ("monthly_audio_minutes", lim.monthly_audio_minutes, (used_s + reserved_s) / 60.0, reset),
             ("storage_bytes", lim.storage_bytes, stored, None),
             ("max_upload_bytes", lim.max_upload_bytes, 0, None)]
    if lim.credits is not None:
        items.append(("credits", lim.credits, reserved_credits, None))
    out = [{"name": name, "limit": float(limit or 0), "used": float(used), "unlimited": not limit,
            "remaining": max(float(limit) - float(used), 0.0) if limit else 0.0, "reset_time": reset_at}
           for name, limit, used, reset_at in items]
    return out, lim


# ---------------------------------------------------------------- the weekly report (low queue)


def last_week(now: dt.datetime | None = None) -> tuple[str, dt.date, dt.date]:
    """The last complete ISO week: ("2026-W47", its Monday, its Sunday)."""
    day = (now or utcnow()).date()
    monday = day - dt.timedelta(days=day.weekday() + 7)
    year, week, _ = monday.isocalendar()
    return f"{year}-W{week:02d}", monday, monday + dt.timedelta(days=6)


def tenants_due(week: str, week_end: dt.date) -> list[str]:
    """Tenants that existed in ``week`` and have no report for it yet."""
    done = UsageReport.select(UsageReport.tenant).where(UsageReport.week == week)
    end = dt.datetime.combine(week_end + dt.timedelta(days=1), dt.time())
    with connection():
        return [t.id for t in Tenant.select(Tenant.id).where(Tenant.create_time < end, Tenant.id.not_in(done))]


def weekly_report(tenant_id: str, now: dt.datetime | None = None) -> bool:
    """Aggregate the tenant's last complete ISO week into one ``usage_report`` row; False when it
    exists already (a second run, a redelivery or another scheduler's message)."""
    week, start, end = last_week(now)
    with locked():  # one writer at a time (SQLite does not say whether an ignored insert inserted)
        if UsageReport.select().where(UsageReport.tenant == tenant_id, UsageReport.week == week).exists():
            return False
        if not Tenant.select().where(Tenant.id == tenant_id).exists():
            return False
        per_user = rows(tenant_id, start, end, per_user=True)
        report = {"week": week, "start_day": str(start), "end_day": str(end),
                  "totals": totals(rows(tenant_id, start, end)), "days": rows(tenant_id, start, end),
                  "users": _by_user(per_user)}
        created = (UsageReport.insert(tenant=tenant_id, week=week, report=report)
                   .on_conflict_ignore().execute())
    if created:
        log.info("usage_report", tenant_id=tenant_id, week=week, **{k: round(v, 3) if isinstance(v, float) else v
                                                                    for k, v in report["totals"].items()
                                                                    if k in FIELDS})
    return bool(created)


def _by_user(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    users: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        users.setdefault(r["user_id"], []).append(r)
    return {user: {k: v for k, v in totals(rs).items() if k in FIELDS} for user, rs in users.items()}
