"""Errors servicers raise; the observability interceptor turns them into gRPC status codes."""
from __future__ import annotations

import grpc


class ApiError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(msg: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, msg)


def not_found(name: str) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, f"{name} not found")


def failed_precondition(msg: str) -> ApiError:
    return ApiError(grpc.StatusCode.FAILED_PRECONDITION, msg)


def unavailable(msg: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAVAILABLE, msg)
