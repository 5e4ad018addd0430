"""Errors servicers raise; the observability interceptor turns them into gRPC status codes."""
from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

MAX_MESSAGE = 1000  # statuses echo client input: keep them small (clients refuse > 16 KB of trailers)


def clip(value: object, limit: int = 80) -> str:
    """``repr`` of a client's value for an error message, shortened."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class ApiError(Exception):
    """A status for the client; ``retry_after_s`` adds a google.rpc.RetryInfo to it, ``details``
    other google.rpc messages (e.g. QuotaFailure)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None,
                 details: tuple[Any, ...] = ()) -> None:
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + f"... (message cut at {MAX_MESSAGE} characters)"
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        self.details = details

    @property
    def rich(self) -> bool:
        """Whether the status carries details (sent in ``grpc-status-details-bin``)."""
        return self.retry_after_s is not None or bool(self.details)

    def status(self) -> grpc.Status:
        """The rich status (RetryInfo when retry_after_s is set, plus ``details``) for
        ``context.abort_with_status``."""
        packed = []
        messages = list(self.details)
        if self.retry_after_s is not None or not messages:
            info = error_details_pb2.RetryInfo()
            info.retry_delay.FromNanoseconds(int((self.retry_after_s or 0) * 1e9))
            messages.insert(0, info)
        for message in messages:
            detail = any_pb2.Any()
            detail.Pack(message)
            packed.append(detail)
        return rpc_status.to_status(status_pb2.Status(code=self.code.value[0], message=self.message,
                                                      details=packed))


def invalid(msg: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, msg)


def not_found(name: str) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, f"{name} not found")


def failed_precondition(msg: str) -> ApiError:
    return ApiError(grpc.StatusCode.FAILED_PRECONDITION, msg)


def unavailable(msg: str, retry_after_s: float = 1.0) -> ApiError:
    return ApiError(grpc.StatusCode.UNAVAILABLE, msg, retry_after_s)


def exhausted(msg: str, retry_after_s: float) -> ApiError:
    return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, msg, retry_after_s)
