"""HandlerLoad: saturation means every handler thread busy for a while, and clears at once."""
from __future__ import annotations

import time
from contextlib import ExitStack

from server.load import HandlerLoad


def test_saturated_only_after_every_thread_was_busy_for_the_window() -> None:
    load = HandlerLoad(capacity=3, saturated_after_s=0.05)
    with ExitStack() as calls:
        for _ in range(2):
            calls.enter_context(load.held())
        time.sleep(0.06)
        assert load.saturation() is None  # one thread free: not saturated
        calls.enter_context(load.held())
        assert load.saturation() is None  # full, but only just
        time.sleep(0.06)
        reason = load.saturation()
        assert reason is not None and "all 3 handler threads busy" in reason
    assert load.busy == 0 and load.saturation() is None


def test_a_thread_freed_in_between_restarts_the_window() -> None:
    load = HandlerLoad(capacity=1, saturated_after_s=0.05)
    with load.held():
        time.sleep(0.03)
    with load.held():
        time.sleep(0.03)
        assert load.saturation() is None
