"""Hold a running stage to its time limit and to the client's cancel, whatever the audio.

The stage's own progress callback only runs when the model emits something: six minutes of
noise with VAD off emitted nothing for over a minute, and Dramatiq's time-limit watchdog only
runs under its in-memory broker. This watchdog is a thread beside the stage: every
``poll_s`` it checks the deadline and the job's row (cancel requested, deleted) and, when the
stage must stop, raises the matching exception inside the stage's thread (as Dramatiq's
TimeLimit does), which happens at the next Python bytecode the stage runs: within one model
window (seconds). It is armed only while the stage's own code runs, and a pending exception
is never left behind for the code after it.
"""
from __future__ import annotations

import ctypes
import threading
import time
from typing import Callable

import structlog

log = structlog.get_logger(__name__)


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exc) if exc is not None else None)


class Watchdog:
    """``with Watchdog(deadline, check, poll_s, timeout=JobTimeout): run()``.

    ``check()`` returns the exception class to stop the stage with (cancelled, claim lost), or
    None; it runs on the watchdog thread (its own database connection); its errors are logged
    and ignored (the stage meets an outage itself).
    """

    def __init__(self, deadline: float, check: Callable[[], type[BaseException] | None], poll_s: float,
                 timeout: type[BaseException]) -> None:
        self.deadline, self.check, self.poll_s, self.timeout = deadline, check, poll_s, timeout
        self.fired: type[BaseException] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._target = threading.get_ident()
        self._thread = threading.Thread(target=self._watch, name="stage-watchdog", daemon=True)

    def __enter__(self) -> "Watchdog":
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(min(self.poll_s, max(0.0, self.deadline - time.monotonic()))):
            reason: type[BaseException] | None = self.timeout if time.monotonic() >= self.deadline else None
            if reason is None:
                try:
                    reason = self.check()
                except Exception as exc:  # noqa: BLE001
                    log.warning("watchdog_check_failed", error=f"{type(exc).__name__}: {exc}")
            if reason is not None:
                with self._lock:
                    if self._stop.is_set():
                        return
                    self.fired = reason
                    _raise_in(self._target, reason)
                return

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        with self._lock:
            self._stop.set()
            fired = self.fired
        if fired is not None and not (exc_type is not None and issubclass(exc_type, fired)):
            _raise_in(self._target, None)  # not delivered yet: clear it and raise it here instead
            raise fired()
