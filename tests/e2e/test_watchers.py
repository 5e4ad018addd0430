"""One replica holds 2,000 concurrent Watch streams and stays responsive to unary calls.

Before the asyncio server every Watch held one of the replica's 64 handler threads: the 65th
stream and every unary call behind it waited until a deadline ran out. The driver here is a
grpc.aio client in the test process (no thread per stream either); the jobs are real rows of
a tenant of its own, quiet until the test finishes them in the database, so every watcher
lives on heartbeats and the batched re-read, then ends with the terminal state.
"""
from __future__ import annotations

import asyncio
import pathlib
import statistics
import threading
import time
import uuid
from typing import Any

import grpc
import pytest
from grpc import aio

from mp4totext.v1 import media_pb2
from mp4totext.v1 import transcription_pb2 as tpb
from mp4totext.v1 import transcription_pb2_grpc
from tests.support import Stack, log_lines, wait_for

WATCHERS = 2000
JOBS = 40
CHANNELS = 20  # HTTP/2 connections of the driver (a mobile fleet has one each)
HEARTBEAT_S = 5
SAMPLES = 300


def _threads(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


async def _unary_p95(stubs: list[Any], names: list[str], md: Any) -> float:
    """p95 of GetTranscription latency, 4 calls in flight (a few app screens refreshing)."""
    took: list[float] = []

    async def one(i: int) -> None:
        start = time.perf_counter()
        await stubs[i % len(stubs)].GetTranscription(tpb.GetTranscriptionRequest(name=names[i % len(names)]),
                                                     metadata=md, timeout=10)
        took.append(time.perf_counter() - start)

    for i in range(0, SAMPLES, 4):
        await asyncio.gather(*(one(i + k) for k in range(4)))
    return statistics.quantiles(took, n=20)[-1]


@pytest.fixture()
def quiet_jobs(db: Any, stack: Stack, speech_mp4: Any) -> tuple[str, list[str]]:
    """A tenant of its own with JOBS queued jobs of a real upload that nothing will move: they
    wait for a media preparation that has already finished (the maintenance sweep re-sends
    WAITING jobs, not these)."""
    from mp4totext.client import Client
    from mp4totext.contracts import JobConfig
    from server.auth import create_key
    from storage.db import JobState, Stage, Transcription

    key, tenant = create_key(f"watchers-{uuid.uuid4().hex[:6]}")
    with Client(stack.target, key) as c:
        media = c.upload(str(speech_mp4))
        wait_for(lambda: c.get_media(media.name).state == media_pb2.MEDIA_STATE_READY, 120, "media READY")
    with db.connection_context():
        ids = [Transcription.create(tenant=tenant.id, media=media.name.split("/")[1], config=JobConfig().to_json(),
                                    state=JobState.QUEUED, stage=Stage.PREPARING_MEDIA, sequence=1).id
               for _ in range(JOBS)]
    return key, ids


def test_one_replica_holds_2000_watchers_and_stays_responsive(stack: Stack, db: Any,
                                                              quiet_jobs: tuple[str, list[str]]) -> None:
    from storage.db import JobState, Stage, Transcription

    key, ids = quiet_jobs
    names = [f"transcriptions/{i}" for i in ids]
    proc, target = stack.launch_server(MP4T_WATCH_HEARTBEAT_S=str(HEARTBEAT_S))
    md = (("authorization", f"Bearer {key}"),)
    threads_idle = _threads(proc.pid)

    async def drive() -> dict[str, Any]:
        channels = [aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(CHANNELS)]
        for c in channels:
            await c.channel_ready()
        stubs = [transcription_pb2_grpc.TranscriptionServiceStub(c) for c in channels]
        idle_p95 = await _unary_p95(stubs, names, md)
        first = asyncio.Event()
        opened: list[int] = []
        ended: dict[str, int] = {}

        async def watch(i: int) -> list[Any]:
            got = []
            call = stubs[i % CHANNELS].WatchTranscription(
                tpb.WatchTranscriptionRequest(name=names[i % JOBS]), metadata=md)
            async for ev in call:
                got.append(ev)
                if len(got) == 1:
                    opened.append(i)
                    if len(opened) == WATCHERS:
                        first.set()
            code = await call.code()
            ended[code.name] = ended.get(code.name, 0) + 1
            return got

        tasks = [asyncio.ensure_future(watch(i)) for i in range(WATCHERS)]
        started = time.monotonic()
        await asyncio.wait_for(first.wait(), 120)
        open_s = time.monotonic() - started
        loaded_p95 = await _unary_p95(stubs, names, md)
        threads_loaded = _threads(proc.pid)
        still_open = sum(not t.done() for t in tasks)
        with db.connection_context():  # every job ends: each watcher must get the terminal state
            Transcription.update(state=JobState.SUCCEEDED, stage=Stage.DONE, progress=100.0,
                                 sequence=Transcription.sequence + 1).where(Transcription.id.in_(ids)).execute()
        finished = time.monotonic()
        streams = await asyncio.wait_for(asyncio.gather(*tasks), HEARTBEAT_S * 4 + 30)
        end_s = time.monotonic() - finished
        for c in channels:
            await c.close()
        return {"idle_p95": idle_p95, "loaded_p95": loaded_p95, "open_s": open_s, "end_s": end_s,
                "threads": threads_loaded, "still_open": still_open, "streams": streams, "ended": ended}

    try:
        r = asyncio.run(drive())
    finally:
        proc.stop()
    print(f"\n{WATCHERS} watchers: opened in {r['open_s']:.1f} s, unary p95 idle {r['idle_p95'] * 1000:.1f} ms, "
          f"with watchers {r['loaded_p95'] * 1000:.1f} ms, threads {threads_idle} -> {r['threads']}, "
          f"all ended {r['end_s']:.1f} s after the jobs finished")
    assert r["still_open"] == WATCHERS  # none was refused or dropped while the unary calls ran
    assert r["ended"] == {"OK": WATCHERS}
    for got in r["streams"]:
        assert got[-1].state == tpb.TRANSCRIPTION_STATE_SUCCEEDED and not got[-1].heartbeat
    assert r["threads"] <= threads_idle + 10, "a watcher must not cost a thread"
    assert r["loaded_p95"] <= 2 * r["idle_p95"], "unary p95 with 2,000 watchers must stay within 2x of idle"
    rpc_lines = [ln for ln in log_lines(proc) if ln.get("event") == "rpc"
                 and ln.get("rpc", "").endswith("WatchTranscription")]
    assert len(rpc_lines) == WATCHERS and {ln["code"] for ln in rpc_lines} == {"OK"}


def test_a_call_whose_deadline_ran_out_in_the_queue_is_logged_and_health_sees_saturation(
        stack: Stack, key_a: str, key_b: str, db: Any) -> None:
    """With every handler thread busy (uploads that stall), a unary call waits in the queue:
    the server logs it as DEADLINE_EXCEEDED, /healthz says SATURATED and the HAProxy agent
    lowers the replica's weight, while it keeps serving (200, not DOWN)."""
    import socket
    import urllib.request

    from mp4totext.v1 import media_pb2_grpc

    # Uploads may take every thread here (MP4T_MAX_UPLOADS=4; by default they get half).
    proc, target = stack.launch_server(MP4T_GRPC_MAX_WORKERS="4", MP4T_MAX_UPLOADS="4")
    md = (("authorization", f"Bearer {key_a}"),)
    channel = grpc.insecure_channel(target)
    release = threading.Event()  # never set: the stalled uploads are cancelled at the end
    stalled = []

    def stall(key: str) -> Any:
        def reqs() -> Any:
            yield media_pb2.UploadMediaRequest(metadata=media_pb2.UploadMetadata(filename="stall.mp4"))
            yield media_pb2.UploadMediaRequest(chunk=media_pb2.UploadChunk(data=b"x" * 1024))
            while not release.is_set():
                time.sleep(0.2)
        return media_pb2_grpc.MediaServiceStub(channel).UploadMedia.future(
            reqs(), metadata=(("authorization", f"Bearer {key}"),))

    def agent() -> str:
        with socket.create_connection(("127.0.0.1", stack.agent_ports[proc]), timeout=5) as s:
            return s.recv(100).decode().strip()

    def healthz() -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{stack.http_ports[proc]}/healthz", timeout=5) as r:
            return r.status, r.read().decode().strip()

    try:
        assert agent() == "up ready 100%"
        stalled = [stall(key) for key in (key_a, key_a, key_b, key_b)]  # 2 per tenant, the most allowed
        wait_for(lambda: healthz()[1].startswith("SATURATED"), 30, "/healthz to report saturation", 0.2)
        assert healthz()[0] == 200 and agent() == "up ready 1%"
        stub = transcription_pb2_grpc.TranscriptionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetTranscription(tpb.GetTranscriptionRequest(name="transcriptions/" + "0" * 32), metadata=md,
                                  timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for f in stalled:
            f.cancel()
        line = wait_for(lambda: next((ln for ln in log_lines(proc) if ln.get("event") == "rpc"
                                      and ln.get("rpc", "").endswith("GetTranscription")), None),
                        30, "the queued call's rpc line")
        assert line["code"] == "CANCELLED" and line["queued_ms"] >= 500 and "saturated" in line["error"]
        wait_for(lambda: healthz()[1] == "SERVING" and agent() == "up ready 100%", 30, "saturation to clear", 0.2)
    finally:
        for f in stalled:
            f.cancel()
        channel.close()
        proc.stop()
