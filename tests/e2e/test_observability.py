"""Traces, metrics and logs of the real stack: spans arrive at a real OTLP/gRPC endpoint,
metrics are scraped over HTTP, logs are the processes' own JSON lines."""
from __future__ import annotations

import pathlib
import time
import uuid
from typing import Any

import pytest

from tests.support import OtlpReceiver, Stack, log_lines, metric, metric_delta, wait_for

SERVER, PRODUCER, CONSUMER, INTERNAL = 2, 4, 5, 1


def _one(spans: list[dict[str, Any]], name: str, kind: int | None = None) -> dict[str, Any]:
    found = [s for s in spans if s["name"] == name and (kind is None or s["kind"] == kind)]
    assert len(found) == 1, f"expected one span {name!r}, got {len(found)}: {sorted(s['name'] for s in spans)}"
    return found[0]


def _complete(spans: list[dict[str, Any]], outside: str = "") -> bool:
    """The job's last spans are in, and so is every span's parent: three processes export their
    spans in batches, so a child (e.g. "probe") can arrive before its stage's span does (seen on a
    loaded 2-core machine, where the test then read a trace with a parent missing). `outside` is a
    parent that is never exported (the caller's own span)."""
    names = {s["name"] for s in spans}
    ids = {s["span_id"] for s in spans} | {outside}
    return {"finalize process", "whisper transcribe"} <= names and all(
        s["parent_id"] in ids for s in spans if s["parent_id"])


# What one job adds to the counters of the processes it went through: (process, sample name,
# labels, least change). Other tests bump the same counters, so the checks are on the change
# measured around the job, never on the absolute value.
JOB_COUNTERS: list[tuple[str, str, dict[str, str], float]] = [
    ("server", "grpc_server_handled_total", {"grpc_method": "UploadMedia", "grpc_code": "OK"}, 1),
    ("server", "grpc_server_handling_seconds_count", {"grpc_method": "CreateTranscription"}, 1),
    ("server", "mp4t_upload_bytes_total", {}, -1),  # -1: the size of the uploaded file
    ("server", "mp4t_upload_throughput_bytes_per_second_count", {}, 1),
    ("server", "mp4t_jobs", {"state": "SUCCEEDED"}, 1),  # a gauge of the whole system: one more
    ("high", "mp4t_stage_duration_seconds_count", {"stage": "transcribe", "outcome": "transcribed"}, 1),
    ("high", "mp4t_realtime_factor_count", {"stage": "transcribe", "model": "tiny.en"}, 1),
    ("high", "mp4t_messages_total", {"actor": "transcribe", "outcome": "ok"}, 1),
    ("high", "mp4t_messages_enqueued_total", {"actor": "finalize"}, 1),
    ("critical", "mp4t_messages_total", {"actor": "prepare_media", "queue": "critical", "outcome": "ok"}, 1),
    ("critical", "mp4t_jobs_finished_total", {"state": "SUCCEEDED"}, 1),
]


def _job_procs(stack: Stack) -> dict[str, Any]:
    return {"server": stack.servers[0], "high": stack.workers["high"], "critical": stack.workers["critical,low"]}


def _least(want: float, upload_size: int) -> float:
    return upload_size if want < 0 else want


@pytest.fixture(scope="module")
def traced_job(stack: Stack, client: Any, speech_mp4: pathlib.Path, otlp: OtlpReceiver) -> dict[str, Any]:
    """Upload + create + wait, with no client trace context: the server links them itself.

    The processes' metrics are scraped just before and just after the job (``metrics_before``,
    ``metrics_after``), so tests can check what this job, and only it, added."""
    procs = _job_procs(stack)
    before = {k: stack.metrics(p) for k, p in procs.items()}
    media = client.upload(str(speech_mp4), content_type="video/mp4")
    job = client.create(media.name)
    done = client.wait(job.name, timeout=300)
    from mp4totext.v1 import transcription_pb2 as tpb

    assert done.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED, done
    media_id, job_id = media.name.split("/")[1], job.name.split("/")[1]
    upload = wait_for(lambda: otlp.find(**{"mp4t.media_id": media_id, "rpc.method": "UploadMedia"}), 30,
                      "the UploadMedia span")[0]
    trace_id = upload["trace_id"]
    spans = wait_for(lambda: (lambda sp: sp if _complete(sp) else None)(otlp.trace(trace_id)), 60,
                     "every stage's spans of the job's trace")
    # Counters move when a message or an RPC is done, a moment after its span; the jobs gauge is
    # cached for 5 s. Scrape until the job shows everywhere (or 30 s: the test then says what is missing).
    size = speech_mp4.stat().st_size
    deadline = time.monotonic() + 30
    while True:
        after = {k: stack.metrics(p) for k, p in procs.items()}
        if all(metric_delta(before[proc], after[proc], name, **labels) >= _least(want, size)
               for proc, name, labels, want in JOB_COUNTERS) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return {"trace_id": trace_id, "spans": spans, "media_id": media_id, "job_id": job_id,
            "metrics_before": before, "metrics_after": after}


@pytest.fixture(scope="module")
def client(stack: Stack, key_a: str) -> Any:
    from mp4totext.client import Client

    with Client(stack.target, key_a) as c:
        yield c


def test_one_job_is_one_trace_from_upload_to_last_stage(traced_job: dict[str, Any]) -> None:
    spans = traced_job["spans"]
    by_id = {s["span_id"]: s for s in spans}
    upload = _one(spans, "mp4totext.v1.MediaService/UploadMedia", SERVER)
    create = _one(spans, "mp4totext.v1.TranscriptionService/CreateTranscription", SERVER)
    assert upload["parent_id"] == ""  # the root: no client context was sent
    assert create["parent_id"] == upload["span_id"]  # Create continues its media's upload trace
    assert upload["service"] == create["service"] == "mp4totext-server"
    assert create["attributes"]["mp4t.job_id"] == traced_job["job_id"]
    assert upload["attributes"]["mp4t.tenant_id"] and upload["attributes"]["rpc.grpc.status_code"] == 0

    # Each stage: PRODUCER (enqueue) -> CONSUMER (worker), linked through the message.
    expected_parent = {"prepare_media": upload, "transcribe": create}
    consumers = {}
    for actor in ("prepare_media", "transcribe", "finalize"):
        prod = _one(spans, f"{actor} publish", PRODUCER)
        cons = _one(spans, f"{actor} process", CONSUMER)
        assert cons["parent_id"] == prod["span_id"], actor
        assert cons["attributes"]["messaging.message.id"] == prod["attributes"]["messaging.message.id"]
        assert cons["service"] == "mp4totext-worker"
        assert cons["attributes"]["messaging.dramatiq.retries"] == 0
        assert cons["attributes"]["mp4t.outcome"] == "ok"
        assert cons["start"] >= prod["start"]
        consumers[actor] = cons
        if actor in expected_parent:
            assert prod["parent_id"] == expected_parent[actor]["span_id"], actor
    assert _one(spans, "finalize publish", PRODUCER)["parent_id"] == consumers["transcribe"]["span_id"]
    assert consumers["prepare_media"]["attributes"]["messaging.destination.name"] == "critical"
    assert consumers["transcribe"]["attributes"]["messaging.destination.name"] == "high"
    assert consumers["transcribe"]["resource"]["mp4t.queues"] == "high"

    # Steps inside the stages, with the attributes an operator filters on.
    for name in ("download original", "probe", "extract audio", "store audio"):
        assert by_id[_one(spans, name, INTERNAL)["parent_id"]] is consumers["prepare_media"], name
    probe = _one(spans, "probe")["attributes"]
    assert 5 < probe["mp4t.media.duration_s"] < 60 and probe["mp4t.media.format"]
    whisper = _one(spans, "whisper transcribe", INTERNAL)
    assert whisper["parent_id"] == consumers["transcribe"]["span_id"]
    assert whisper["attributes"]["mp4t.model"] == "tiny.en"
    assert 0 < whisper["attributes"]["mp4t.rtf"] < 5
    assert consumers["transcribe"]["attributes"]["mp4t.attempt"] == 1
    assert consumers["transcribe"]["attributes"]["mp4t.tenant_id"] == upload["attributes"]["mp4t.tenant_id"]
    # Every span of the job is in this one trace, and every parent is in it too.
    assert all(s["parent_id"] in by_id for s in spans if s["parent_id"])


def test_client_trace_context_is_honoured(stack: Stack, client: Any, speech_mp4: pathlib.Path,
                                          otlp: OtlpReceiver) -> None:
    """A caller inside its own span (mobile app, CLI) gets the whole job under that span."""
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    trace_id, span_id = uuid.uuid4().int >> 1, uuid.uuid4().int >> 65
    parent = NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(1)))
    with trace.use_span(parent):
        media = client.upload(str(speech_mp4), content_type="video/mp4")
        job = client.create(media.name)
    client.wait(job.name, timeout=300)
    tid = format(trace_id, "032x")
    outside = format(span_id, "016x")
    spans = wait_for(lambda: (lambda sp: sp if _complete(sp, outside) else None)(otlp.trace(tid)), 60,
                     "the client's trace")
    for rpc in ("UploadMedia", "CreateTranscription"):
        span = [s for s in spans if s["attributes"].get("rpc.method") == rpc][0]
        assert span["parent_id"] == outside


def test_logs_carry_trace_and_job_ids(stack: Stack, traced_job: dict[str, Any]) -> None:
    lines = log_lines
    server_lines = [ln for p in stack.servers for ln in lines(p)]
    rpc = [ln for ln in server_lines if ln.get("event") == "rpc" and ln.get("rpc", "").endswith("/UploadMedia")
           and ln.get("trace_id") == traced_job["trace_id"]]
    assert rpc and rpc[0]["code"] == "OK" and rpc[0]["duration_ms"] > 0 and rpc[0]["tenant_id"]
    stage = [ln for ln in lines(stack.workers["high"]) if ln.get("event") == "stage_finished"
             and ln.get("job_id") == traced_job["job_id"]]
    assert stage, "no canonical stage line for the job"
    assert stage[0]["trace_id"] == traced_job["trace_id"] and stage[0]["outcome"] == "transcribed"
    assert stage[0]["rtf"] > 0 and stage[0]["tenant_id"] and stage[0]["attempt"] == 1


def test_metrics_after_a_job(stack: Stack, traced_job: dict[str, Any], speech_mp4: pathlib.Path) -> None:
    before, after = traced_job["metrics_before"], traced_job["metrics_after"]
    for proc, name, labels, want in JOB_COUNTERS:
        change = metric_delta(before[proc], after[proc], name, **labels)
        assert change >= _least(want, speech_mp4.stat().st_size), (proc, name, labels, change)
    speech = metric_delta(before["high"], after["high"], "mp4t_media_seconds_processed_total", stage="transcribe")
    assert speech > 5, speech
    assert metric(after["high"], "mp4t_model_load_seconds", kind="whisper") > 0  # a gauge: the last load's time

    critical = after["critical"]
    for queue in ("critical", "high", "default", "low"):
        for kind in ("ready", "delayed", "dead"):
            assert (("mp4t_queue_messages", (("kind", kind), ("queue", queue))) in critical), (queue, kind)


def test_health_endpoints(stack: Stack) -> None:
    import socket
    import urllib.request

    proc = stack.servers[0]
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.http_ports[proc]}/healthz", timeout=5) as r:
        assert r.status == 200 and r.read().strip() == b"SERVING"
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.http_ports[proc]}/readyz", timeout=5) as r:
        assert r.status == 200
    with socket.create_connection(("127.0.0.1", stack.agent_ports[proc]), timeout=5) as s:
        assert s.recv(100).decode().strip() == "up ready 100%"  # full weight: not saturated


def test_watch_that_ends_with_its_job_is_ok_not_cancelled(stack: Stack, key_a: str,
                                                           speech_mp4: pathlib.Path) -> None:
    """The client closes the call as soon as it has the terminal event: that is a normal end."""
    from mp4totext.client import Client
    from mp4totext.v1 import transcription_pb2 as tpb

    server = stack.servers[0]
    watch = {"grpc_method": "WatchTranscription"}
    with Client(stack.targets[0], key_a) as client:
        job = client.create(client.upload(str(speech_mp4)).name)
        before = stack.metrics(server)
        events = list(client.watch(job.name))
    assert events[-1].state == tpb.TRANSCRIPTION_STATE_SUCCEEDED
    def counted() -> dict[Any, float] | None:
        now = stack.metrics(server)
        return now if metric_delta(before, now, "grpc_server_handled_total", **watch) >= 1 else None

    after = wait_for(counted, 30, "the Watch call to be counted")
    assert metric_delta(before, after, "grpc_server_handled_total", grpc_code="OK", **watch) == 1
    assert metric_delta(before, after, "grpc_server_handled_total", grpc_code="CANCELLED", **watch) == 0
