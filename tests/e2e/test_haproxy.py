"""Real HAProxy (Debian's) from haproxy/haproxy.cfg in front of two real server processes.

The committed config is used as is, except that its DNS ``server-template`` line (docker
DNS) becomes two static ``server`` lines for the test's processes; timeouts and the rate
limit are set through the environment variables the config reads.
"""
from __future__ import annotations

import csv
import io
import os
import pathlib
import re
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Iterator

import grpc
import pytest

from mp4totext.client import Client
from mp4totext.v1 import media_pb2, media_pb2_grpc, transcription_pb2_grpc
from mp4totext.v1 import transcription_pb2 as tpb
from tests.support import ROOT, SPEECH_TEXT, Proc, Stack, free_port, haproxy_config, metric, need, wait_for

INACTIVITY_S = 3  # HAProxy client/server timeout in these tests
HEARTBEAT_S = 1


class Edge:
    """HAProxy + two dedicated servers sharing the session stack's DB, queues, S3 and workers."""

    def __init__(self, stack: Stack, tmp: pathlib.Path, rate_limit: int = 1000) -> None:
        self.stack = stack
        self.tmp = tmp
        self.slots: list[tuple[str, int, int, int]] = [("s1", 0, 0, 0), ("s2", 0, 0, 0)]
        self.procs: list[Proc | None] = [None, None]
        self.haproxy: Proc | None = None
        self.port = free_port()
        self.stats_port = free_port()
        try:
            for i in range(2):
                self.start_server(i)
            self.start_haproxy(rate_limit)
        except BaseException:
            self.stop()
            raise

    SERVER_ENV = {"MP4T_GRPC_DRAIN_S": "2.5", "MP4T_GRPC_GRACE_S": "20",
                  "MP4T_WATCH_HEARTBEAT_S": str(HEARTBEAT_S)}

    def start_server(self, i: int) -> Proc:
        """Start slot i: on free ports the first time, on the same ports on a restart."""
        name, port, http, agent = self.slots[i]
        proc, target = self.stack.launch_server(port, http, agent, **self.SERVER_ENV)
        self.slots[i] = (name, int(target.rsplit(":", 1)[1]), self.stack.http_ports[proc],
                         self.stack.agent_ports[proc])
        self.procs[i] = proc
        return proc

    def start_haproxy(self, rate_limit: int, key_limit: int | None = None) -> None:
        cfg = self.tmp / f"haproxy-{uuid.uuid4().hex[:6]}.cfg"
        cfg.write_text(haproxy_config(self.slots))
        for attempt in range(5):  # a port picked by free_port() may be taken before HAProxy binds it
            env = {**os.environ, "MP4T_HAPROXY_GRPC_BIND": f"127.0.0.1:{self.port}",
                   "MP4T_HAPROXY_STATS_BIND": f"127.0.0.1:{self.stats_port}",
                   "MP4T_HAPROXY_TIMEOUT": f"{INACTIVITY_S}s", "MP4T_RATE_LIMIT_PER_S": str(rate_limit),
                   "MP4T_RATE_LIMIT_PER_KEY_S": str(key_limit or rate_limit)}
            self.haproxy = Proc("haproxy", ["haproxy", "-db", "-f", str(cfg)], env, self.stack.log_dir)
            time.sleep(0.3)
            if self.haproxy.alive() or attempt == 4:
                break
            self.port, self.stats_port = free_port(), free_port()
        wait_for(lambda: self.states() == {"s1": "UP", "s2": "UP"}, 30, "both servers UP in HAProxy")

    def states(self) -> dict[str, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2) as r:
                rows = list(csv.DictReader(io.StringIO(r.read().decode().lstrip("# "))))
        except OSError:
            return {}
        return {row["svname"]: row["status"] for row in rows if row["pxname"] == "grpc_api"
                and row["svname"] not in ("BACKEND", "FRONTEND")}

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def healthz(self, i: int) -> str:
        """Slot i's /healthz answer: "<status> <body>"."""
        url = f"http://127.0.0.1:{self.slots[i][2]}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return f"{r.status} {r.read().decode()}"
        except urllib.error.HTTPError as exc:
            return f"{exc.code} {exc.read().decode()}"

    def rpc_count(self, i: int, method: str) -> float:
        proc = self.procs[i]
        assert proc is not None
        return metric(self.stack.metrics(proc), "grpc_server_handled_total", grpc_method=method)

    def stop(self) -> None:
        if self.haproxy:
            self.haproxy.stop()
        for proc in self.procs:
            if proc is not None:
                proc.stop()


@pytest.fixture()
def via_edge(edge: Edge, key_a: str) -> Iterator[Client]:
    with Client(edge.target, key_a, retries=10) as c:
        yield c


def test_committed_config_is_valid() -> None:
    need(shutil.which("haproxy") is not None, "haproxy")
    import subprocess

    out = subprocess.run(["haproxy", "-c", "-f", str(ROOT / "haproxy" / "haproxy.cfg")], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Configuration file is valid" in out.stdout + out.stderr


def test_calls_are_balanced_across_both_servers(edge: Edge, via_edge: Client) -> None:
    before = [edge.rpc_count(i, "ListMedia") for i in range(2)]
    for _ in range(40):
        via_edge.call(via_edge.media.ListMedia, media_pb2.ListMediaRequest(page_size=1))
    after = [edge.rpc_count(i, "ListMedia") for i in range(2)]
    share = [a - b for a, b in zip(after, before)]
    assert sum(share) == 40
    assert min(share) >= 10, f"unbalanced: {share}"


def test_access_log_shows_grpc_status(edge: Edge) -> None:
    with grpc.insecure_channel(edge.target) as ch:
        stub = media_pb2_grpc.MediaServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListMedia(media_pb2.ListMediaRequest(), metadata=(("authorization", "Bearer nope"),), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert edge.haproxy is not None
    wait_for(lambda: re.search(r"grpc=16 .*ListMedia", edge.haproxy.log()), 10, "an access log line with grpc=16")


def test_upload_and_transcription_through_haproxy(edge: Edge, via_edge: Client, speech_mp4: pathlib.Path) -> None:
    media = via_edge.upload(str(speech_mp4), content_type="video/mp4")
    job = via_edge.create(media.name)
    done = via_edge.wait(job.name, timeout=300)
    assert done.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED
    from mp4totext.samples import word_error_rate

    assert word_error_rate(SPEECH_TEXT, done.result.text) < 0.35, done.result.text


def test_watch_outlives_haproxy_inactivity_timeout(edge: Edge, stack: Stack, key_a: str,
                                                   speech_mp4: pathlib.Path, via_edge: Client) -> None:
    """One Watch stream, no reconnects: heartbeats keep it open across several timeouts."""
    media = via_edge.upload(str(speech_mp4), content_type="video/mp4")
    wait_for(lambda: via_edge.get_media(media.name).state == media_pb2.MEDIA_STATE_READY, 120, "media READY")
    high = stack.workers["high"]
    high.kill(signal.SIGSTOP)  # nothing transcribes: the stream carries nothing but heartbeats
    try:
        job = via_edge.create(media.name)
        events: list[tuple[float, Any]] = []
        with grpc.insecure_channel(edge.target) as ch:
            stub = transcription_pb2_grpc.TranscriptionServiceStub(ch)
            stream = stub.WatchTranscription(tpb.WatchTranscriptionRequest(name=job.name),
                                             metadata=(("authorization", f"Bearer {key_a}"),), timeout=300)
            started = time.monotonic()
            resumed = False
            for ev in stream:  # a broken stream raises here: the test fails
                events.append((time.monotonic() - started, ev))
                if not resumed and time.monotonic() - started > 3 * INACTIVITY_S:
                    high.kill(signal.SIGCONT)
                    resumed = True
                if ev.state in (tpb.TRANSCRIPTION_STATE_SUCCEEDED, tpb.TRANSCRIPTION_STATE_FAILED):
                    break
    finally:
        high.kill(signal.SIGCONT)
    assert events[-1][1].state == tpb.TRANSCRIPTION_STATE_SUCCEEDED
    heartbeats = [t for t, ev in events if ev.heartbeat]
    assert len(heartbeats) >= 3 * INACTIVITY_S / HEARTBEAT_S - 2, events
    assert events[-1][0] > 3 * INACTIVITY_S


def _hammer(target: str, key: str, stop: threading.Event, results: list[Any], retries: int) -> None:
    """Unary calls in a loop; with retries=0 a raw stub call (no retry at all)."""
    with Client(target, key, retries=retries, timeout=15) as c:
        while not stop.is_set():
            try:
                if retries:
                    c.call(c.media.ListMedia, media_pb2.ListMediaRequest(page_size=1))
                else:
                    c.media.ListMedia(media_pb2.ListMediaRequest(page_size=1), metadata=c.metadata, timeout=15)
                results.append("ok")
            except grpc.RpcError as exc:
                results.append(f"{exc.code().name}: {exc.details()}")
            time.sleep(0.01)


def _slow_upload(target: str, key: str, path: pathlib.Path, out: dict[str, Any], chunk_pause: float) -> None:
    data = path.read_bytes()
    size = 64 * 1024

    def reqs() -> Iterator[media_pb2.UploadMediaRequest]:
        yield media_pb2.UploadMediaRequest(metadata=media_pb2.UploadMetadata(
            filename="slow.mp4", size_bytes=len(data), request_id=str(uuid.uuid4())))
        for off in range(0, len(data), size):
            time.sleep(chunk_pause)
            yield media_pb2.UploadMediaRequest(chunk=media_pb2.UploadChunk(data=data[off:off + size], write_offset=off))

    with grpc.insecure_channel(target) as ch:
        try:
            out["media"] = media_pb2_grpc.MediaServiceStub(ch).UploadMedia(
                reqs(), metadata=(("authorization", f"Bearer {key}"),), timeout=120).media
        except grpc.RpcError as exc:
            out["error"] = f"{exc.code().name}: {exc.details()}"


def test_graceful_shutdown_drains_with_zero_failed_calls(edge: Edge, key_a: str, speech_mp4: pathlib.Path) -> None:
    """SIGTERM a server under load: no call fails, not even without client retries,
    and an upload in flight on that server completes."""
    stop = threading.Event()
    results: list[Any] = []
    threads = [threading.Thread(target=_hammer, args=(edge.target, key_a, stop, results, 0)) for _ in range(3)]
    upload: dict[str, Any] = {}
    n_chunks = -(-speech_mp4.stat().st_size // (64 * 1024))
    pause = max(0.05, 4.0 / n_chunks)  # about 4 s of upload
    up = threading.Thread(target=_slow_upload, args=(edge.target, key_a, speech_mp4, upload, pause))
    for t in threads:
        t.start()
    up.start()
    # Find the server holding the upload, then shut that one down gracefully.
    holders = wait_for(lambda: [i for i in range(2) if metric(
        edge.stack.metrics(edge.procs[i]), "grpc_server_in_flight", grpc_type="client_stream") > 0], 10,
        "the upload to reach a server")
    victim = holders[0]
    proc = edge.procs[victim]
    assert proc is not None
    proc.kill(signal.SIGTERM)
    wait_for(lambda: edge.states().get(f"s{victim + 1}", "").startswith(("DRAIN", "DOWN", "NOLB", "MAINT")), 10,
             "HAProxy to drain the server")
    proc.popen.wait(timeout=60)
    time.sleep(1)
    stop.set()
    for t in [*threads, up]:
        t.join(timeout=60)
    failures = [r for r in results if r != "ok"]
    assert not failures, f"{len(failures)} of {len(results)} calls failed: {failures[:5]}"
    assert len(results) > 50
    assert "error" not in upload, upload
    assert upload["media"].size_bytes == speech_mp4.stat().st_size
    assert proc.popen.returncode == 0, proc.log()[-2000:]
    assert "server_stopped" in proc.log()
    edge.start_server(victim)
    wait_for(lambda: edge.states().get(f"s{victim + 1}") == "UP", 30, "the restarted server UP")


def test_sigkill_one_server_mid_traffic_every_call_succeeds(edge: Edge, key_a: str) -> None:
    stop = threading.Event()
    results: list[Any] = []
    threads = [threading.Thread(target=_hammer, args=(edge.target, key_a, stop, results, 10)) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    proc = edge.procs[0]
    assert proc is not None
    proc.kill(signal.SIGKILL)
    wait_for(lambda: edge.states().get("s1", "").startswith("DOWN"), 15, "HAProxy to mark the dead server DOWN")
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    failures = [r for r in results if r != "ok"]
    assert not failures, f"{len(failures)} of {len(results)} calls failed: {failures[:5]}"
    assert len(results) > 50
    edge.start_server(0)
    wait_for(lambda: edge.states().get("s1") == "UP", 30, "the restarted server UP")


def test_rate_limit_answers_429_as_unavailable(edge: Edge, key_a: str, tmp_path: pathlib.Path) -> None:
    limited = Edge.__new__(Edge)  # a second HAProxy with a low limit in front of the same servers
    limited.stack, limited.tmp, limited.slots, limited.procs = edge.stack, tmp_path, edge.slots, edge.procs
    limited.port, limited.stats_port = free_port(), free_port()
    limited.start_haproxy(rate_limit=10)
    try:
        codes = []
        with grpc.insecure_channel(limited.target) as ch:
            stub = media_pb2_grpc.MediaServiceStub(ch)
            for _ in range(40):
                try:
                    stub.ListMedia(media_pb2.ListMediaRequest(page_size=1),
                                   metadata=(("authorization", f"Bearer {key_a}"),), timeout=10)
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append((exc.code(), exc.details()))
        denied = [c for c in codes if c != "OK"]
        assert codes.count("OK") >= 10 and len(denied) >= 20, codes
        assert all(code == grpc.StatusCode.UNAVAILABLE and "429" in details for code, details in denied), denied[:3]
        # The client library backs off and gets through.
        time.sleep(1.5)
        with Client(limited.target, key_a, retries=10) as c:
            for _ in range(25):
                c.call(c.media.ListMedia, media_pb2.ListMediaRequest(page_size=1))
    finally:
        assert limited.haproxy is not None
        limited.haproxy.stop()



def test_per_key_limit_and_uploads_are_never_cut(edge: Edge, key_a: str, key_b: str,
                                                         tmp_path: pathlib.Path, speech_mp4: pathlib.Path) -> None:
    limited = Edge.__new__(Edge)  # an HAProxy with a low per-key limit in front of the same servers
    limited.stack, limited.tmp, limited.slots, limited.procs = edge.stack, tmp_path, edge.slots, edge.procs
    limited.port, limited.stats_port = free_port(), free_port()
    limited.start_haproxy(rate_limit=100000, key_limit=5)
    data = speech_mp4.read_bytes()

    def upload_request() -> Iterator[media_pb2.UploadMediaRequest]:
        yield media_pb2.UploadMediaRequest(metadata=media_pb2.UploadMetadata(filename="s.mp4", size_bytes=len(data)))
        for i in range(0, len(data), 64 * 1024):
            yield media_pb2.UploadMediaRequest(chunk=media_pb2.UploadChunk(data=data[i:i + 64 * 1024]))

    try:
        with grpc.insecure_channel(limited.target) as ch:
            stub = media_pb2_grpc.MediaServiceStub(ch)
            md_a, md_b = (("authorization", f"Bearer {key_a}"),), (("authorization", f"Bearer {key_b}"),)
            codes = []
            for _ in range(20):  # key A over its limit...
                try:
                    stub.ListMedia(media_pb2.ListMediaRequest(page_size=1), metadata=md_a, timeout=10)
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append(exc.code())
            stub.ListMedia(media_pb2.ListMediaRequest(page_size=1), metadata=md_b, timeout=10)  # ...B is not
            # An upload of A while A is over its call limit is not cut in the middle of its stream
            # (uploads are bounded by the servers' backpressure instead).
            uploaded = stub.UploadMedia(upload_request(), metadata=md_a, timeout=30)
        assert codes.count(grpc.StatusCode.UNAVAILABLE) >= 10, codes
        assert uploaded.media.size_bytes == len(data)
        with Client(limited.target, key_a) as c:  # limited calls: the client library retries them through
            assert len([c.get_media(uploaded.media.name) for _ in range(20)]) == 20
    finally:
        assert limited.haproxy is not None
        limited.haproxy.stop()


def _reads_through(edge: Edge, client: Client, job_name: str) -> None:
    """Get, List and Watch (to its end) of a finished job, through HAProxy, without a failure."""
    assert client.get(job_name).state == tpb.TRANSCRIPTION_STATE_SUCCEEDED
    client.call(client.transcriptions.ListTranscriptions, tpb.ListTranscriptionsRequest(page_size=5))
    events = list(client.watch(job_name))
    assert events and events[-1].state == tpb.TRANSCRIPTION_STATE_SUCCEEDED


def test_reads_keep_working_through_haproxy_while_the_broker_or_s3_is_down(
        edge: Edge, via_edge: Client, key_a: str, speech_mp4: pathlib.Path, s3_server: Any, stack: Stack) -> None:
    """Before: any broker or S3 outage made /healthz 503 on every replica, HAProxy marked them
    all DOWN and even Get/List/Watch failed. Now both replicas stay UP (DEGRADED), reads work
    without one failed call, creates are accepted (outbox) and uploads answer UNAVAILABLE."""
    from tests.support import broker_outage

    media = via_edge.upload(str(speech_mp4))
    done = via_edge.wait(via_edge.create(media.name).name, timeout=300)
    failed: list[str] = []

    def read_during(what: str, seconds: float) -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            try:
                _reads_through(edge, via_edge, done.name)
            except Exception as exc:  # noqa: BLE001 - counted: a read the client could not get done
                failed.append(f"{what}: {exc}")
            assert edge.states() == {"s1": "UP", "s2": "UP"}, f"{what}: {edge.states()}"

    with broker_outage(stack.env["MP4T_BROKER_URL"]):
        wait_for(lambda: all(edge.healthz(i).startswith("200 DEGRADED") and "broker" in edge.healthz(i)
                             for i in range(2)), 30, "both replicas DEGRADED (broker)")
        read_during("broker outage", 4)
        job = via_edge.create(media.name)  # accepted now, run when the broker is back
    s3_server.kill()
    try:
        wait_for(lambda: all(edge.healthz(i).startswith("200 DEGRADED") and "storage" in edge.healthz(i)
                             for i in range(2)), 30, "both replicas DEGRADED (S3)")
        read_during("S3 outage", 4)
        with Client(edge.target, key_a, retries=0) as once, pytest.raises(grpc.RpcError) as err:
            once.upload(str(speech_mp4))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "storage" in err.value.details()
    finally:
        s3_server.start()
    assert failed == []
    assert via_edge.wait(job.name, timeout=300).state == tpb.TRANSCRIPTION_STATE_SUCCEEDED
