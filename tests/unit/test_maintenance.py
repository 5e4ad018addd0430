"""The maintenance sweep re-sends only what its queues are missing (workers.maintenance).

A job that waits its turn in a backlog is "stale" by its update time, but its message is in the
queue: the load test saw the high queue grow to ~2,400 messages for 50 jobs when every sweep
re-sent every such job. Real RabbitMQ is covered by tests/e2e/test_reliability.py (a lost
message is recovered) and the load test (the queue stays at the number of jobs).
"""
from __future__ import annotations

import datetime as dt
import pathlib
from typing import Any, Iterator

import pytest
from dramatiq import Message
from dramatiq.brokers.stub import StubBroker

from core import queue, runtime
from mp4totext.config import Settings
from mp4totext.contracts import JobState, MediaState, Stage
from storage.db import Media, Tenant, Transcription, database, new_id, utcnow
from workers import maintenance


@pytest.fixture()
def broker(tmp_path: pathlib.Path) -> Iterator[StubBroker]:
    settings = Settings(data_dir=str(tmp_path), broker_url="memory", stuck_after_s=60)
    runtime.init(settings)
    yield queue.make_broker(settings)
    database.close()


def _jobs(n: int, state: JobState = JobState.QUEUED, **fields: Any) -> list[Transcription]:
    long_ago = utcnow() - dt.timedelta(seconds=600)
    with database.connection_context():
        tenant = Tenant.create(name=f"t-{new_id()[:8]}")
        media = Media.create(tenant=tenant, object_key="k", state=MediaState.READY, duration_s=3.0)
        return [Transcription.create(tenant=tenant, media=media, state=state, stage=Stage.WAITING,
                                     update_time=long_ago - dt.timedelta(seconds=i), **fields) for i in range(n)]


def _drain(broker: StubBroker) -> list[str]:
    """The job ids of the messages in the high queue, taken out of it."""
    q = broker.queues["high"]
    ids = []
    while not q.empty():
        ids.append(Message.decode(q.get()).args[0])
    return ids


def test_a_backlog_is_not_sent_again(broker: StubBroker) -> None:
    jobs = _jobs(5)
    for j in jobs:  # each waits in the queue with its message
        queue.enqueue("transcribe", j.id, 0)
    assert queue.queue_depths()["high"] == 5
    maintenance.sweep()
    assert sorted(_drain(broker)) == sorted(j.id for j in jobs)  # nothing added


def test_lost_messages_are_sent_again_oldest_first(broker: StubBroker) -> None:
    jobs = _jobs(5)  # jobs[4] is the oldest
    for j in jobs[:3]:
        queue.enqueue("transcribe", j.id, 0)
    maintenance.sweep()
    assert queue.queue_depths()["high"] == 5  # as many as the queue lacked
    maintenance.sweep()  # every job has a message now: the next sweep adds none
    sent = _drain(broker)
    assert len(sent) == 5 and sorted(sent[3:]) == sorted([jobs[4].id, jobs[3].id])
    maintenance.sweep()  # all five messages lost: each stale job is sent once
    assert sorted(_drain(broker)) == sorted(j.id for j in jobs)


def test_a_stage_whose_worker_died_is_always_sent_again(broker: StubBroker) -> None:
    waiting = _jobs(2)
    for j in waiting:
        queue.enqueue("transcribe", j.id, 0)
    (running,) = _jobs(1, JobState.RUNNING, heartbeat_time=utcnow() - dt.timedelta(seconds=600))
    maintenance.sweep()
    sent = _drain(broker)
    assert sorted(sent) == sorted([*(j.id for j in waiting), running.id])


def test_the_job_the_queue_serves_first_is_sent_again_first(broker: StubBroker) -> None:
    """RabbitMQ serves by priority: re-sending an old low-priority row while a newer urgent one
    lost its message would leave the urgent one waiting behind every sweep's duplicate."""
    low = _jobs(2)  # older, priority 0, messages lost
    (urgent,) = _jobs(1, priority=9)
    with database.connection_context():
        Transcription.update(update_time=utcnow() - dt.timedelta(seconds=120)).where(
            Transcription.id == urgent.id).execute()  # newer than the others, still stale
    for j in low[:1]:
        queue.enqueue("transcribe", j.id, 0)
    queue.enqueue("transcribe", low[1].id, 0)  # every low row has its message; the urgent one lost it
    maintenance.sweep()
    assert _drain(broker)[2:] == [urgent.id]
