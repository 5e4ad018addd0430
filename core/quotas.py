"""Per-tenant quotas, the reservation a job makes when it is created, and fairness between tenants.

How a job is charged (never half-charged):
- CreateTranscription locks the tenant's ``quota`` row (so concurrent creates of one tenant take
  turns), checks the concurrent jobs, this month's audio minutes and the prepaid credits, and
  writes a ``job_charge`` RESERVED row with the media's duration and estimated cost, in the same
  transaction as the job. Refused: nothing is written and nothing is queued.
- Media still being prepared has no duration yet: the create then only checks that something is
  left, and the reservation gets its duration when the media is READY (``reserve_duration``,
  in the transaction that moves the job to WAITING); over the quota then, the job FAILS
  (QUOTA_EXCEEDED) before any work is queued.
- A job that SUCCEEDS is charged by the audio it actually transcribed (core.usage.on_finish, in
  the transaction that marks it SUCCEEDED: exactly once); one that FAILS or is CANCELLED releases
  its reservation and is not charged.
- LLM cost is debited from the credits as each response arrives (``debit``), like the ledger.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import peewee as pw

from mp4totext import config
from mp4totext.contracts import JobConfig, JobState
from storage.db import Tenant, Transcription, connection, database, utcnow
from storage.tenancy import JobCharge, Quota, UploadSession, UsageDaily

ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)
LIMIT_NAMES = ("concurrent_jobs", "monthly_audio_minutes", "storage_bytes", "max_upload_bytes", "credits")
FAIR_DEMOTION = 4  # broker priorities 10/7/5/2 -> 6/3/1/0: order within a tenant is kept


def settings() -> config.Settings:
    return config.settings()


# ---------------------------------------------------------------- limits


@dataclasses.dataclass(frozen=True)
class Limits:
    """A tenant's effective limits (0 = unlimited); ``credits`` None = no prepaid credits."""

    concurrent_jobs: int = 0
    monthly_audio_minutes: float = 0.0
    storage_bytes: int = 0
    max_upload_bytes: int = 0
    credits: float | None = None


def limits_of(row: Quota | None, s: config.Settings | None = None) -> Limits:
    s = s or settings()

    def pick(name: str, default: Any) -> Any:
        value = getattr(row, name, None) if row is not None else None
        return default if value is None else value

    return Limits(concurrent_jobs=int(pick("concurrent_jobs", s.quota_concurrent_jobs)),
                  monthly_audio_minutes=float(pick("monthly_audio_minutes", s.quota_monthly_audio_minutes)),
                  storage_bytes=int(pick("storage_bytes", s.quota_storage_bytes)),
                  max_upload_bytes=int(pick("max_upload_bytes", s.quota_max_upload_bytes)),
                  credits=row.credits if row is not None else None)


def limits(tenant_id: str) -> Limits:
    with connection():
        return limits_of(Quota.get_or_none(Quota.tenant == tenant_id))


@dataclasses.dataclass(frozen=True)
class Violation:
    """Which limit a request is over: the QuotaFailure the client gets."""

    tenant_id: str
    limit: str  # one of LIMIT_NAMES
    description: str
    used: float
    maximum: float
    reset_time: dt.datetime | None = None  # monthly limits
    retry_after_s: float | None = None


class QuotaExceeded(Exception):
    def __init__(self, violation: Violation) -> None:
        super().__init__(violation.description)
        self.violation = violation


def month_bounds(now: dt.datetime | None = None) -> tuple[dt.datetime, dt.datetime]:
    """The current calendar month in UTC: [start, next month's start), naive UTC."""
    now = now or utcnow()
    start = dt.datetime(now.year, now.month, 1)
    nxt = dt.datetime(now.year + (now.month == 12), now.month % 12 + 1, 1)
    return start, nxt


def _fmt_reset(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")


# ---------------------------------------------------------------- usage that counts against limits


def active_jobs(tenant_id: str) -> int:
    return Transcription.select().where(Transcription.tenant == tenant_id,
                                        Transcription.state.in_(ACTIVE_STATES)).count()


def month_seconds(tenant_id: str) -> tuple[float, float]:
    """(seconds transcribed this month, seconds reserved by jobs not finished yet)."""
    start, _ = month_bounds()
    used = (UsageDaily.select(pw.fn.COALESCE(pw.fn.SUM(UsageDaily.audio_seconds), 0.0))
            .where(UsageDaily.tenant == tenant_id, UsageDaily.day >= start.date()).scalar()) or 0.0
    reserved = (JobCharge.select(pw.fn.COALESCE(pw.fn.SUM(JobCharge.reserved_seconds), 0.0))
                .where(JobCharge.tenant == tenant_id, JobCharge.state == "RESERVED").scalar()) or 0.0
    return float(used), float(reserved)


def reserved_credits(tenant_id: str) -> float:
    return float((JobCharge.select(pw.fn.COALESCE(pw.fn.SUM(JobCharge.reserved_credits), 0.0))
                  .where(JobCharge.tenant == tenant_id, JobCharge.state == "RESERVED").scalar()) or 0.0)


def stored_bytes(tenant_id: str, owner: str | None = None) -> int:
    from storage.db import Media

    q = Media.select(pw.fn.COALESCE(pw.fn.SUM(Media.size_bytes), 0)).where(Media.tenant == tenant_id)
    if owner is not None and hasattr(Media, "owner"):
        q = q.where(Media.owner == owner)
    return int(q.scalar() or 0)


def pending_upload_bytes(tenant_id: str) -> int:
    """Bytes the tenant's unfinished (ACTIVE, unexpired) upload sessions declared: reserved
    against the storage quota, so parallel sessions cannot together store more than it allows."""
    return int(UploadSession.select(pw.fn.COALESCE(pw.fn.SUM(UploadSession.size_bytes), 0))
               .where(UploadSession.tenant == tenant_id, UploadSession.state == "ACTIVE",
                      UploadSession.expire_time > utcnow()).scalar() or 0)


def cost_of(audio_s: float, speaker_s: float, s: config.Settings | None = None) -> float:
    s = s or settings()
    return round(audio_s / 60.0 * s.price_per_audio_minute + speaker_s / 60.0 * s.price_per_speaker_minute, 6)


# ---------------------------------------------------------------- admission (inside the create transaction)


def _lock(tenant_id: str) -> Quota:
    """The tenant's quota row, locked until the transaction ends (created empty if missing)."""
    Quota.insert(tenant=tenant_id).on_conflict_ignore().execute()
    q = Quota.select().where(Quota.tenant == tenant_id)
    if isinstance(database.obj, pw.PostgresqlDatabase):
        q = q.for_update()
    return q.get()


@dataclasses.dataclass(frozen=True)
class Reservation:
    seconds: float
    credits: float


def _check_minutes(tenant_id: str, lim: Limits, seconds: float | None) -> None:
    if not lim.monthly_audio_minutes:
        return
    used, reserved = month_seconds(tenant_id)
    limit_s = lim.monthly_audio_minutes * 60.0
    taken = used + reserved
    if taken + (seconds or 0.0) > limit_s + 1e-6 or (seconds is None and taken >= limit_s):
        _, reset = month_bounds()
        need = f"; this media needs {seconds / 60:.2f} min" if seconds else ""
        raise QuotaExceeded(Violation(
            tenant_id, "monthly_audio_minutes",
            f"monthly audio quota: {taken / 60:.2f} of {lim.monthly_audio_minutes:g} minutes used or reserved this "
            f"month{need}; it resets on {_fmt_reset(reset)} (ask the operator for a higher quota)",
            round(taken / 60.0, 4), lim.monthly_audio_minutes, reset, (reset - utcnow()).total_seconds()))


def _check_credits(tenant_id: str, lim: Limits, cost: float, unknown: bool) -> None:
    if lim.credits is None:
        return
    left = lim.credits - reserved_credits(tenant_id)
    if cost > left + 1e-9 or (unknown and left <= 0 and cost == 0 and _priced()):
        raise QuotaExceeded(Violation(
            tenant_id, "credits",
            f"not enough credits: {max(left, 0):.4f} left (balance {lim.credits:.4f}, the rest reserved by queued "
            f"jobs), this transcription costs about {cost:.4f}; buy more credits from the operator",
            round(lim.credits - left, 6), lim.credits))


def _priced() -> bool:
    s = settings()
    return s.price_per_audio_minute > 0 or s.price_per_speaker_minute > 0


def admit(tenant_id: str, duration_s: float | None, config_json: Any) -> Reservation:
    """Check the tenant's quotas for one more job (raises QuotaExceeded). Call inside the
    transaction that creates the job, then ``reserve`` it: the quota row stays locked till commit."""
    lim = limits_of(_lock(tenant_id))
    if lim.concurrent_jobs:
        active = active_jobs(tenant_id)
        if active >= lim.concurrent_jobs:
            raise QuotaExceeded(Violation(
                tenant_id, "concurrent_jobs",
                f"concurrent jobs quota: {active} of {lim.concurrent_jobs} transcriptions are queued or running; "
                "create this one when one of them has finished", active, lim.concurrent_jobs, retry_after_s=5.0))
    _check_minutes(tenant_id, lim, duration_s)
    cfg = JobConfig.from_json(config_json)
    seconds = duration_s or 0.0
    cost = cost_of(seconds, seconds if cfg.diarization.enabled else 0.0)
    _check_credits(tenant_id, lim, cost, duration_s is None)
    if cfg.ai:
        _check_ai(tenant_id, lim, cost)
    return Reservation(seconds=seconds, credits=cost)


def _check_ai(tenant_id: str, lim: Limits, reserved_now: float = 0.0) -> None:
    """AI items of a prepaid tenant need credits left (their cost is known only as they run)."""
    s = settings()
    if lim.credits is None or not (s.llm_price_prompt_per_1k > 0 or s.llm_price_completion_per_1k > 0):
        return
    left = lim.credits - reserved_credits(tenant_id) - reserved_now
    if left <= 0:
        raise QuotaExceeded(Violation(
            tenant_id, "credits", f"no credits left for AI items ({left:.4f} after what queued jobs reserved); "
            "buy more credits from the operator", round(lim.credits - left, 6), lim.credits))


def check_ai(tenant_id: str) -> None:
    """Before AI items are queued for an existing transcript (EnhanceTranscription)."""
    with connection():
        lim = limits(tenant_id)
        _check_ai(tenant_id, lim)


def reserve(job_id: str, tenant_id: str, reservation: Reservation) -> None:
    JobCharge.create(job=job_id, tenant=tenant_id, reserved_seconds=reservation.seconds,
                     reserved_credits=reservation.credits)


def reserve_duration(job: Transcription, duration_s: float) -> str:
    """The job's media is READY: reserve its duration (the create did not know it). Returns why
    the job must not run ("" = fine). Inside the transaction that moves the job to WAITING."""
    charge = JobCharge.get_or_none(JobCharge.job == job.id)
    if charge is None or charge.state != "RESERVED" or charge.reserved_seconds > 0:
        return ""
    lim = limits_of(_lock(job.tenant_id))
    diarize = JobConfig.from_json(job.config).diarization.enabled
    cost = cost_of(duration_s, duration_s if diarize else 0.0)
    try:
        _check_minutes(job.tenant_id, lim, duration_s)
        _check_credits(job.tenant_id, lim, cost, False)
    except QuotaExceeded as exc:
        return str(exc)
    charge.reserved_seconds, charge.reserved_credits = duration_s, cost
    charge.save()
    return ""


def _storage_violation(tenant_id: str, lim: Limits, taken: int, size_bytes: int, what: str) -> QuotaExceeded:
    return QuotaExceeded(Violation(
        tenant_id, "storage_bytes",
        f"storage quota: {taken} of {lim.storage_bytes} bytes {what}, this upload needs {size_bytes} more; "
        "delete media you no longer need", taken, lim.storage_bytes))


def check_upload(tenant_id: str, size_bytes: int) -> int:
    """Before an upload stores a byte: refuse a declared size over the tenant's upload or storage
    limit (QuotaExceeded; unfinished upload sessions' declared sizes count as stored); return the
    most bytes this upload may have (0 = no tenant limit)."""
    with connection():
        lim = limits(tenant_id)
        stored = stored_bytes(tenant_id) + pending_upload_bytes(tenant_id) if lim.storage_bytes else 0
    if lim.max_upload_bytes and size_bytes > lim.max_upload_bytes:
        raise QuotaExceeded(Violation(
            tenant_id, "max_upload_bytes",
            f"upload size quota: the file is {size_bytes} bytes, your uploads may have at most "
            f"{lim.max_upload_bytes} bytes", size_bytes, lim.max_upload_bytes))
    if lim.storage_bytes and stored + size_bytes > lim.storage_bytes:
        raise _storage_violation(tenant_id, lim, stored, size_bytes,
                                 "stored or reserved by unfinished upload sessions")
    caps = [c for c in (lim.max_upload_bytes, lim.storage_bytes and max(lim.storage_bytes - stored, 0)) if c]
    return min(caps) if caps else 0


def check_stored(tenant_id: str, size_bytes: int) -> None:
    """Inside the transaction that records an upload session's media: lock the tenant's quota row
    (completions of one tenant take turns) and refuse (QuotaExceeded) if the media stored plus
    this one are over the storage quota. Sessions created at the same moment each passed
    ``check_upload`` alone; this is where only those that still fit are kept."""
    lim = limits_of(_lock(tenant_id))
    if lim.storage_bytes:
        stored = stored_bytes(tenant_id)
        if stored + size_bytes > lim.storage_bytes:
            raise _storage_violation(tenant_id, lim, stored, size_bytes, "stored")


def debit(tenant_id: str, amount: float) -> None:
    """Take ``amount`` credits from a prepaid tenant (LLM cost as it arrives; may go below 0)."""
    if amount:
        Quota.update(credits=Quota.credits - amount, update_time=utcnow()).where(
            Quota.tenant == tenant_id, Quota.credits.is_null(False)).execute()


# ---------------------------------------------------------------- fairness


def queue_priority(job: Transcription) -> int:
    """The broker priority of the job's next message: a tenant's jobs beyond its first
    ``fair_share_jobs`` queued or running ones go lower, so a burst does not starve other tenants."""
    n = settings().fair_share_jobs
    if n <= 0:
        return job.priority
    ahead = (Transcription.select(Transcription.id)
             .where(Transcription.tenant == job.tenant_id, Transcription.state.in_(ACTIVE_STATES),
                    Transcription.id != job.id, Transcription.create_time <= job.create_time)
             .limit(n).count())
    return max(0, job.priority - FAIR_DEMOTION) if ahead >= n else job.priority


# ---------------------------------------------------------------- the operator's settings


def set_quota(tenant: str, **fields: Any) -> dict[str, Any]:
    """Set a tenant's limits (by name or id). ``None`` leaves a field; -1 resets it to the default.
    ``add_credits`` adds to the balance; ``credits=-1`` turns prepaid credits off."""
    add = fields.pop("add_credits", None)
    with connection(), database.atomic():
        row = Tenant.get_or_none(Tenant.name == tenant) or Tenant.get_or_none(Tenant.id == tenant)
        if row is None:
            raise LookupError(f"no tenant named {tenant!r} (create it with create-key --tenant {tenant})")
        quota = _lock(row.id)
        for name, value in fields.items():
            if value is not None:
                setattr(quota, name, None if value < 0 else value)
        if add:
            quota.credits = (quota.credits or 0.0) + add
        quota.update_time = utcnow()
        quota.save()
        return {"tenant": row.name, "tenant_id": row.id, **dataclasses.asdict(limits_of(quota))}
