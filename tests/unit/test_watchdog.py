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


def test_a_shielded_section_is_never_cut_and_the_stop_comes_when_it_ends() -> None:
    """An AI item's "send, store and bill this answer" finishes; the cancel found meanwhile is raised after it."""
    done = []
    with pytest.raises(Stop):
        with Watchdog(time.monotonic() + 60, lambda: Stop, 0.01, timeout=Late) as dog:
            with dog.shield():
                busy(0.3)  # many polls found the stop
                done.append("stored")
            busy(5)  # never reached
    assert done == ["stored"]


def test_a_checkpoint_inside_the_section_raises_the_stop_found_so_far() -> None:
    asked = []

    def check() -> type[BaseException] | None:
        asked.append(1)
        return Stop

    reached = []
    with pytest.raises(Stop):
        with Watchdog(time.monotonic() + 60, check, 0.05, timeout=Late) as dog:
            with dog.shield():
                dog.checkpoint()  # nothing found yet: goes on
                reached.append("first")
                busy(0.2)
                dog.checkpoint()
                reached.append("second")
    assert reached == ["first"] and dog.fired is Stop and asked


def test_a_stop_the_work_swallowed_is_raised_when_the_watch_ends() -> None:
    with pytest.raises(Stop):
        with Watchdog(time.monotonic() + 60, lambda: Stop, 0.01, timeout=Late) as dog:
            try:
                with dog.shield():
                    busy(0.1)
            except Stop:
                pass  # e.g. a library's broad except


def test_the_latest_word_counts_while_shielded_and_a_lost_lease_stays_lost() -> None:
    answers = [Stop, None]  # a cancel, then withdrawn (the client asked again)
    with Watchdog(time.monotonic() + 60, lambda: answers.pop(0) if len(answers) > 1 else answers[0], 0.01,
                  timeout=Late) as dog:
        with dog.shield():
            busy(0.2)
        busy(0.1)
    assert dog.fired is None

    class Lost(Exception):
        pass

    answers2 = [Lost, None]
    with pytest.raises(Lost):
        with Watchdog(time.monotonic() + 60, lambda: answers2.pop(0) if len(answers2) > 1 else answers2[0], 0.01,
                      timeout=Late, sticky=(Lost,)) as dog:
            with dog.shield():
                busy(0.2)


def test_the_deadline_inside_a_section_is_raised_when_it_ends() -> None:
    with pytest.raises(Late):
        with Watchdog(time.monotonic() + 0.05, lambda: None, 0.01, timeout=Late) as dog:
            with dog.shield():
                busy(0.2)
