"""mp4totext.v1.UsageService: a tenant's (or end user's) usage per day, and its quotas.

An over-quota request's status (RESOURCE_EXHAUSTED with QuotaFailure + ErrorInfo): server/status_map.py.
"""
from __future__ import annotations

import datetime as dt

import grpc
from google.protobuf import timestamp_pb2

from core import quotas, usage
from mp4totext.v1 import usage_pb2, usage_pb2_grpc
from server.auth import current_tenant, current_user
from server.errors import ApiError, invalid

MAX_DAYS = 400  # one request covers at most this many days


def _day(text: str, field: str, default: dt.date) -> dt.date:
    if not text:
        return default
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise invalid(f"{field}={text[:40]!r} is not a day; use YYYY-MM-DD (UTC)") from None


def _record(r: dict) -> usage_pb2.UsageRecord:
    return usage_pb2.UsageRecord(
        day=r["day"], user_id=r["user_id"], audio_seconds=r["audio_seconds"], speaker_seconds=r["speaker_seconds"],
        transcriptions=int(r["transcriptions"]), upload_bytes=int(r["upload_bytes"]),
        llm_prompt_tokens=int(r["llm_prompt_tokens"]), llm_completion_tokens=int(r["llm_completion_tokens"]),
        llm_cost=r["llm_cost"], transcription_cost=r["transcription_cost"])


def _quota(q: dict) -> usage_pb2.QuotaStatus:
    out = usage_pb2.QuotaStatus(name=q["name"], limit=q["limit"], used=q["used"], remaining=q["remaining"],
                                unlimited=q["unlimited"])
    if q["reset_time"] is not None:
        out.reset_time.CopyFrom(timestamp_pb2.Timestamp(seconds=int(
            q["reset_time"].replace(tzinfo=dt.timezone.utc).timestamp())))
    return out


class UsageService(usage_pb2_grpc.UsageServiceServicer):
    def GetUsage(self, request: usage_pb2.GetUsageRequest, context: grpc.ServicerContext):
        tenant, caller = current_tenant.get(), current_user.get("")
        if caller and request.user_id and request.user_id != caller:
            raise ApiError(grpc.StatusCode.PERMISSION_DENIED,
                           "an end-user token sees only its own usage: leave user_id empty (or your own id); the "
                           "usage of other users needs the tenant's API key")
        today = usage.today()
        start = _day(request.start_day, "start_day", today.replace(day=1))
        end = _day(request.end_day, "end_day", today)
        if end < start:
            raise invalid(f"end_day {end} is before start_day {start}")
        if (end - start).days >= MAX_DAYS:
            raise invalid(f"at most {MAX_DAYS} days per request; ask for a shorter range")
        user = caller or request.user_id or None
        records = usage.rows(tenant, start, end, user=user, per_user=request.per_user)
        quotas_now, lim = usage.quota_status(tenant)
        stored = quotas.stored_bytes(tenant, user)
        return usage_pb2.GetUsageResponse(
            records=[_record(r) for r in records], totals=_record(usage.totals(records)),
            quotas=[_quota(q) for q in quotas_now] if not caller else [],
            credits_enabled=lim.credits is not None and not caller,
            credits_balance=(lim.credits or 0.0) if not caller else 0.0,
            storage_bytes=stored, start_day=str(start), end_day=str(end))
