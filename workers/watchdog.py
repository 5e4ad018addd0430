"""Hold running work to its time limit, to the client's cancel and to its lease, whatever it does.

A stage's own progress callback only runs when the model emits something: six minutes of noise
with VAD off emitted nothing for over a minute, and Dramatiq's time-limit watchdog only runs
under its in-memory broker. This watchdog is a thread beside the work: every ``poll_s`` it checks
the deadline and the work's row (cancel requested, lease lost; the check may renew the lease) and,
when the work must stop, raises the matching exception inside the work's thread (as Dramatiq's
TimeLimit does), which happens at the next Python bytecode it runs: within one model window.

Work that must not be cut in the middle runs in a shielded section (``with dog.shield():``, e.g.
"send this request, store and bill its answer": an answer that arrives was paid for and is
recorded, a concurrency slot is always given back). Inside it nothing is raised from outside: the
reason waits (the latest word of the check: a cancel withdrawn meanwhile no longer stops it) and
is raised when the section ends, or at a ``checkpoint()`` the section calls between its own steps.
It is armed only while the work's own code runs, and a pending exception is never left behind.
"""
from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from typing import Callable, Iterator

import structlog

log = structlog.get_logger(__name__)


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exc) if exc is not None else None)


class Watchdog:
    """``with Watchdog(deadline, check, poll_s, timeout=JobTimeout) as dog: run()``.

    ``check()`` returns the exception class to stop the work with (cancelled, claim lost), or
    None; it runs on the watchdog thread (its own database connection); its errors are logged
    and ignored (the work meets an outage itself).
    """

    def __init__(self, deadline: float, check: Callable[[], type[BaseException] | None], poll_s: float,
                 timeout: type[BaseException], sticky: tuple[type[BaseException], ...] = ()) -> None:
        self.deadline, self.check, self.poll_s, self.timeout = deadline, check, poll_s, timeout
        self.sticky = sticky  # reasons a later check cannot take back (a lost lease stays lost)
        self.fired: type[BaseException] | None = None
        self._pending: type[BaseException] | None = None  # found while shielded
        self._shielded = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._target = threading.get_ident()
        self._thread = threading.Thread(target=self._watch, name="stage-watchdog", daemon=True)

    def __enter__(self) -> "Watchdog":
        self._thread.start()
        return self

    def _reason(self) -> type[BaseException] | None:
        if time.monotonic() >= self.deadline:
            return self.timeout
        try:
            return self.check()
        except Exception as exc:  # noqa: BLE001
            log.warning("watchdog_check_failed", error=f"{type(exc).__name__}: {exc}")
            return self._pending  # nothing new learnt

    def _wait_s(self) -> float:
        if self._pending is not None:  # found already, held by a shielded section: no hurry
            return self.poll_s
        return min(self.poll_s, max(0.0, self.deadline - time.monotonic()))

    def _watch(self) -> None:
        while not self._stop.wait(self._wait_s()):
            reason = self._reason()
            with self._lock:
                if self._stop.is_set() or self.fired is not None:
                    return
                if self._shielded:  # held until the section ends; the latest word counts
                    if not (self._pending is not None and issubclass(self._pending, self.sticky)):
                        self._pending = reason
                    continue
                reason = self._pending or reason
                if reason is not None:
                    self.fired = reason
                    _raise_in(self._target, reason)
                    return

    @contextlib.contextmanager
    def shield(self) -> Iterator[None]:
        """Run the body with nothing raised into it from outside; a stop found meanwhile is raised
        when it ends (unless the body raised already)."""
        with self._lock:
            self._shielded += 1
        try:
            yield
        finally:
            with self._lock:
                self._shielded -= 1
        self.checkpoint()

    def checkpoint(self) -> None:
        """Raise, here and now, a stop that was found while shielded, or the timeout past the deadline."""
        with self._lock:
            reason = self._pending
            if reason is None and time.monotonic() >= self.deadline:
                reason = self.timeout
            if reason is None or self.fired is not None:
                return
            self.fired, self._pending = reason, None
        raise reason()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        with self._lock:
            self._stop.set()
            fired = self.fired
        if fired is not None and not (exc_type is not None and issubclass(exc_type, fired)):
            _raise_in(self._target, None)  # not delivered yet: clear it and raise it here instead
            raise fired()
