"""Load tool: simulated mobile clients through HAProxy against a full stack, one command.

    .venv/bin/python bench/loadtest.py --clients 50 --rate 10 --out report/
    .venv/bin/python bench/loadtest.py --clients 50 200 500 --rate 10 --out report/   # one stack, three runs
    .venv/bin/python bench/loadtest.py --target edge:50051 --key KEY --clients 200 --out report/  # an existing stack

Without ``--target`` it starts its own stack, like bench/bench.py and the tests do: SeaweedFS S3
(``weed`` from the venv, its own data dir), a RabbitMQ vhost of its own on 127.0.0.1:5672, a
PostgreSQL database of its own on 127.0.0.1:5432 (``MP4T_TEST_PG``, default
postgresql://postgres@127.0.0.1:5432), ``--servers`` gRPC server replicas behind HAProxy
(haproxy/haproxy.cfg as committed, static server lines, rate limits raised to
``--haproxy-rate-limit`` because every simulated phone shares 127.0.0.1), a critical,low worker
and ``--high-workers`` transcription workers (tiny.en only). Everything is removed afterwards.

Each simulated client is one phone: its own HTTP/2 connection and its own end-user token (minted
with the tenant key through IdentityService; ``--shared-key`` uses the API key for all), arriving
as a Poisson process of ``--rate`` clients/s. It uploads a short generated speech file (``--media-s``
seconds, ffmpeg + espeak-ng, MP4), creates a transcription (``--language``), Watches it to the end,
reads the result (GetTranscription, FULL view) and exports it as SRT. It retries UNAVAILABLE and
RESOURCE_EXHAUSTED the way mp4totext.client.Client does (the server's RetryInfo delay, else jittered
exponential backoff) with the same request_id, and resumes a broken Watch with after_sequence.
Every non-OK status is counted per method, retried or not.

Outcomes per client: completed (SUCCEEDED, result text read, SRT exported), failed (the job FAILED
or was CANCELLED, or a call failed for good), lost (created, but no terminal state seen by the
deadline: ``--deadline`` s after the last arrival; checked once more with a Get). Duplicated counts
request_ids that own more than one job or media (listed with the tenant key afterwards), and jobs
seen terminal twice with different content (two terminal Watch events that disagree, or a
Watch terminal state / Get / List that disagree).

Then unary throughput through HAProxy: GetTranscription (default view) and ListTranscriptions
(default page size, the tenant key, so pages of 50) with ``--unary-inflight`` (32) calls in flight
for ``--unary-seconds`` each: RPS, p50/p95/p99.

Printed and written to ``<out>/loadtest.json``; ``<out>/loadtest-<clients>.png`` plots throughput,
latency, queue depth (RabbitMQ passive queue_declare message counts: the management API is not
needed) and server/worker RSS (psutil, children included) over time.

Why grpc.aio and not Locust: Watch is a long-lived server stream, one per phone for the whole
job. Locust's gRPC users run on gevent, which needs grpc's gevent integration
(grpc.experimental.gevent.init_gevent) and monkey patching, and Locust's statistics model a
request as one response time: a stream that lasts minutes and ends with a terminal event has no
place there (it would be one huge "request" or need custom events), and neither have the
load-specific checks (lost, duplicated, time to result). grpc.aio holds hundreds of streams on
one event loop without threads, uses the same generated stubs as the product, and is part of
grpcio, which the project already depends on; a Poisson arrival process and percentiles are a
few lines.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from grpc import aio  # noqa: E402

from mp4totext.v1 import (  # noqa: E402
    identity_pb2,
    identity_pb2_grpc,
    media_pb2,
    media_pb2_grpc,
    transcription_pb2_grpc,  # noqa: E402
)
from mp4totext.v1 import transcription_pb2 as tpb  # noqa: E402

MiB = 1024 * 1024
CHUNK = 1024 * 1024
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)
WATCH_RESUME = (*RETRYABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
TERMINAL = (tpb.TRANSCRIPTION_STATE_SUCCEEDED, tpb.TRANSCRIPTION_STATE_FAILED, tpb.TRANSCRIPTION_STATE_CANCELLED)
QUEUES = ("critical", "high", "default", "low")
# A local subchannel pool: every channel (phone) gets its own HTTP/2 connection. gRPC otherwise shares
# one connection among the channels of a process that have the same target and arguments.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * MiB), ("grpc.keepalive_time_ms", 30000),
                   ("grpc.use_local_subchannel_pool", 1)]

# Targets beside the figures: the product notes (../shared/seeds 000 and 003) and issue 14.
TARGETS = {
    "upload_success_rate": "> 0.90 (notes 000: load test)",
    "completion_rate": "> 0.85 (notes 000: transcription completion)",
    "uploads_per_s": "> 10 (notes 000)",
    "upload_latency_mean_s": "< 5 (notes 000: average upload)",
    "error_rate": "< 0.005 (notes 003)",
    "get_rps": ">= 1500 at p95 < 50 ms, 32 in flight (issue 14)",
    "list_rps": ">= 800 at p95 < 50 ms, 32 in flight (issue 14)",
}


# ---------------------------------------------------------------- statistics


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(xs: list[float]) -> dict[str, Any]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 4)

    return {"n": len(xs), "p50": r(pct(xs, 50)), "p95": r(pct(xs, 95)), "p99": r(pct(xs, 99)),
            "mean": r(statistics.fmean(xs)) if xs else None, "max": r(max(xs)) if xs else None}


# ---------------------------------------------------------------- gRPC status details


def _status_details(exc: grpc.RpcError) -> list[Any]:
    from google.rpc import status_pb2

    try:
        md = exc.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:
        return []
    for item in md:
        key, value = item if isinstance(item, tuple) else (item, md[item])
        if key == "grpc-status-details-bin":
            try:
                return list(status_pb2.Status.FromString(value).details)
            except Exception:
                return []
    return []


def retry_delay(exc: grpc.RpcError) -> float | None:
    from google.rpc import error_details_pb2

    for detail in _status_details(exc):
        info = error_details_pb2.RetryInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
            return info.retry_delay.ToTimedelta().total_seconds()
    return None


def over_quota(exc: grpc.RpcError) -> bool:
    from google.rpc import error_details_pb2

    return any(d.Is(error_details_pb2.QuotaFailure.DESCRIPTOR) for d in _status_details(exc))


def backoff(attempt: int, base: float = 0.2, cap: float = 5.0) -> float:
    return random.uniform(0, min(cap, base * 2 ** attempt))


# ---------------------------------------------------------------- one run of simulated clients


class GiveUp(Exception):
    """A call failed for good (not retryable, or the run's deadline passed)."""

    def __init__(self, method: str, code: str, message: str = "") -> None:
        super().__init__(f"{method}: {code} {message}")
        self.method, self.code = method, code


class Run:
    """One load run: ``clients`` phones arriving at ``rate``/s; everything it saw, timestamped."""

    def __init__(self, target: str, key: str, media: bytes, clients: int, rate: float, deadline_s: float,
                 language: str, shared_key: bool, seed: int) -> None:
        self.target, self.key, self.media = target, key, media
        self.clients, self.rate, self.deadline_s = clients, rate, deadline_s
        self.language, self.shared_key = language, shared_key
        self.rng = random.Random(seed)
        self.run_id = uuid.uuid4().hex[:10]
        self.t0 = 0.0
        self.hard_deadline = float("inf")
        self.codes: Counter[str] = Counter()  # "Method CODE" -> count (every non-OK answer, retried or not)
        self.events: list[tuple[float, str, float]] = []  # (t since start, kind, value)
        self.results: list[dict[str, Any]] = []
        self.active = 0
        self.calls = 0  # every attempt of every call, Watch streams included

    def now(self) -> float:
        return time.monotonic() - self.t0

    def note(self, kind: str, value: float = 0.0) -> None:
        self.events.append((self.now(), kind, value))

    async def call(self, method: str, fn: Any) -> Any:
        """``await fn()`` again after a retryable status, like the product's client, until the deadline."""
        attempt = 0
        while True:
            self.calls += 1
            try:
                return await fn()
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                self.codes[f"{method} {code.name}"] += 1
                if code not in RETRYABLE or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and over_quota(exc)):
                    raise GiveUp(method, code.name, exc.details() or "") from None  # type: ignore[attr-defined]
                delay = retry_delay(exc) or backoff(attempt)
                if time.monotonic() + delay > self.hard_deadline:
                    raise GiveUp(method, code.name, "deadline") from None
                await asyncio.sleep(delay)
                attempt += 1

    async def mint(self, ch: aio.Channel, i: int) -> str:
        if self.shared_key:
            return self.key
        stub = identity_pb2_grpc.IdentityServiceStub(ch)
        md = (("authorization", f"Bearer {self.key}"),)
        resp = await self.call("CreateUserToken", lambda: stub.CreateUserToken(
            identity_pb2.CreateUserTokenRequest(user_id=f"loadtest-{self.run_id}-{i}"), metadata=md, timeout=30))
        return resp.token

    async def phone(self, i: int, start_at: float) -> None:
        await asyncio.sleep(max(0.0, start_at - self.now()))
        r: dict[str, Any] = {"i": i, "arrive": round(self.now(), 3), "outcome": "failed"}
        self.results.append(r)
        self.active += 1
        self.note("arrive")
        upload_rid, create_rid = f"lt-{self.run_id}-{i}-u", f"lt-{self.run_id}-{i}-c"
        r["upload_request_id"], r["create_request_id"] = upload_rid, create_rid
        ch = aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        try:
            token = await self.mint(ch, i)
            md = (("authorization", f"Bearer {token}"),)
            media_stub = media_pb2_grpc.MediaServiceStub(ch)
            stub = transcription_pb2_grpc.TranscriptionServiceStub(ch)

            def upload_requests() -> list[media_pb2.UploadMediaRequest]:
                reqs = [media_pb2.UploadMediaRequest(metadata=media_pb2.UploadMetadata(
                    filename=f"phone-{i}.mp4", content_type="video/mp4", size_bytes=len(self.media),
                    request_id=upload_rid))]
                for off in range(0, len(self.media), CHUNK):
                    reqs.append(media_pb2.UploadMediaRequest(chunk=media_pb2.UploadChunk(
                        data=self.media[off:off + CHUNK], write_offset=off)))
                return reqs

            t = time.monotonic()
            media = (await self.call("UploadMedia", lambda: media_stub.UploadMedia(
                iter(upload_requests()), metadata=md, timeout=120))).media
            r["upload_s"] = time.monotonic() - t
            self.note("upload", r["upload_s"])
            r["media"] = media.name

            t = time.monotonic()
            job = await self.call("CreateTranscription", lambda: stub.CreateTranscription(
                tpb.CreateTranscriptionRequest(media=media.name, request_id=create_rid,
                                               config=tpb.TranscriptionConfig(language_code=self.language)),
                metadata=md, timeout=30))
            r["create_s"] = time.monotonic() - t
            self.note("create", r["create_s"])
            r["job"] = job.name
            created = time.monotonic()

            terminal = await self.watch(stub, md, job.name, r)
            r["watch_state"] = tpb.TranscriptionState.Name(terminal)
            final = await self.call("GetTranscription", lambda: stub.GetTranscription(
                tpb.GetTranscriptionRequest(name=job.name, view=tpb.TRANSCRIPTION_VIEW_FULL), metadata=md,
                timeout=30))
            r["get_state"] = tpb.TranscriptionState.Name(final.state)
            r["text"] = final.result.text
            if final.state != terminal:
                r["inconsistent"] = f"watch {r['watch_state']} but get {r['get_state']}"
            if final.state != tpb.TRANSCRIPTION_STATE_SUCCEEDED:
                r["error"] = f"job {r['get_state']}: {final.error_reason} {final.error_message}"[:300]
                self.note("failed")
                return
            r["result_s"] = time.monotonic() - created
            r["time_to_result_s"] = self.now() - r["arrive"]
            self.note("result", r["time_to_result_s"])

            async def export() -> bytes:
                out = b""
                async for part in stub.ExportTranscription(tpb.ExportTranscriptionRequest(
                        name=job.name, format=tpb.EXPORT_FORMAT_SRT), metadata=md, timeout=60):
                    out += part.data
                return out

            srt = await self.call("ExportTranscription", export)
            if not srt.strip() or b"-->" not in srt or not final.result.text.strip():
                r["error"] = "empty result or SRT"
                return
            r["outcome"] = "completed"
            r["done_s"] = self.now() - r["arrive"]
            self.note("completed")
        except GiveUp as exc:
            r["error"] = str(exc)[:300]
            if "job" in r and exc.code == "deadline":
                r["outcome"] = "lost"
        except asyncio.CancelledError:  # the run's deadline: whatever was created and not ended is lost
            r["outcome"] = "lost" if "job" in r else "failed"
            r["error"] = "deadline"
        except Exception as exc:  # noqa: BLE001 - a client bug must not stop the run; it is reported
            r["error"] = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            self.active -= 1
            await ch.close()

    async def watch(self, stub: Any, md: Any, name: str, r: dict[str, Any]) -> int:
        last, attempt, terminal_seen = 0, 0, None
        while True:
            self.calls += 1
            try:
                async for ev in stub.WatchTranscription(tpb.WatchTranscriptionRequest(name=name, after_sequence=last),
                                                        metadata=md):
                    if not ev.heartbeat:
                        last = max(last, ev.sequence)
                    if ev.state in TERMINAL:
                        if terminal_seen is not None and terminal_seen != ev.state:
                            r["inconsistent"] = f"two terminal Watch states {terminal_seen} {ev.state}"
                        terminal_seen = ev.state
                        if all(e.state in (tpb.ENHANCEMENT_STATE_SUCCEEDED, tpb.ENHANCEMENT_STATE_FAILED,
                                           tpb.ENHANCEMENT_STATE_CANCELLED) for e in ev.enhancements):
                            return ev.state
                self.codes["WatchTranscription ENDED_EARLY"] += 1  # stream ended without a terminal event
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                self.codes[f"WatchTranscription {code.name}"] += 1
                if code not in WATCH_RESUME:
                    raise GiveUp("WatchTranscription", code.name, exc.details() or "") from None  # type: ignore
            attempt += 1
            r["watch_reconnects"] = attempt
            delay = backoff(min(attempt, 5))
            if time.monotonic() + delay > self.hard_deadline:
                raise GiveUp("WatchTranscription", "deadline")
            await asyncio.sleep(delay)

    async def go(self, sampler: "Sampler | None") -> None:
        arrivals, t = [], 0.0
        for _ in range(self.clients):
            arrivals.append(t)
            t += self.rng.expovariate(self.rate) if self.rate > 0 else 0.0
        self.t0 = time.monotonic()
        self.hard_deadline = self.t0 + arrivals[-1] + self.deadline_s
        if sampler:
            sampler.begin(self)
        tasks = [asyncio.create_task(self.phone(i, at)) for i, at in enumerate(arrivals)]
        _done, pending = await asyncio.wait(tasks, timeout=self.hard_deadline - time.monotonic() + 5)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=30)
        self.wall_s = self.now()
        if sampler:
            sampler.end()

    # -------------------------------------------------------- after the run

    async def audit(self) -> dict[str, Any]:
        """With the tenant key: every job and media of this run by request_id (duplicates), and the
        final state of the jobs the phones lost, so "lost" means lost by the deadline."""
        md = (("authorization", f"Bearer {self.key}"),)
        ch = aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        try:
            stub = transcription_pb2_grpc.TranscriptionServiceStub(ch)
            media_stub = media_pb2_grpc.MediaServiceStub(ch)
            jobs: dict[str, list[tpb.Transcription]] = defaultdict(list)
            token = ""
            while True:
                resp = await self.call("ListTranscriptions", lambda: stub.ListTranscriptions(
                    tpb.ListTranscriptionsRequest(page_size=1000, page_token=token), metadata=md, timeout=60))
                for j in resp.transcriptions:
                    if j.request_id.startswith(f"lt-{self.run_id}-"):
                        jobs[j.request_id].append(j)
                token = resp.next_page_token
                if not token:
                    break
            medias: dict[str, int] = Counter()
            token = ""
            while True:
                resp = await self.call("ListMedia", lambda: media_stub.ListMedia(
                    media_pb2.ListMediaRequest(page_size=1000, page_token=token), metadata=md, timeout=60))
                for m in resp.media:
                    if m.request_id.startswith(f"lt-{self.run_id}-"):
                        medias[m.request_id] += 1
                token = resp.next_page_token
                if not token:
                    break
            dup_jobs = sorted(rid for rid, js in jobs.items() if len(js) > 1)
            dup_media = sorted(rid for rid, n in medias.items() if n > 1)
            disagree = []
            for r in self.results:
                listed = jobs.get(r["create_request_id"], [])
                if r.get("inconsistent"):
                    disagree.append(f"{r.get('job')}: {r['inconsistent']}")
                elif r.get("get_state") and listed and tpb.TranscriptionState.Name(listed[0].state) != r["get_state"]:
                    disagree.append(f"{r['job']}: get {r['get_state']} but list "
                                    f"{tpb.TranscriptionState.Name(listed[0].state)}")
                if r["outcome"] == "lost" and listed:
                    r["state_after_deadline"] = tpb.TranscriptionState.Name(listed[0].state)
            return {"jobs_listed": sum(len(js) for js in jobs.values()), "media_listed": sum(medias.values()),
                    "duplicate_job_request_ids": dup_jobs, "duplicate_media_request_ids": dup_media,
                    "terminal_disagreements": disagree}
        finally:
            await ch.close()

    def report(self, audit: dict[str, Any]) -> dict[str, Any]:
        outcomes = Counter(r["outcome"] for r in self.results)
        uploads = [r["upload_s"] for r in self.results if "upload_s" in r]
        upload_times = [t for t, k, _ in self.events if k == "upload"]
        arrivals = [t for t, k, _ in self.events if k == "arrive"]
        span = (max(upload_times) - min(arrivals)) if upload_times else 0.0  # first arrival -> last upload
        up_span = (max(upload_times) - min(upload_times)) if upload_times else 0.0
        done = [t for t, k, _ in self.events if k == "completed"]
        errors = {r["error"] for r in self.results if r.get("error")}
        calls_failed = sum(self.codes.values())
        duplicated = (len(audit["duplicate_job_request_ids"]) + len(audit["duplicate_media_request_ids"])
                      + len(audit["terminal_disagreements"]))
        return {
            "clients": self.clients, "rate_per_s": self.rate, "run_id": self.run_id, "wall_s": round(self.wall_s, 2),
            "completed": outcomes["completed"], "failed": outcomes["failed"], "lost": outcomes["lost"],
            "duplicated": duplicated,
            "all_succeeded": outcomes["completed"] == self.clients,
            "upload_success_rate": round(len(uploads) / self.clients, 4),
            "completion_rate": round(outcomes["completed"] / self.clients, 4),
            "upload_s": summary(uploads),
            "create_s": summary([r["create_s"] for r in self.results if "create_s" in r]),
            # uploads stored / (first arrival -> last upload stored): what the stack took while phones kept
            # arriving at the offered rate; the busiest 5 s window when the uploads lasted that long
            "uploads_per_s": round(len(uploads) / span, 2) if span > 0 else None,
            "uploads_per_s_peak_5s": round(max(sum(1 for u in upload_times if t - 5 < u <= t)
                                               for t in upload_times) / 5, 2) if up_span >= 5 else None,
            "offered_uploads_per_s": self.rate,
            "time_to_result_s": summary([r["time_to_result_s"] for r in self.results if "time_to_result_s" in r]),
            "job_s_created_to_result": summary([r["result_s"] for r in self.results if "result_s" in r]),
            "results_per_s": round(len(done) / (max(done) - min(upload_times)), 3) if done and upload_times and
            max(done) > min(upload_times) else None,
            "error_codes": dict(self.codes.most_common()),
            "non_ok_answers": calls_failed,
            "calls": self.calls,
            "non_ok_rate": round(calls_failed / self.calls, 4) if self.calls else None,
            "client_errors": sorted(errors)[:20],
            "per_client": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "text"}
                           for r in sorted(self.results, key=lambda r: r["i"])],
            "audit": audit,
        }


# ---------------------------------------------------------------- sampling: RSS and queue depth


class Sampler:
    """Every ``interval`` s, in a thread: RSS of the processes we started (children included) and
    RabbitMQ queue depth (passive queue_declare: ready messages, and delayed ones in <queue>.DQ)."""

    def __init__(self, pids: dict[str, list[int]], broker_url: str | None, interval: float = 1.0) -> None:
        self.pids, self.broker_url, self.interval = pids, broker_url, interval
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.run: Run | None = None

    def begin(self, run: Run) -> None:
        self.run, self.samples = run, []
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def end(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def rss(self) -> dict[str, float]:
        import psutil

        out: dict[str, float] = {}
        for role, pids in self.pids.items():
            total = 0
            for pid in pids:
                try:
                    p = psutil.Process(pid)
                    total += p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                except psutil.Error:
                    continue
            out[role] = round(total / MiB, 1)
        return out

    def _loop(self) -> None:
        conn = None
        while not self._stop.is_set():
            row: dict[str, Any] = {"t": round(self.run.now(), 2) if self.run else 0.0,
                                   "active_clients": self.run.active if self.run else 0, "rss_mib": self.rss()}
            if self.broker_url:
                try:
                    import pika

                    if conn is None or conn.is_closed:
                        params = pika.URLParameters(self.broker_url)
                        params.socket_timeout = 3
                        conn = pika.BlockingConnection(params)
                    depth = {}
                    for q in QUEUES:
                        for name in (q, f"{q}.DQ"):
                            ch = conn.channel()
                            try:
                                depth[name] = ch.queue_declare(name, passive=True).method.message_count
                                ch.close()
                            except pika.exceptions.ChannelClosedByBroker:
                                depth[name] = 0
                    row["queue_ready"] = depth
                except Exception as exc:  # noqa: BLE001 - a broker hiccup is a gap in the plot, not a failed run
                    row["queue_error"] = type(exc).__name__
                    conn = None
            self.samples.append(row)
            self._stop.wait(self.interval)
        if conn is not None and conn.is_open:
            conn.close()

    def summary(self) -> dict[str, Any]:
        roles = sorted({r for s in self.samples for r in s["rss_mib"]})
        rss = {role: {"start_mib": self.samples[0]["rss_mib"].get(role) if self.samples else None,
                      "peak_mib": max((s["rss_mib"].get(role, 0) for s in self.samples), default=None),
                      "end_mib": self.samples[-1]["rss_mib"].get(role) if self.samples else None}
               for role in roles}
        depth = [s for s in self.samples if "queue_ready" in s]
        peak = {q: max(s["queue_ready"].get(q, 0) for s in depth) for q in (depth[0]["queue_ready"] if depth else {})}
        return {"rss": rss, "queue_peak": {q: n for q, n in peak.items() if n or "." not in q}}


# ---------------------------------------------------------------- unary throughput


def _cpu_s(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


async def unary_rps(target: str, key: str, names: list[str], seconds: float, inflight: int,
                    channels: int = 4, pids: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """GetTranscription and ListTranscriptions with ``inflight`` calls in flight for ``seconds`` each,
    with the CPU (cores busy) of this load generator and of each sampled process meanwhile."""
    roles = {"load generator": [os.getpid()], **(pids or {})}
    md = (("authorization", f"Bearer {key}"),)
    chans = [aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(channels)]
    stubs = [transcription_pb2_grpc.TranscriptionServiceStub(c) for c in chans]
    out: dict[str, Any] = {"inflight": inflight, "seconds": seconds, "channels": channels}
    try:
        kinds = {
            "get": lambda s, i: s.GetTranscription(tpb.GetTranscriptionRequest(name=names[i % len(names)]),
                                                   metadata=md, timeout=10),
            "list": lambda s, i: s.ListTranscriptions(tpb.ListTranscriptionsRequest(), metadata=md, timeout=10),
        }
        for kind, fn in kinds.items():
            for i in range(64):  # warm-up: connections, caches
                await fn(stubs[i % channels], i)
            lat: list[float] = []
            codes: Counter[str] = Counter()
            end = time.monotonic() + seconds

            async def worker(w: int) -> None:
                i = w
                while time.monotonic() < end:
                    t = time.perf_counter()
                    try:
                        await fn(stubs[w % channels], i)
                        lat.append(time.perf_counter() - t)
                    except grpc.RpcError as exc:
                        codes[exc.code().name] += 1  # type: ignore[attr-defined]
                    i += inflight

            cpu0 = {role: _cpu_s(p) for role, p in roles.items()}
            t0 = time.monotonic()
            await asyncio.gather(*(worker(w) for w in range(inflight)))
            took = time.monotonic() - t0
            cores = {role: round((_cpu_s(p) - cpu0[role]) / took, 2) for role, p in roles.items()}
            s = summary(lat)
            out[kind] = {"rps": round(len(lat) / took, 1), "ok": len(lat), "errors": dict(codes),
                         "p50_ms": round(s["p50"] * 1000, 2) if lat else None,
                         "p95_ms": round(s["p95"] * 1000, 2) if lat else None,
                         "p99_ms": round(s["p99"] * 1000, 2) if lat else None, "cpu_cores_busy": cores}
        out["get"]["request"] = "GetTranscription, view unset (FULL), of the run's SUCCEEDED jobs in turn"
        out["list"]["request"] = "ListTranscriptions, tenant key, no filter, default page size (50)"
    finally:
        for c in chans:
            await c.close()
    return out


# ---------------------------------------------------------------- plot


def plot(run_report: dict[str, Any], events: list[tuple[float, str, float]], samples: list[dict[str, Any]],
         path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max([t for t, _, _ in events] + [s["t"] for s in samples] + [1.0])
    width = max(1.0, round(end / 60))  # about 60 bins
    bins = int(end // width) + 1
    xs = [b * width for b in range(bins)]

    def rate(kind: str) -> list[float]:
        counts = [0] * bins
        for t, k, _ in events:
            if k == kind:
                counts[int(t // width)] += 1
        return [c / width for c in counts]

    fig, axes = plt.subplots(4, 1, figsize=(11, 13), sharex=True)
    ax = axes[0]
    for kind, label in (("arrive", "phones arriving"), ("upload", "uploads done"), ("completed", "results + SRT read")):
        ax.step(xs, rate(kind), where="post", label=f"{label} /s")
    ax.set_ylabel("per second")
    ax.set_title(f"{run_report['clients']} clients at {run_report['rate_per_s']}/s: completed "
                 f"{run_report['completed']}, failed {run_report['failed']}, lost {run_report['lost']}, "
                 f"duplicated {run_report['duplicated']}")
    ax.legend(loc="upper right")
    ax = axes[1]
    for kind, label, marker in (("upload", "upload", "."), ("create", "create", "x")):
        pts = [(t, v * 1000) for t, k, v in events if k == kind]
        if pts:
            ax.scatter(*zip(*pts), s=6, marker=marker, label=f"{label} latency (ms)")
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.legend(loc="upper right")
    ax = axes[2]
    pts = [(t, v) for t, k, v in events if k == "result"]
    if pts:
        ax.scatter(*zip(*pts), s=6, color="tab:green", label="time to result (s), at the time it was read")
    ax.set_ylabel("s")
    ax2 = ax.twinx()
    qs = [s for s in samples if "queue_ready" in s]
    for q in ("critical", "high"):
        if qs:
            ax2.plot([s["t"] for s in qs], [s["queue_ready"].get(q, 0) for s in qs], label=f"queue {q} (ready)")
    ax2.plot([s["t"] for s in samples], [s["active_clients"] for s in samples], "k--", label="phones in flight")
    ax2.set_ylabel("messages / phones")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax = axes[3]
    roles = sorted({r for s in samples for r in s["rss_mib"]})
    for role in roles:
        ax.plot([s["t"] for s in samples], [s["rss_mib"].get(role, 0) for s in samples], label=role)
    ax.set_ylabel("RSS MiB")
    ax.set_xlabel("seconds since the first arrival")
    if roles:
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------- our own stack


class OwnStack:
    """SeaweedFS + a RabbitMQ vhost + a PostgreSQL database + servers + workers + HAProxy."""

    def __init__(self, tmp: pathlib.Path, servers: int, high_workers: int, rate_limit: int) -> None:
        self.tmp, self.n_servers, self.high_workers, self.rate_limit = tmp, servers, high_workers, rate_limit
        self.log_dir = tmp / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Any] = []
        self.vhost = self.db_name = ""
        self.pg_dsn = os.environ.get("MP4T_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
        self.weed: Any = None
        self.stack: Any = None
        self.haproxy: Any = None

    def start(self) -> None:
        from tests.support import Stack, free_port, haproxy_config, port_open, wait_for
        from tests.support.procs import Proc
        from tests.support.s3 import SeaweedS3

        for host, port, what in (("127.0.0.1", 5672, "RabbitMQ"), ("127.0.0.1", 5432, "PostgreSQL")):
            if not port_open(host, port):
                raise SystemExit(f"{what} is not listening on {host}:{port}")
        if shutil.which("haproxy") is None:
            raise SystemExit("haproxy not found (apt-get install haproxy)")
        weed = shutil.which("weed") or str(pathlib.Path(sys.executable).parent / "weed")
        self.weed = SeaweedS3(weed, self.tmp / "weed", self.log_dir)
        (self.tmp / "weed").mkdir(exist_ok=True)
        self.weed.start()
        self.vhost = f"mp4t-load-{uuid.uuid4().hex[:8]}"
        subprocess.run(["rabbitmqctl", "add_vhost", self.vhost], check=True, capture_output=True)
        subprocess.run(["rabbitmqctl", "set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*"], check=True,
                       capture_output=True)
        import psycopg2

        self.db_name = f"mp4t_load_{uuid.uuid4().hex[:8]}"
        conn = psycopg2.connect(self.pg_dsn + "/postgres")
        conn.autocommit = True
        conn.cursor().execute(f"CREATE DATABASE {self.db_name}")
        conn.close()
        s3 = self.weed.info
        self.broker_url = f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MP4T_")}
        env.update({
            "MP4T_DATABASE_URL": f"{self.pg_dsn}/{self.db_name}", "MP4T_BROKER_URL": self.broker_url,
            "MP4T_STORAGE_BACKEND": "s3", "MP4T_S3_ENDPOINT": s3["endpoint"], "MP4T_S3_ACCESS_KEY": s3["access_key"],
            "MP4T_S3_SECRET_KEY": s3["secret_key"], "MP4T_S3_BUCKET": s3["bucket"],
            "MP4T_DATA_DIR": str(self.tmp / "data"), "MP4T_LOG_FORMAT": "json", "MP4T_WHISPER_MODELS": "tiny.en",
            "PYTHONUNBUFFERED": "1",
        })
        self.stack = Stack(env, self.log_dir, s3)
        for _ in range(self.n_servers):
            self.stack.start_server()
        self.stack.start_worker("critical,low")
        self.stack.start_worker("high")
        self.extra_high = [Proc(f"worker-high-{k}", [*_cli(), "worker", "--queues", "high"],
                                {**env, "MP4T_HTTP_LISTEN": "127.0.0.1:0"}, self.log_dir)
                           for k in range(1, self.high_workers)]
        slots = [(f"s{k + 1}", int(t.rsplit(":", 1)[1]), self.stack.http_ports[p], self.stack.agent_ports[p])
                 for k, (p, t) in enumerate(zip(self.stack.servers, self.stack.targets))]
        cfg = self.tmp / "haproxy.cfg"
        cfg.write_text(haproxy_config(slots))
        for attempt in range(5):
            self.port, stats = free_port(), free_port()
            henv = {**os.environ, "MP4T_HAPROXY_GRPC_BIND": f"127.0.0.1:{self.port}",
                    "MP4T_HAPROXY_STATS_BIND": f"127.0.0.1:{stats}", "MP4T_RATE_LIMIT_PER_S": str(self.rate_limit),
                    "MP4T_RATE_LIMIT_PER_KEY_S": str(self.rate_limit)}
            self.haproxy = Proc("haproxy", ["haproxy", "-db", "-f", str(cfg)], henv, self.log_dir)
            time.sleep(0.3)
            if self.haproxy.alive():
                break
        from tests.support import grpc_ready

        grpc_ready(self.target)
        wait_for(lambda: _all_up(stats, self.n_servers), 30, "every server UP in HAProxy")
        for p in self.extra_high:
            wait_for(lambda: "worker_started" in p.log() or not p.alive(), 120, "extra transcription worker")
        out = subprocess.run([*_cli(), "create-key", "--tenant", "loadtest"], env=env, capture_output=True,
                             text=True, check=True, cwd=ROOT)
        self.key = json.loads(out.stdout)["api_key"]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pids(self) -> dict[str, list[int]]:
        out = {f"server{k + 1}": [p.pid] for k, p in enumerate(self.stack.servers)}
        for q, p in self.stack.workers.items():
            out[f"worker {q}"] = [p.pid]
        for k, p in enumerate(self.extra_high):
            out[f"worker high-{k + 1}"] = [p.pid]
        out["haproxy"] = [self.haproxy.pid]
        out["seaweedfs"] = [self.weed.proc.pid]
        return out

    def stop(self) -> None:
        for p in [self.haproxy, *getattr(self, "extra_high", [])]:
            if p is not None:
                p.stop()
        if self.stack is not None:
            self.stack.stop()
        if self.weed is not None:
            self.weed.stop()
        if self.vhost:
            subprocess.run(["rabbitmqctl", "delete_vhost", self.vhost], capture_output=True)
        if self.db_name:
            import psycopg2

            conn = psycopg2.connect(self.pg_dsn + "/postgres")
            conn.autocommit = True
            conn.cursor().execute(f"DROP DATABASE IF EXISTS {self.db_name} WITH (FORCE)")
            conn.close()


def _cli() -> list[str]:
    from tests.support import CLI

    return CLI


def _all_up(stats_port: int, n: int) -> bool:
    import csv
    import io
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=2) as r:
            rows = list(csv.DictReader(io.StringIO(r.read().decode().lstrip("# "))))
    except OSError:
        return False
    up = [row for row in rows if row["pxname"] == "grpc_api" and row["svname"] not in ("BACKEND", "FRONTEND")
          and row["status"] == "UP"]
    return len(up) >= n


# ---------------------------------------------------------------- main


def print_run(rep: dict[str, Any]) -> None:
    def ms(s: dict[str, Any]) -> str:
        if not s["n"]:
            return "-"
        return "/".join(f"{s[p] * 1000:.0f}" for p in ("p50", "p95", "p99")) + " ms"

    def sec(s: dict[str, Any]) -> str:
        return "-" if not s["n"] else f"{s['p50']:.1f} / {s['p95']:.1f} s"

    rows = [
        ("clients / arrival rate", f"{rep['clients']} / {rep['rate_per_s']}/s (wall {rep['wall_s']} s)"),
        ("completed / failed / lost / duplicated", f"{rep['completed']} / {rep['failed']} / {rep['lost']} / "
                                                   f"{rep['duplicated']}"),
        ("upload success rate", f"{rep['upload_success_rate']:.3f}   target {TARGETS['upload_success_rate']}"),
        ("completion rate", f"{rep['completion_rate']:.3f}   target {TARGETS['completion_rate']}"),
        ("upload latency p50/p95/p99", ms(rep["upload_s"]) + f"   mean {rep['upload_s']['mean'] or 0:.3f} s, target "
                                                             f"{TARGETS['upload_latency_mean_s']}"),
        ("create latency p50/p95/p99", ms(rep["create_s"])),
        ("uploads per second (taken; peak 5 s)", f"{rep['uploads_per_s']}; {rep['uploads_per_s_peak_5s']}   "
                                                 f"target {TARGETS['uploads_per_s']}"),
        ("time to result p50 / p95", sec(rep["time_to_result_s"])),
        ("results per second", f"{rep['results_per_s']}"),
        ("non-OK answers (retried or not)", (json.dumps(rep["error_codes"]) if rep["error_codes"] else "none")
         + f"   {rep['non_ok_answers']} of {rep['calls']} calls = {rep['non_ok_rate']}, "
           f"target {TARGETS['error_rate']}"),
    ]
    for role, r in rep.get("resources", {}).get("rss", {}).items():
        rows.append((f"RSS {role} start/peak/end", f"{r['start_mib']:.0f} / {r['peak_mib']:.0f} / "
                                                   f"{r['end_mib']:.0f} MiB"))
    if rep.get("resources", {}).get("queue_peak"):
        rows.append(("queue depth peak (ready)", json.dumps(rep["resources"]["queue_peak"])))
    if rep["client_errors"]:
        rows.append(("client errors (first)", "; ".join(rep["client_errors"][:3])))
    width = max(len(k) for k, _ in rows)
    print(f"\n== {rep['clients']} clients")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def print_unary(u: dict[str, Any]) -> None:
    print(f"\n== unary through HAProxy, {u['inflight']} in flight, {u['seconds']} s each")
    for kind, target in (("get", TARGETS["get_rps"]), ("list", TARGETS["list_rps"])):
        r = u[kind]
        print(f"  {kind:<5} {r['rps']:>8.1f} RPS  p50 {r['p50_ms']} ms  p95 {r['p95_ms']} ms  p99 {r['p99_ms']} ms"
              f"  errors {r['errors'] or 0}   target {target}")
        print(f"        CPU cores busy: {json.dumps(r['cpu_cores_busy'])}")


async def run_all(args: argparse.Namespace, target: str, key: str, media: bytes, sampler: Sampler,
                  out: pathlib.Path, header: dict[str, Any]) -> dict[str, Any]:
    runs = []
    names: list[str] = []
    for n in args.clients:
        run = Run(target, key, media, n, args.rate, args.deadline, args.language, args.shared_key, args.seed)
        await run.go(sampler)
        rep = run.report(await run.audit())
        rep["resources"] = sampler.summary()
        rep["timeseries"] = {"samples": sampler.samples,
                             "events": [(round(t, 3), k, round(v, 4)) for t, k, v in run.events]}
        rep["plot"] = str(out / f"loadtest-{n}.png")
        plot(rep, run.events, sampler.samples, pathlib.Path(rep["plot"]))
        print_run(rep)
        runs.append(rep)
        (out / "loadtest.json").write_text(json.dumps({**header, "runs": runs, "unary": None}, indent=1))
        names += [r["job"] for r in run.results if r["outcome"] == "completed"]
        if args.settle and n != args.clients[-1]:
            await asyncio.sleep(args.settle)
    unary = None
    if args.unary_seconds > 0 and names:
        unary = await unary_rps(target, key, names, args.unary_seconds, args.unary_inflight, pids=sampler.pids)
        print_unary(unary)
    return {"runs": runs, "unary": unary}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[50], help="concurrent clients (one job each); "
                    "several values run one after the other on the same stack")
    ap.add_argument("--rate", type=float, default=10.0, help="arrivals per second (Poisson); 0 = all at once")
    ap.add_argument("--deadline", type=float, default=900.0, help="seconds after the last arrival before "
                    "unfinished jobs count as lost")
    ap.add_argument("--media-s", type=float, default=3.0, help="seconds of generated speech per upload")
    ap.add_argument("--language", default="en")
    ap.add_argument("--out", default="loadtest-report")
    ap.add_argument("--unary-seconds", type=float, default=10.0, help="0 skips the unary Get/List measurement")
    ap.add_argument("--unary-inflight", type=int, default=32)
    ap.add_argument("--settle", type=float, default=3.0, help="pause between runs of several --clients values")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--shared-key", action="store_true", help="every client uses the API key (no user tokens)")
    ap.add_argument("--target", help="an existing HAProxy/server (host:port) instead of our own stack")
    ap.add_argument("--key", default=os.environ.get("MP4T_API_KEY", ""), help="the tenant API key for --target")
    ap.add_argument("--broker-url", help="with --target: amqp URL of its vhost, for queue depth")
    ap.add_argument("--pid", action="append", default=[], metavar="ROLE=PID",
                    help="with --target: processes whose RSS to sample (repeatable)")
    ap.add_argument("--servers", type=int, default=2, help="server replicas behind HAProxy (own stack)")
    ap.add_argument("--high-workers", type=int, default=1, help="transcription worker processes (own stack)")
    ap.add_argument("--haproxy-rate-limit", type=int, default=100000,
                    help="own stack: HAProxy's per-address and per-key RPC/s limits (all phones share 127.0.0.1)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    args = ap.parse_args(argv)
    if args.target and not args.key:
        ap.error("--target needs --key (or MP4T_API_KEY)")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="mp4t-load-"))
    stack: OwnStack | None = None
    ok = False
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    try:
        from mp4totext import samples

        media_path = samples.make_media(samples.lecture_text(args.media_s), str(tmp / "speech.mp4"))
        media = pathlib.Path(media_path).read_bytes()
        if args.target:
            target, key = args.target, args.key
            pids: dict[str, list[int]] = defaultdict(list)
            for item in args.pid:
                role, _, pid = item.partition("=")
                pids[role].append(int(pid))
            broker = args.broker_url
        else:
            print(f"starting the stack in {tmp} ...", flush=True)
            t = time.monotonic()
            stack = OwnStack(tmp, args.servers, args.high_workers, args.haproxy_rate_limit)
            stack.start()
            target, key, pids, broker = stack.target, stack.key, stack.pids(), stack.broker_url
            print(f"stack up in {time.monotonic() - t:.0f} s: HAProxy {target} -> {args.servers} servers, "
                  f"{args.high_workers} transcription worker(s)", flush=True)
        sampler = Sampler(dict(pids), broker)
        header = {
            "started": started, "cpus": os.cpu_count(), "target": target, "own_stack": stack is not None,
            "servers": args.servers if stack else None, "high_workers": args.high_workers if stack else None,
            "media": {"seconds": args.media_s, "bytes": len(media), "language": args.language},
            "rate_per_s": args.rate, "deadline_s": args.deadline, "user_tokens": not args.shared_key,
            "targets": TARGETS,
        }
        result = asyncio.run(run_all(args, target, key, media, sampler, out, header))
        report = {**header, **result}
        (out / "loadtest.json").write_text(json.dumps(report, indent=1))
        print(f"\nreport: {out / 'loadtest.json'}; plots: {', '.join(r['plot'] for r in result['runs'])}")
        ok = all(r["lost"] == 0 and r["duplicated"] == 0 for r in result["runs"])
        return 0 if ok else 1
    finally:
        if stack is not None:
            stack.stop()
        if args.keep or not ok:
            print(f"logs and data kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
