"""The error type that carries its own failure policy (no dependencies: pure stages raise it)."""
from __future__ import annotations


class WorkError(Exception):
    """An error that says what it means for the work (workers.supervisor's failure policy):
    ``reason`` is the machine-readable error_reason recorded when the work fails for good, and
    ``retryable`` False makes the failure final at once (bad input, a misconfigured worker), as
    Temporal's ApplicationError(non_retryable=True). The message is written for a person."""

    reason = "FAILED"
    retryable = True

    def __init__(self, message: str = "", *, reason: str | None = None, retryable: bool | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        if retryable is not None:
            self.retryable = retryable
