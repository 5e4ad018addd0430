"""The stage watchdog stops Python code that never reports progress, and leaves nothing pending."""
from __future__ import annotations

import time

import pytest

from workers.watchdog import Watchdog


class Stop(Exception):
    pass


class Late(Exception):
    pass


def busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # a model window after another, never reporting
        time.sleep(0.005)


def test_a_stop_reason_interrupts_the_stage_within_a_poll() -> None:
    asked = []

    def check() -> type[BaseException] | None:
        asked.append(time.monotonic())
        return Stop if len(asked) >= 3 else None

    started = time.monotonic()
    with pytest.raises(Stop):
        with Watchdog(time.monotonic() + 60, check, 0.05, timeout=Late):
            busy(10)
    assert time.monotonic() - started < 1.0


def test_the_deadline_interrupts_with_the_timeout_exception() -> None:
    started = time.monotonic()
    with pytest.raises(Late):
        with Watchdog(time.monotonic() + 0.2, lambda: None, 5.0, timeout=Late):
            busy(10)
    assert 0.2 <= time.monotonic() - started < 1.0


def test_a_stage_that_ends_in_time_is_left_alone_and_nothing_fires_later() -> None:
    with Watchdog(time.monotonic() + 0.3, lambda: None, 0.02, timeout=Late) as dog:
        busy(0.05)
    busy(0.5)  # past the deadline: the watchdog has stopped
    assert dog.fired is None


def test_a_failing_check_is_ignored() -> None:
    def check() -> None:
        raise ConnectionError("database unreachable")

    with Watchdog(time.monotonic() + 60, check, 0.01, timeout=Late):
        busy(0.1)
