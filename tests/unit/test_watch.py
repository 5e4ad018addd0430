"""The Watch loop, driven through the in-process progress bus and a row the test controls."""
from __future__ import annotations

import threading
from typing import Any

import grpc
import pytest

from mp4totext.contracts import DeletedEvent, ProgressEvent
from mp4totext.events import LocalBus
from server.errors import ApiError
from server.watch import watch_events

JOB = "j" * 32


def event(seq: int, state: str = "RUNNING", stage: str = "TRANSCRIBING", progress: float = 10.0) -> ProgressEvent:
    return ProgressEvent(id=JOB, sequence=seq, state=state, stage=stage, progress=progress)


class Job:
    """The database row as the loop reads it."""

    def __init__(self, ev: ProgressEvent | None) -> None:
        self.ev = ev
        self.reads = 0

    def read(self, job_id: str) -> ProgressEvent | None:
        assert job_id == JOB
        self.reads += 1
        return self.ev


def watch(bus: LocalBus, job: Job, after: int = 0, active: Any = lambda: True, heartbeat_s: float = 0.05) -> Any:
    return watch_events(JOB, after, subscribe=bus.subscribe, read=job.read, is_active=active, heartbeat_s=heartbeat_s)


def test_sends_current_state_then_live_events_and_ends_after_the_terminal_one() -> None:
    bus, job = LocalBus(), Job(event(2))
    stream = watch(bus, job)
    assert next(stream).sequence == 2
    for seq in (3, 2, 4):  # an old event (2) is not sent again
        bus.publish(event(seq).model_dump(mode="json"))
    done = event(5, "SUCCEEDED", "DONE", 100.0)
    bus.publish(done.model_dump(mode="json"))
    rest = list(stream)
    assert [e.sequence for e in rest] == [3, 4, 5] and rest[-1].terminal and not any(e.heartbeat for e in rest)


def test_quiet_job_gets_heartbeats_with_the_last_sequence_and_re_reads_the_row() -> None:
    bus, job = LocalBus(), Job(event(7))
    stream = watch(bus, job)
    assert next(stream).sequence == 7
    beats = [next(stream) for _ in range(3)]
    assert all(b.heartbeat and b.sequence == 7 for b in beats)
    assert job.reads >= 4
    job.ev = event(9, "FAILED", "DONE")  # the bus lost the events: the re-read finds the end
    assert [e.sequence for e in stream] == [9]


def test_resuming_after_the_last_event_of_a_finished_job_ends_at_once() -> None:
    bus, job = LocalBus(), Job(event(12, "SUCCEEDED", "DONE", 100.0))
    assert list(watch(bus, job, after=12)) == []
    assert [e.sequence for e in watch(bus, job, after=11)] == [12]


def test_deleted_job_ends_with_not_found() -> None:
    bus, job = LocalBus(), Job(event(1))
    stream = watch(bus, job)
    next(stream)
    bus.publish(DeletedEvent(id=JOB, sequence=2).model_dump(mode="json"))
    with pytest.raises(ApiError) as err:
        list(stream)
    assert err.value.code == grpc.StatusCode.NOT_FOUND and "deleted" in err.value.message


def test_client_gone_ends_the_stream_and_unsubscribes() -> None:
    bus, job = LocalBus(), Job(event(1))
    gone = threading.Event()
    stream = watch(bus, job, active=lambda: not gone.is_set())
    next(stream)
    gone.set()
    assert list(stream) == []
    assert not bus.hub._subs  # noqa: SLF001 - the subscription was closed
