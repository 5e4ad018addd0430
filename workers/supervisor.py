"""The one lifecycle of every unit of work a worker runs: a job stage, a media preparation, an AI
item, a webhook delivery.

A unit (``Unit``) has claimed its row already (core.leases); ``supervise`` runs it under one
watcher (workers.watchdog: deadline, cancel, lost lease; shielded sections for work that must
not be cut), classifies a failure with the unit's declarative ``Policy``, applies the outcome
through the unit's own callbacks, and records metrics and the canonical log line
(``stage_finished``). Every kind of work so inherits deadlines, outage handling, metrics and the
log line.

The outcomes of a failure, in the order they are decided (``Policy.decide``):
- CANCELLED: the client cancelled it while it ran;
- LOST_CLAIM: deleted, cancelled or taken over while it ran: nothing more to do;
- FINAL(TIME_LIMIT): over its time limit (a failure past the deadline counts as one);
- FINAL(reason): an error that says retrying cannot help (``WorkError.retryable`` False, or one
  of the policy's ``final`` classes);
- RETRY_UNCOUNTED: an outage of our own infrastructure (core.failures), or a service the policy
  waits out (the LLM server down): released without counting the attempt, retried with backoff;
- ABORTED: the process is stopping (Dramatiq's shutdown): the message is redelivered as it is;
- RETRY_COUNTED: anything else while attempts are left; then FINAL(ATTEMPTS_EXHAUSTED).
"""
from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any, Callable

import structlog
from dramatiq.middleware.time_limit import TimeLimitExceeded

from core.failures import is_infrastructure
from core.jobs import LostClaim
from observability import metrics, tracing
from storage.db import drop_broken_connection
from workers.watchdog import Watchdog

log = structlog.get_logger(__name__)


class JobFailed(Exception):
    """Permanent failure already recorded on the row: not retried, message dead-lettered."""


class Cancelled(Exception):
    """The client cancelled the work while it ran."""


class JobTimeout(Exception):
    """The work ran past its deadline."""


class Outcome(str, enum.Enum):
    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"
    LOST_CLAIM = "lost_claim"
    FINAL = "final"
    RETRY_UNCOUNTED = "retry_uncounted"
    RETRY_COUNTED = "retry_counted"
    ABORTED = "aborted"


@dataclasses.dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str = ""  # FINAL: the error_reason recorded; a retry: the log line's outcome ("outage", "error")
    message: str = ""


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclasses.dataclass(frozen=True)
class Policy:
    """How a unit's failures end (see the module's docstring for the order)."""

    what: str  # for people: "transcription", "the AI item"
    max_attempts: int
    time_limit: str  # the TIME_LIMIT message: "transcription exceeded the time limit of 600 s"
    timeouts: tuple[type[BaseException], ...] = (JobTimeout, TimeLimitExceeded)
    final: tuple[tuple[type[BaseException], str], ...] = ()  # more errors retrying cannot fix -> reason
    wait_out: Callable[[BaseException], str | None] = lambda _exc: None  # a service to wait out -> log outcome
    exhausted: Callable[[BaseException, int], str] | None = None  # the ATTEMPTS_EXHAUSTED message

    def decide(self, exc: BaseException, attempts: int) -> Decision:
        if isinstance(exc, Cancelled):
            return Decision(Outcome.CANCELLED, "CANCELLED", "cancelled by the client")
        if isinstance(exc, LostClaim):
            return Decision(Outcome.LOST_CLAIM)
        error = describe(exc)
        if isinstance(exc, self.timeouts):
            return Decision(Outcome.FINAL, "TIME_LIMIT", self.time_limit + (f"; {exc}" if str(exc) else ""))
        if getattr(exc, "retryable", True) is False:
            return Decision(Outcome.FINAL, getattr(exc, "reason", "FAILED"), str(exc))
        for cls, reason in self.final:
            if isinstance(exc, cls):
                return Decision(Outcome.FINAL, reason, str(exc))
        if is_infrastructure(exc):
            return Decision(Outcome.RETRY_UNCOUNTED, "outage", error)
        if not isinstance(exc, Exception):
            return Decision(Outcome.ABORTED)
        waiting = self.wait_out(exc)
        if waiting:
            return Decision(Outcome.RETRY_UNCOUNTED, waiting, error)
        if attempts < self.max_attempts:
            return Decision(Outcome.RETRY_COUNTED, "error", error)
        message = (self.exhausted(exc, attempts) if self.exhausted is not None
                   else f"{self.what} failed {attempts} times; last error: {error}")
        return Decision(Outcome.FINAL, "ATTEMPTS_EXHAUSTED", message)


class Unit:
    """One claimed unit of work, as the supervisor runs it. Its callbacks write its own row; the
    defaults here are what a unit without that concern does (nothing cancels it, nothing to give
    back, never deleted under it, Dramatiq retries the error itself)."""

    stage: str  # the metrics label and the log line's stage
    attempts: int  # counted by its claim
    deadline: float  # time.monotonic() by which it must end
    policy: Policy

    def stop_reason(self) -> type[BaseException] | None:  # on the watcher thread (may renew the lease)
        return None

    def run(self, dog: Watchdog) -> Any:  # the work itself
        raise NotImplementedError

    def succeeded(self, out: Any) -> tuple[str, dict[str, Any]] | None:  # save; (outcome, log); None: lost
        raise NotImplementedError

    def failed(self, reason: str, message: str) -> bool:  # record it; True: dead-letter the message
        raise NotImplementedError

    def cancelled(self) -> None:
        pass

    def release(self, error: str, counted: bool) -> None:  # give the row back for the retry
        pass

    def gone(self) -> bool:  # deleted meanwhile (nothing to retry; it removes what the run wrote)
        return False

    def retry(self, exc: BaseException) -> BaseException:  # what to raise for Dramatiq's retry
        return exc


def finished(stage: str, outcome: str, started: float, level: str = "info", **fields: Any) -> None:
    """Metrics and the canonical log line of one run of a unit."""
    elapsed = time.monotonic() - started
    metrics.STAGE_DURATION.labels(stage, outcome).observe(elapsed)
    getattr(log, level)("stage_finished", outcome=outcome, duration_s=round(elapsed, 3), **fields)


def supervise(unit: Unit, poll_s: float) -> None:
    """Run ``unit`` to one of the outcomes; raise what Dramatiq must see (a retry, a dead letter)."""
    started = time.monotonic()
    try:
        with Watchdog(unit.deadline, unit.stop_reason, poll_s, timeout=JobTimeout, sticky=(LostClaim,)) as dog:
            out = unit.run(dog)
    except BaseException as exc:  # noqa: BLE001 - classified by the policy; what Dramatiq must see is re-raised
        _failed(unit, exc, started)
        return
    done = unit.succeeded(out)
    if done is None:
        finished(unit.stage, "lost_claim", started)
        return
    outcome, fields = done
    finished(unit.stage, outcome, started, **fields)


def _failed(unit: Unit, exc: BaseException, started: float) -> None:
    if (isinstance(exc, Exception) and time.monotonic() >= unit.deadline and not is_infrastructure(exc)
            and not isinstance(exc, (Cancelled, LostClaim, *unit.policy.timeouts))):
        # whatever the last step did (a request's timeout is cut to the deadline), the time is up
        exc = JobTimeout(f"last error: {describe(exc)}")
    decision = unit.policy.decide(exc, unit.attempts)
    outcome = decision.outcome
    if outcome is Outcome.ABORTED:
        raise exc
    if outcome is Outcome.CANCELLED:
        unit.cancelled()
        finished(unit.stage, "cancelled", started)
        return
    if outcome is Outcome.LOST_CLAIM:
        finished(unit.stage, "deleted" if unit.gone() else "lost_claim", started)  # gone() cleans up after itself
        return
    retry = outcome in (Outcome.RETRY_UNCOUNTED, Outcome.RETRY_COUNTED)
    if (retry or decision.reason == "ATTEMPTS_EXHAUSTED") and unit.gone():
        finished(unit.stage, "deleted", started, error=decision.message)
        return
    if retry:
        if is_infrastructure(exc):
            drop_broken_connection()
        unit.release(decision.message, counted=outcome is Outcome.RETRY_COUNTED)
        finished(unit.stage, decision.reason, started, level="warning", error=decision.message, retrying=True)
        raise unit.retry(exc)
    tracing.set_attributes(**{"mp4t.error": decision.message})
    dead_letter = unit.failed(decision.reason, decision.message)
    finished(unit.stage, decision.reason.lower(), started, level="warning", error=decision.message)
    if dead_letter:
        raise JobFailed(decision.message) from exc
