"""The one table from core's refusals to the client's gRPC status, applied by the observability
interceptor to whatever a handler raises: handlers raise core's errors as they come.

Add a domain error here (its class and the status it stands for); a handler needs a try only
where the status depends on the call (e.g. NOT_FOUND with the resource's name).
"""
from __future__ import annotations

from typing import Any, Callable

import grpc
import peewee as pw
import structlog
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from core import enhancements, live, quotas
from core import upload_sessions as sessions
from core.failures import is_infrastructure
from observability import metrics
from server.auth import tenant_gone
from server.errors import ApiError, failed_precondition, invalid, unavailable

log = structlog.get_logger(__name__)


def _num(value: float) -> str:
    """6291456 -> "6291456", 12.5 -> "12.5" (never exponent notation in a message a person reads)."""
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}".rstrip("0").rstrip(".")


def quota_error(v: quotas.Violation) -> ApiError:
    """RESOURCE_EXHAUSTED for an over-quota request, with QuotaFailure + ErrorInfo details."""
    reset = f"; resets {v.reset_time.isoformat()}Z" if v.reset_time else ""
    failure = error_details_pb2.QuotaFailure(violations=[error_details_pb2.QuotaFailure.Violation(
        subject=f"tenant:{v.tenant_id}", description=v.description, quota_metric=f"mp4totext/{v.limit}",
        quota_id=v.limit, quota_value=int(v.maximum))])
    metadata = {"limit": v.limit, "used": _num(v.used), "maximum": _num(v.maximum)}
    if v.reset_time:
        metadata["reset_time"] = v.reset_time.isoformat() + "Z"
    info = error_details_pb2.ErrorInfo(reason="QUOTA_EXCEEDED", domain="mp4totext", metadata=metadata)
    used = f"used {_num(v.used)}, limit {_num(v.maximum)}{reset}"
    return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"quota exceeded ({v.limit}): {v.description} [{used}]",
                    v.retry_after_s, details=(failure, info))


class WrongOffsetError(ApiError):
    """FAILED_PRECONDITION with a google.rpc.ErrorInfo (reason WRONG_WRITE_OFFSET) that carries the
    committed size, so a client resumes without parsing the message."""

    def __init__(self, message: str, committed: int) -> None:
        super().__init__(grpc.StatusCode.FAILED_PRECONDITION, message, retry_after_s=0.0)
        self.committed = committed

    def status(self) -> grpc.Status:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.ErrorInfo(reason="WRONG_WRITE_OFFSET", domain="mp4totext.v1",
                                                metadata={"committed_size": str(self.committed)}))
        return rpc_status.to_status(status_pb2.Status(code=self.code.value[0], message=self.message,
                                                      details=[detail]))


def _rejected(exc: sessions.Rejected) -> ApiError:
    metrics.UPLOADS.labels("rejected").inc()
    return invalid(str(exc))


# Most specific first: the first class ``exc`` is an instance of decides.
DOMAIN_ERRORS: list[tuple[type[BaseException], Callable[[Any], ApiError]]] = [
    (quotas.QuotaExceeded, lambda exc: quota_error(exc.violation)),
    (live.RequestIdTaken, lambda exc: ApiError(grpc.StatusCode.ALREADY_EXISTS, str(exc))),
    (sessions.WrongOffset, lambda exc: WrongOffsetError(str(exc), exc.committed)),
    (sessions.Rejected, _rejected),
    (sessions.Superseded, lambda exc: ApiError(grpc.StatusCode.ABORTED, str(exc))),
    (sessions.SessionError, lambda exc: failed_precondition(str(exc))),
    (enhancements.NotAllowed, lambda exc: failed_precondition(str(exc))),
]


def domain_status(exc: BaseException) -> ApiError | None:
    """The status a core refusal stands for; None when ``exc`` is not one."""
    for kind, to_status in DOMAIN_ERRORS:
        if isinstance(exc, kind):
            return to_status(exc)
    return None


def status_for(exc: BaseException) -> ApiError:
    """The status for anything a handler raised that is not an ApiError: a core refusal (the
    table), a row gone while the call ran, an unreachable dependency (UNAVAILABLE: retry), else
    INTERNAL (logged with its traceback)."""
    mapped = domain_status(exc)
    if mapped is not None:
        return mapped
    if isinstance(exc, (pw.IntegrityError, pw.DoesNotExist)) and tenant_gone():
        return ApiError(grpc.StatusCode.UNAUTHENTICATED, "the tenant of this API key no longer exists")
    if isinstance(exc, pw.DoesNotExist):  # deleted while the call ran
        return ApiError(grpc.StatusCode.NOT_FOUND, "the resource was deleted while this call ran")
    if is_infrastructure(exc):  # a dependency failed, not the request: the client retries
        log.warning("rpc_dependency_unavailable", error=f"{type(exc).__name__}: {exc}")
        return unavailable(f"a service this call needs is unreachable ({type(exc).__name__}); retry shortly")
    log.error("rpc_internal_error", exc_info=exc)
    return ApiError(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); it has been logged")
