"""Quotas, reservations, the usage ledger and the weekly report, on SQLite in one process
(the real stack, PostgreSQL and concurrency: tests/e2e/test_quotas.py)."""
from __future__ import annotations

import datetime as dt
import pathlib
from typing import Any, Iterator

import pytest

from core import quotas, usage
from mp4totext import config
from mp4totext.contracts import JobState, MediaState
from storage import db as dbmod
from storage import schema, tenancy


@pytest.fixture()
def db(tmp_path: pathlib.Path) -> Iterator[Any]:
    database = schema.init_db(f"sqlite:///{tmp_path / 'q.db'}")
    config.reload(price_per_audio_minute=0.5, price_per_speaker_minute=0.25, fair_share_jobs=2)
    try:
        with database.connection_context():
            yield database
    finally:
        config.reload()


def _tenant(name: str = "t") -> dbmod.Tenant:
    return dbmod.Tenant.create(name=name)


def _job(tenant: dbmod.Tenant, duration: float | None = 60.0, diarize: bool = False, **fields: Any) -> Any:
    media = dbmod.Media.create(tenant=tenant, object_key="k", duration_s=duration, size_bytes=1000,
                               state=MediaState.READY if duration else MediaState.PROCESSING)
    cfg = {"diarization": {"enabled": diarize}}
    with dbmod.locked():
        reservation = quotas.admit(tenant.id, duration, cfg)
        job = dbmod.Transcription.create(tenant=tenant, media=media, config=cfg, duration_s=duration, **fields)
        quotas.reserve(job.id, tenant.id, reservation)
    return job


def _finish(job: Any, state: str, duration: float = 60.0, speakers: bool = False) -> None:
    job.state = state
    job.result = {"duration": duration, "diarization": {"state": "SUCCEEDED" if speakers else "NOT_REQUESTED"}}
    with dbmod.locked():
        usage.on_finish(job, state)
        job.save()


def test_concurrent_jobs_quota_refuses_with_the_limit_and_usage(db: Any) -> None:
    t = _tenant()
    quotas.set_quota(t.name, concurrent_jobs=2)
    _job(t), _job(t)
    with pytest.raises(quotas.QuotaExceeded) as err:
        _job(t)
    v = err.value.violation
    assert (v.limit, v.used, v.maximum, v.tenant_id) == ("concurrent_jobs", 2, 2, t.id)
    assert "2 of 2" in v.description
    assert dbmod.Transcription.select().count() == 2  # the refused one wrote nothing


def test_success_charges_actual_duration_failure_releases(db: Any) -> None:
    t = _tenant()
    quotas.set_quota(t.name, credits=10.0)
    ok, failed = _job(t, 60.0, diarize=True), _job(t, 120.0)
    assert quotas.reserved_credits(t.id) == pytest.approx(0.75 + 1.0)
    _finish(ok, JobState.SUCCEEDED, duration=30.0, speakers=True)
    _finish(failed, JobState.FAILED)
    assert quotas.reserved_credits(t.id) == 0
    assert quotas.limits(t.id).credits == pytest.approx(10.0 - (0.25 + 0.125))
    rows = usage.rows(t.id, usage.today(), usage.today())
    assert rows[0]["audio_seconds"] == 30.0 and rows[0]["speaker_seconds"] == 30.0
    assert rows[0]["transcriptions"] == 1 and rows[0]["transcription_cost"] == pytest.approx(0.375)
    assert {c.state for c in tenancy.JobCharge.select()} == {"CHARGED", "RELEASED"}


def test_credits_and_monthly_minutes_refuse_before_anything_is_written(db: Any) -> None:
    t = _tenant()
    quotas.set_quota(t.name, credits=1.0, monthly_audio_minutes=3)
    _job(t, 120.0)  # 1.0 credit reserved, 2 minutes
    with pytest.raises(quotas.QuotaExceeded) as err:
        _job(t, 30.0)  # 0.25 credits: none left
    assert err.value.violation.limit == "credits"
    quotas.set_quota(t.name, add_credits=10.0)
    with pytest.raises(quotas.QuotaExceeded) as err:
        _job(t, 90.0)  # 2 + 1.5 > 3 minutes
    v = err.value.violation
    assert v.limit == "monthly_audio_minutes" and v.maximum == 3 and v.used == pytest.approx(2.0)
    assert v.reset_time == quotas.month_bounds()[1] and v.reset_time.day == 1
    _job(t, 60.0)  # exactly at the limit is fine


def test_unknown_duration_is_reserved_when_the_media_is_ready(db: Any) -> None:
    t = _tenant()
    quotas.set_quota(t.name, monthly_audio_minutes=1)
    job = _job(t, None)
    with dbmod.locked():
        assert "monthly audio quota" in quotas.reserve_duration(job, 90.0)
        assert quotas.reserve_duration(job, 30.0) == ""
    assert quotas.month_seconds(t.id) == (0.0, 30.0)


def test_upload_quota(db: Any) -> None:
    t = _tenant()
    quotas.set_quota(t.name, max_upload_bytes=5000, storage_bytes=1500)
    dbmod.Media.create(tenant=t, object_key="k", size_bytes=1000)
    with pytest.raises(quotas.QuotaExceeded, match="upload size quota"):
        quotas.check_upload(t.id, 6000)
    with pytest.raises(quotas.QuotaExceeded, match="storage quota"):
        quotas.check_upload(t.id, 600)
    assert quotas.check_upload(t.id, 0) == 500  # undeclared size: the reader stops at what is left


def test_unfinished_upload_sessions_count_against_the_storage_quota(db: Any) -> None:
    """Parallel upload sessions: each one's declared size is reserved while it is ACTIVE, so a
    second one that would not fit beside the first is refused before a byte is sent."""
    t = _tenant()
    quotas.set_quota(t.name, storage_bytes=1500)
    dbmod.Media.create(tenant=t, object_key="k", size_bytes=500)
    now = dbmod.utcnow()

    def session(size: int, state: str = "ACTIVE", expire: dt.timedelta = dt.timedelta(hours=1)) -> Any:
        return tenancy.UploadSession.create(tenant=t, size_bytes=size, sha256="0" * 64, part_size=size,
                                            media_id=dbmod.new_id(), object_key="o", upload_id="u", state=state,
                                            expire_time=now + expire)

    session(600)
    assert quotas.check_upload(t.id, 400) == 400
    with pytest.raises(quotas.QuotaExceeded) as err:
        quotas.check_upload(t.id, 401)
    v = err.value.violation
    assert (v.limit, v.used) == ("storage_bytes", 1100) and "unfinished upload sessions" in v.description
    session(5000, state="FAILED"), session(5000, expire=-dt.timedelta(seconds=1))  # neither reserves
    assert quotas.check_upload(t.id, 400) == 400


def test_fair_share_demotes_a_tenants_burst_only(db: Any) -> None:
    a, b = _tenant("a"), _tenant("b")
    burst = [_job(a, priority=5) for _ in range(4)]
    other = _job(b, priority=5)
    assert [quotas.queue_priority(j) for j in burst] == [5, 5, 1, 1]
    assert quotas.queue_priority(other) == 5
    urgent = _job(a, priority=10)
    assert quotas.queue_priority(urgent) == 6  # still above the tenant's own demoted NORMAL jobs


def test_weekly_report_once_per_iso_week(db: Any) -> None:
    t = _tenant()
    now = dt.datetime(2026, 11, 25, 12)  # a Wednesday: last week is 2026-W47, Nov 16-22
    week, start, end = usage.last_week(now)
    assert (week, start, end) == ("2026-W47", dt.date(2026, 11, 16), dt.date(2026, 11, 22))
    t.create_time = dt.datetime(2026, 11, 1)
    t.save()
    tenancy.UsageDaily.create(tenant=t, owner="u1", day=dt.date(2026, 11, 17), audio_seconds=42.0, transcriptions=2)
    tenancy.UsageDaily.create(tenant=t, owner="", day=dt.date(2026, 11, 23), audio_seconds=5.0)  # next week
    assert usage.tenants_due(week, end) == [t.id]
    assert usage.weekly_report(t.id, now) is True
    assert usage.weekly_report(t.id, now) is False
    report = tenancy.UsageReport.get().report
    assert report["totals"]["audio_seconds"] == 42.0 and report["users"]["u1"]["transcriptions"] == 2
    assert usage.tenants_due(week, end) == []


def test_ai_items_need_credits_left_when_the_llm_is_priced(db: Any) -> None:
    t = _tenant()
    quotas.check_ai(t.id)  # no prepaid credits: nothing to check
    quotas.set_quota(t.name, credits=0.5)
    quotas.check_ai(t.id)  # the LLM is free here
    config.reload(llm_price_prompt_per_1k=0.01, price_per_audio_minute=0.5)
    try:
        _job(t, 60.0)  # 0.5 credits reserved: none left
        with pytest.raises(quotas.QuotaExceeded, match="no credits left for AI items"):
            quotas.check_ai(t.id)
    finally:
        config.reload(price_per_audio_minute=0.5, price_per_speaker_minute=0.25)
