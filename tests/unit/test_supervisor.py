"""The supervisor's outcomes: one failure policy and one lifecycle for every unit of work."""
from __future__ import annotations

import time
from typing import Any

import pytest
from dramatiq.middleware.time_limit import TimeLimitExceeded
from peewee import OperationalError

from core.jobs import LostClaim
from mp4totext.errors import WorkError
from storage.objects import StorageError
from workers.stages.diarize import DiarizationUnavailable
from workers.stages.llm import LLMConfigError, LLMDeadline, LLMOutputError
from workers.stages.media import MediaError
from workers.supervisor import Cancelled, JobFailed, JobTimeout, Outcome, Policy, supervise
from workers.watchdog import Watchdog

POLICY = Policy(what="the test work", max_attempts=3, time_limit="the test work exceeded its time limit of 5 s")


class Bug(Exception):
    pass


@pytest.mark.parametrize("exc, attempts, outcome, reason", [
    (Cancelled(), 1, Outcome.CANCELLED, "CANCELLED"),
    (LostClaim(), 1, Outcome.LOST_CLAIM, ""),
    (JobTimeout(), 1, Outcome.FINAL, "TIME_LIMIT"),
    (TimeLimitExceeded(), 1, Outcome.FINAL, "TIME_LIMIT"),
    (MediaError("no audio stream"), 1, Outcome.FINAL, "MEDIA_INVALID"),
    (DiarizationUnavailable("no pipeline"), 1, Outcome.FINAL, "UNAVAILABLE"),
    (LLMOutputError("bad JSON"), 1, Outcome.FINAL, "LLM_OUTPUT_INVALID"),
    (LLMConfigError("context too small"), 1, Outcome.FINAL, "CONTEXT_TOO_SMALL"),
    (WorkError("quota gone", reason="QUOTA", retryable=False), 1, Outcome.FINAL, "QUOTA"),
    (OperationalError("could not connect to server"), 3, Outcome.RETRY_UNCOUNTED, "outage"),
    (StorageError("S3 unreachable", transient=True), 3, Outcome.RETRY_UNCOUNTED, "outage"),
    (ConnectionResetError("reset"), 9, Outcome.RETRY_UNCOUNTED, "outage"),
    (KeyboardInterrupt(), 1, Outcome.ABORTED, ""),
    (Bug("boom"), 1, Outcome.RETRY_COUNTED, "error"),
    (Bug("boom"), 2, Outcome.RETRY_COUNTED, "error"),
    (Bug("boom"), 3, Outcome.FINAL, "ATTEMPTS_EXHAUSTED"),
    (WorkError("try again"), 1, Outcome.RETRY_COUNTED, "error"),
])
def test_the_policy_decides_each_failure(exc: BaseException, attempts: int, outcome: Outcome, reason: str) -> None:
    decision = POLICY.decide(exc, attempts)
    assert (decision.outcome, decision.reason) == (outcome, reason)


def test_messages_are_for_people() -> None:
    assert POLICY.decide(JobTimeout(), 1).message == "the test work exceeded its time limit of 5 s"
    assert POLICY.decide(MediaError("the file is empty (0 bytes)"), 1).message == "the file is empty (0 bytes)"
    assert POLICY.decide(Bug("boom"), 3).message == "the test work failed 3 times; last error: Bug: boom"
    assert POLICY.decide(Cancelled(), 1).message == "cancelled by the client"


def test_a_policy_waits_out_a_service_and_declares_more_final_errors() -> None:
    policy = Policy(what="x", max_attempts=1, time_limit="late", timeouts=(JobTimeout, LLMDeadline),
                    final=((ValueError, "BAD_VALUE"),), wait_out=lambda e: "llm_unavailable" if "503" in str(e) else None,
                    exhausted=lambda e, n: f"gave up after {n}")
    assert policy.decide(LLMDeadline(), 1).reason == "TIME_LIMIT"
    assert policy.decide(ValueError("nope"), 1).reason == "BAD_VALUE"
    assert policy.decide(Bug("HTTP 503"), 1).outcome is Outcome.RETRY_UNCOUNTED
    assert policy.decide(Bug("HTTP 400"), 1).message == "gave up after 1"
    assert policy.decide(TimeLimitExceeded(), 1).outcome is Outcome.ABORTED  # not its timeout: redelivered


class Unit:
    """A unit of work that records what the supervisor asked of it."""

    stage = "test_unit"

    def __init__(self, work: Any, attempts: int = 1, limit_s: float = 30.0, stop: Any = None,
                 gone: bool = False, dead_letter: bool = True) -> None:
        self.work, self.attempts, self.deadline = work, attempts, time.monotonic() + limit_s
        self.policy, self.stop, self._gone, self.dead_letter = POLICY, stop, gone, dead_letter
        self.calls: list[tuple[Any, ...]] = []

    def stop_reason(self) -> Any:
        return self.stop

    def run(self, dog: Watchdog) -> Any:
        return self.work(dog)

    def succeeded(self, out: Any) -> tuple[str, dict[str, Any]] | None:
        self.calls.append(("succeeded", out))
        return ("done", {"value": out}) if out is not None else None

    def cancelled(self) -> None:
        self.calls.append(("cancelled",))

    def failed(self, reason: str, message: str) -> bool:
        self.calls.append(("failed", reason, message))
        return self.dead_letter

    def release(self, error: str, counted: bool) -> None:
        self.calls.append(("release", counted))

    def gone(self) -> bool:
        return self._gone

    def retry(self, exc: BaseException) -> BaseException:
        return exc


def raising(exc: BaseException) -> Any:
    def work(_dog: Watchdog) -> Any:
        raise exc

    return work


def test_success_saves_and_a_lost_save_is_a_lost_claim() -> None:
    unit = Unit(lambda dog: 42)
    supervise(unit, 0.05)
    assert unit.calls == [("succeeded", 42)]
    unit = Unit(lambda dog: None)
    supervise(unit, 0.05)
    assert unit.calls == [("succeeded", None)]


def test_retries_release_the_row_and_raise_for_the_broker() -> None:
    unit = Unit(raising(OperationalError("server closed the connection unexpectedly")), attempts=3)
    with pytest.raises(OperationalError):
        supervise(unit, 0.05)
    assert unit.calls == [("release", False)]  # uncounted, whatever the attempts
    unit = Unit(raising(Bug("boom")), attempts=1)
    with pytest.raises(Bug):
        supervise(unit, 0.05)
    assert unit.calls == [("release", True)]


def test_final_failures_are_recorded_and_dead_lettered_or_not() -> None:
    unit = Unit(raising(MediaError("no audio stream")))
    with pytest.raises(JobFailed, match="no audio stream"):
        supervise(unit, 0.05)
    assert unit.calls == [("failed", "MEDIA_INVALID", "no audio stream")]
    unit = Unit(raising(Bug("boom")), attempts=3, dead_letter=False)  # e.g. an AI item: the row says it
    supervise(unit, 0.05)
    assert unit.calls == [("failed", "ATTEMPTS_EXHAUSTED", "the test work failed 3 times; last error: Bug: boom")]


def test_a_failure_of_deleted_work_retries_nothing() -> None:
    unit = Unit(raising(Bug("the original is gone")), gone=True)
    supervise(unit, 0.05)
    assert unit.calls == []


def test_the_watcher_stops_silent_work_on_a_cancel_and_at_the_deadline() -> None:
    def silent(_dog: Watchdog) -> None:
        time.sleep(0.01)
        while True:
            time.sleep(0.005)  # never reports progress

    unit = Unit(silent, stop=Cancelled)
    started = time.monotonic()
    supervise(unit, 0.02)
    assert unit.calls == [("cancelled",)] and time.monotonic() - started < 1.0
    unit = Unit(silent, limit_s=0.2)
    with pytest.raises(JobFailed):
        supervise(unit, 5.0)
    assert unit.calls == [("failed", "TIME_LIMIT", "the test work exceeded its time limit of 5 s")]


def test_a_failure_past_the_deadline_is_the_time_limit() -> None:
    def late(_dog: Watchdog) -> None:
        with _dog.shield():  # a request whose own timeout was cut to the deadline
            time.sleep(0.3)
            raise Bug("read timed out")

    unit = Unit(late, limit_s=0.1, dead_letter=False)
    supervise(unit, 0.02)
    assert unit.calls == [("failed", "TIME_LIMIT",
                           "the test work exceeded its time limit of 5 s; last error: Bug: read timed out")]


def test_shielded_work_finishes_its_step_before_a_cancel_stops_it() -> None:
    steps: list[int] = []

    def work(dog: Watchdog) -> None:
        for i in range(100):
            with dog.shield():  # send, store and bill
                time.sleep(0.03)
                steps.append(i)

    unit = Unit(work, stop=Cancelled)
    supervise(unit, 0.01)
    assert unit.calls == [("cancelled",)]
    assert steps == [0]  # the first step was found cancelled, finished, and nothing more started


def test_an_outage_at_the_deadline_is_still_an_outage() -> None:
    def late(_dog: Watchdog) -> None:
        with _dog.shield():
            time.sleep(0.3)
            raise OperationalError("server closed the connection unexpectedly")

    unit = Unit(late, limit_s=0.1)
    with pytest.raises(OperationalError):
        supervise(unit, 0.02)
    assert unit.calls == [("release", False)]  # retried uncounted, not failed as TIME_LIMIT
