"""The transactional outbox: a state change and its next message commit together; publishing
failures leave the message for the relay, never lose it (SQLite + Dramatiq's in-process broker)."""
from __future__ import annotations

import json
import pathlib
from typing import Any, Iterator

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from core import jobs, outbox, queue, runtime
from mp4totext.config import Settings
from mp4totext.contracts import BROKER_MAX_PRIORITY, JobState, MediaState, Stage
from storage.db import Media, OutboxMessage, Tenant, Transcription, database
from tests.support import wait_for


@pytest.fixture()
def broker(tmp_path: pathlib.Path) -> Iterator[StubBroker]:
    settings = Settings(data_dir=str(tmp_path), broker_url="memory")
    runtime.init(settings)
    yield queue.make_broker(settings)
    database.close()


def sent(broker: StubBroker, queue_name: str) -> list[dict[str, Any]]:
    q = broker.queues[queue_name]
    out = []
    while not q.empty():
        out.append(json.loads(q.get_nowait()))
    return out


def make_job(media_state: str = MediaState.READY, **fields: Any) -> Transcription:
    with database.connection_context():
        tenant = Tenant.create(name="outbox")
        media = Media.create(tenant=tenant, object_key="k", state=media_state, duration_s=3.0)
        return Transcription.create(tenant=tenant, media=media, priority=7, **fields)


def pending() -> list[OutboxMessage]:
    with database.connection_context():
        return list(OutboxMessage.select())


def test_a_transition_sends_its_message_after_the_commit(broker: StubBroker) -> None:
    job = make_job()
    with outbox.sending():
        moved = jobs.to_waiting(job.id)
    assert moved is not None and moved.stage == Stage.WAITING
    (msg,) = sent(broker, "high")
    assert (msg["actor_name"], msg["args"], msg["options"]["broker_priority"]) == ("transcribe", [job.id], 7)
    assert pending() == []


def test_a_broker_failure_keeps_the_message_for_the_relay(broker: StubBroker) -> None:
    job = make_job()
    dramatiq.set_broker(StubBroker())  # a broker that does not know our queues: every publish fails
    queue._broker = dramatiq.get_broker()  # noqa: SLF001
    with outbox.sending():
        jobs.to_waiting(job.id)
    with database.connection_context():
        assert Transcription.get_by_id(job.id).stage == Stage.WAITING  # the state change is committed
    assert [(m.actor, m.object_id) for m in pending()] == [("transcribe", job.id)]
    queue._broker = broker  # noqa: SLF001 - the broker is back
    assert outbox.publish() == 1
    assert [m["args"] for m in sent(broker, "high")] == [[job.id]] and pending() == []


def test_a_rolled_back_transition_sends_nothing(broker: StubBroker) -> None:
    job = make_job(media_state=MediaState.PROCESSING)  # not READY: to_waiting changes nothing
    with outbox.sending():
        assert jobs.to_waiting(job.id) is None
    assert sent(broker, "high") == [] and pending() == []


def test_finishing_messages_jump_the_queue(broker: StubBroker) -> None:
    job = make_job(stage=Stage.TRANSCRIBING, state=JobState.RUNNING, claim_message_id="m")
    with outbox.sending():
        assert jobs.stage_done(job.id, "m", Stage.FINALIZING) is not None
    (msg,) = sent(broker, "critical")
    assert msg["actor_name"] == "finalize" and msg["options"]["broker_priority"] == BROKER_MAX_PRIORITY


def test_relay_publishes_what_a_crashed_writer_left(broker: StubBroker) -> None:
    job = make_job()
    jobs.to_waiting(job.id)  # no sending(): as if the process died right after the commit
    assert len(pending()) == 1
    relay = outbox.Relay(0.05)
    try:
        wait_for(lambda: not pending(), 5, "the relay to publish the message", 0.05)
    finally:
        relay.close()
    assert pending() == [] and [m["args"] for m in sent(broker, "high")] == [[job.id]]
