"""The Watch loop, driven through the in-process progress bus and a row the test controls."""
from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from mp4totext.contracts import DeletedEvent, ProgressEvent
from mp4totext.events import LocalBus
from server.errors import ApiError
from server.watch import BatchReader, watch_events

JOB = "j" * 32


def event(seq: int, state: str = "RUNNING", stage: str = "TRANSCRIBING", progress: float = 10.0) -> ProgressEvent:
    return ProgressEvent(id=JOB, sequence=seq, state=state, stage=stage, progress=progress)


class Job:
    """The database row as the loop reads it."""

    def __init__(self, ev: ProgressEvent | None) -> None:
        self.ev = ev
        self.reads = 0

    async def read(self, job_id: str) -> ProgressEvent | None:
        assert job_id == JOB
        self.reads += 1
        return self.ev


def watch(bus: LocalBus, job: Job, after: int = 0, heartbeat_s: float = 0.05) -> Any:
    loop = asyncio.get_running_loop()
    return watch_events(JOB, after, subscribe=lambda j: bus.subscribe(j, loop), read=job.read,
                        heartbeat_s=heartbeat_s)


async def collect(stream: Any) -> list[ProgressEvent]:
    return [ev async for ev in stream]


def test_sends_current_state_then_live_events_and_ends_after_the_terminal_one() -> None:
    async def scenario() -> list[ProgressEvent]:
        bus, job = LocalBus(), Job(event(2))
        stream = watch(bus, job)
        assert (await anext(stream)).sequence == 2
        for seq in (3, 2, 4):  # an old event (2) is not sent again
            bus.publish(event(seq).model_dump(mode="json"))
        bus.publish(event(5, "SUCCEEDED", "DONE", 100.0).model_dump(mode="json"))
        return await collect(stream)

    rest = asyncio.run(scenario())
    assert [e.sequence for e in rest] == [3, 4, 5] and rest[-1].terminal and not any(e.heartbeat for e in rest)


def test_quiet_job_gets_heartbeats_with_the_last_sequence_and_re_reads_the_row() -> None:
    async def scenario() -> None:
        bus, job = LocalBus(), Job(event(7))
        stream = watch(bus, job)
        assert (await anext(stream)).sequence == 7
        beats = [await anext(stream) for _ in range(3)]
        assert all(b.heartbeat and b.sequence == 7 for b in beats)
        assert job.reads >= 4
        job.ev = event(9, "FAILED", "DONE")  # the bus lost the events: the re-read finds the end
        assert [e.sequence for e in await collect(stream)] == [9]

    asyncio.run(scenario())


def test_resuming_after_the_last_event_of_a_finished_job_ends_at_once() -> None:
    async def scenario() -> None:
        bus, job = LocalBus(), Job(event(12, "SUCCEEDED", "DONE", 100.0))
        assert await collect(watch(bus, job, after=12)) == []
        assert [e.sequence for e in await collect(watch(bus, job, after=11))] == [12]

    asyncio.run(scenario())


def test_deleted_job_ends_with_not_found() -> None:
    async def scenario() -> None:
        bus, job = LocalBus(), Job(event(1))
        stream = watch(bus, job)
        await anext(stream)
        bus.publish(DeletedEvent(id=JOB, sequence=2).model_dump(mode="json"))
        await collect(stream)

    with pytest.raises(ApiError) as err:
        asyncio.run(scenario())
    assert err.value.code == grpc.StatusCode.NOT_FOUND and "deleted" in err.value.message


def test_client_gone_cancels_the_coroutine_and_unsubscribes() -> None:
    bus, job = LocalBus(), Job(event(1))

    async def scenario() -> None:
        stream = watch(bus, job, heartbeat_s=30)
        await anext(stream)
        task = asyncio.ensure_future(anext(stream))  # waits on the bus
        await asyncio.sleep(0.01)
        task.cancel()  # what grpc.aio does when the client goes away
        with pytest.raises(asyncio.CancelledError):
            await task
        await stream.aclose()

    asyncio.run(scenario())
    assert not bus.hub._subs  # noqa: SLF001 - the subscription was closed


def test_batch_reader_answers_many_callers_with_one_query_per_window() -> None:
    calls: list[list[str]] = []

    def read_many(ids: list[str]) -> dict[str, str]:
        calls.append(sorted(ids))
        return {i: i.upper() for i in ids if i != "gone"}

    async def scenario() -> list[Any]:
        reader = BatchReader(read_many, window_s=0.02)
        first = await asyncio.gather(*(reader.read(k) for k in ("a", "b", "a", "gone")))
        second = await reader.read("c")  # a later caller starts a new batch
        return [*first, second]

    assert asyncio.run(scenario()) == ["A", "B", "A", None, "C"]
    assert calls == [["a", "b", "gone"], ["c"]]


def test_batch_reader_fails_every_caller_of_a_failed_query_and_recovers() -> None:
    state = {"down": True}

    def read_many(ids: list[str]) -> dict[str, str]:
        if state["down"]:
            raise ConnectionError("database unreachable")
        return {i: i for i in ids}

    async def scenario() -> Any:
        reader = BatchReader(read_many, window_s=0.01)
        failed = await asyncio.gather(reader.read("a"), reader.read("b"), return_exceptions=True)
        assert all(isinstance(f, ConnectionError) for f in failed)
        state["down"] = False
        return await reader.read("a")

    assert asyncio.run(scenario()) == "a"
