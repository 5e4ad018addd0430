"""Ceilings of the shared components on this machine, each as a rate (issue 14, docs/capacity.md).

    .venv/bin/python bench/capacity.py [--seconds 5] [--json PATH] [--history-rows 120000]
                                       [--skip-db] [--skip-broker] [--skip-s3] [--skip-prepare]

Every figure runs the product's own code against the real services, on resources this script
creates and removes (a PostgreSQL database, a RabbitMQ vhost, a SeaweedFS server on free ports):

1. PostgreSQL (a fresh database, ``storage.schema.init_db`` through ``core.runtime.init``):
   - the per-job write pattern: one phone's job end to end, as the servers and workers run it
     (UploadMedia's checks and its media row with outbox message and usage; CreateTranscription's
     quota lock, row and reservation; prepare_media's claim and READY; the transcribe claim and
     stage_done with a 10-minute transcript; finalize; the phone's GetTranscription), with the
     ``core.jobs`` functions and the same statements, in 1, 4 and 8 client processes of one
     tenant (a mobile app is one tenant) and 8 processes of 8 tenants. Jobs/s, latency, SQL
     statements, commits, rows written (by table) and WAL per job, database bytes per job, and
     the CPU this database's PostgreSQL backends and the clients used per job;
   - a running job's once-a-second cost ("tick"): ``jobs.report_progress`` plus the watchdog's
     cancel/claim read, in 8 processes; and the outbox relay's look for unsent messages
     (``core.outbox.publish`` with nothing pending), which every server and worker process
     makes once a second;
   - table growth: ``--history-rows`` finished media and transcriptions of the same tenant are
     added, then the time of the upload backpressure check (``server.media_service._backpressure``,
     once per upload) and of the ``mp4t_jobs`` gauge's ``jobs.count_by_state`` (per server scrape).
   The broker is the in-process one here (``broker_url=memory``): publishing is measured in 2.
2. RabbitMQ (a fresh vhost, ``core.queue.make_broker``): confirmed publishes/s of the messages
   the product sends (``core.queue.enqueue``, 1 and 8 threads), their size, the consume + ack
   rate through Dramatiq's consumer (4 consumers, prefetch 4), and the progress bus
   (``mp4totext.events.RabbitBus``: 2 publishing processes, 4 subscribing "servers", each of
   which gets every event).
3. S3 (``weed server -s3`` started like the tests do, the product's ``storage.objects.S3Store``):
   PUT/s and GET/s of 30 KB objects (8 threads) and MiB/s for a 64 MiB object (multipart, the
   configured part size and parallelism).
4. Media preparation of a 10-minute upload: ``workers.stages.media.probe`` + ``extract_audio``
   on 600 s of AAC (the CPU a critical worker spends per upload, besides moving the bytes).

For each, the CPU the server side used is read from /proc (the backends of this database; all of
beam.smp, so other sessions' RabbitMQ traffic counts; this script's weed), so a rate can be
turned into "per core". Client and server share this machine's cores: the rates are what this
machine sustains, not what a dedicated server would.
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import itertools
import json
import multiprocessing as mp
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MP4T_LOG_LEVEL", "WARNING")

PG_DSN = "postgresql://postgres@127.0.0.1:5432"
RABBIT = "amqp://guest:guest@127.0.0.1:5672"
CLK = os.sysconf("SC_CLK_TCK")
UPLOAD_BYTES = 31_000  # recorded as the media's size (the load test's clip); bytes go to S3, not here
AUDIO_S = 600.0  # the product notes' 10-minute task
SMALL = 30 * 1024
LARGE = 64 * 1024 * 1024
FORK = mp.get_context("fork")
_TMP: list[pathlib.Path] = []  # the run's temporary directory (children are forked and see it)


# ---------------------------------------------------------------- measuring helpers


def proc_cpu(names: tuple[str, ...]) -> float:
    """CPU seconds (user + system) used so far by every live process whose name is in ``names``."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if comm in names:
            total += int(rest[11]) + int(rest[12])
    return total / CLK


def pid_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by the processes ``pids`` (gone ones count 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        total += int(rest[11]) + int(rest[12])
    return total / CLK


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all cores) so far."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / CLK


class Cpu:
    """CPU used by the server processes (``names``, or exactly ``pids`` where other sessions may
    run the same program) and by the whole machine between ``start`` and ``stop``."""

    def __init__(self, names: tuple[str, ...] = (), pids: list[int] | None = None) -> None:
        self.names, self.pids = names, pids

    def _server(self) -> float:
        return pid_cpu(self.pids) if self.pids is not None else proc_cpu(self.names)

    def start(self) -> None:
        self.t0, self.s0, self.m0 = time.monotonic(), self._server(), machine_busy()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        server = self._server() - self.s0
        machine = machine_busy() - self.m0
        return {"wall_s": wall, "server_cpu_s": server, "machine_cpu_s": machine,
                "server_cores": server / wall, "machine_cores": machine / wall}


def run_threads(cpu: Cpu, target: Callable[[int], None], threads: int) -> dict[str, float]:
    """``target(k)`` on ``threads`` threads, all joined, with ``cpu`` measuring around them."""
    cpu.start()
    ts = [threading.Thread(target=target, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return cpu.stop()


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def load_avg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# ---------------------------------------------------------------- 1. PostgreSQL


def transcript(seconds: float) -> dict[str, Any]:
    """A result the size of a real one: espeak-rate English (~157 words/min) with word timestamps."""
    from mp4totext import samples
    from mp4totext.contracts import Segment, TranscriptResult, Word

    words = samples.lecture_text(seconds).split()
    step = seconds / len(words)
    segments = []
    for sid, start in enumerate(range(0, len(words), 12)):
        chunk = words[start:start + 12]
        ws = [Word(word=" " + w, start=round((start + k) * step, 3), end=round((start + k + 0.9) * step, 3),
                   probability=round(0.8 + (hash(w) % 200) / 1000, 4)) for k, w in enumerate(chunk)]
        segments.append(Segment(id=sid, start=ws[0].start, end=ws[-1].end, text=" ".join(chunk), avg_logprob=-0.21,
                                no_speech_prob=0.01, words=ws, language="en"))
    return TranscriptResult(text=" ".join(words), language="en", language_probability=0.98, duration=seconds,
                            speech_duration=seconds * 0.9, segments=segments, model="tiny.en",
                            recognition_s=seconds / 9).to_json()


def _db_runtime(url: str) -> None:
    """The product's start-up, as a server or worker process does it (in-process broker and bus)."""
    from core import queue, runtime
    from mp4totext import config

    settings = config.reload(database_url=url, broker_url="memory", storage_backend="local",
                             data_dir=tempfile.mkdtemp(prefix="mp4t-cap-", dir=_TMP[0] if _TMP else None),
                             log_level="WARNING")
    runtime.init(settings)
    queue.make_broker(settings)


class Phone:
    """One phone's transcription, through the code the servers and workers run for it."""

    def __init__(self, tenant: str, user: str, result: dict[str, Any]) -> None:
        from mp4totext.contracts import JobConfig

        self.tenant, self.user, self.result = tenant, user, result
        self.config = JobConfig(language_code="en", language="en").to_json()
        self.n = 0

    def upload(self) -> str:
        """UploadMedia after its bytes were stored: idempotency lookup, quota and backpressure
        checks, then the media row with its prepare_media message and usage (server._record)."""
        from core import outbox, quotas, usage
        from mp4totext.contracts import Priority, broker_priority
        from server import media_service
        from server.resources import media_by_request_id
        from storage.db import Media, locked, new_id
        from storage.objects import original_key

        self.n += 1
        self.rid = f"{self.user}-{self.n}-{uuid.uuid4().hex[:6]}"
        media_by_request_id(self.tenant, self.rid)
        quotas.check_upload(self.tenant, UPLOAD_BYTES)
        media_service._backpressure(self.tenant)
        media_id = new_id()
        with outbox.sending(), locked():
            Media.create(id=media_id, tenant=self.tenant, request_id=self.rid, filename="lecture.mp4",
                         content_type="video/mp4", size_bytes=UPLOAD_BYTES, sha256="0" * 64,
                         object_key=original_key(self.tenant, media_id), trace_context=None, owner=self.user)
            outbox.add("prepare_media", media_id, broker_priority(Priority.NORMAL), None)
            usage.on_upload(self.tenant, self.user, UPLOAD_BYTES)
        return media_id

    def create(self, media_id: str) -> str:
        """CreateTranscription right after the upload (the media is still being prepared)."""
        from core import jobs, outbox, quotas
        from mp4totext.contracts import Priority, broker_priority
        from server.resources import get_media, job_by_request_id
        from storage.db import Transcription, locked

        media = get_media(f"media/{media_id}")
        job_by_request_id(self.tenant, self.rid)
        with locked():
            reservation = quotas.admit(self.tenant, media.duration_s, self.config)
            job = Transcription.create(tenant=self.tenant, media=media.id, request_id=self.rid, config=self.config,
                                       priority=broker_priority(Priority.NORMAL), duration_s=media.duration_s,
                                       trace_context=None, ai_items=0, owner=self.user)
            quotas.reserve(job.id, self.tenant, reservation)
        with outbox.sending():
            jobs.to_waiting(job.id)
        return job.id

    def prepare(self, media_id: str) -> None:
        """prepare_media on a critical worker: claim, READY, start the waiting job."""
        from core import jobs
        from storage.objects import audio_key
        from workers import pipeline

        msg = uuid.uuid4().hex
        claim = jobs.claim_media(media_id, msg, 3, 600.0)
        assert claim.outcome.value == "run", claim.outcome
        assert jobs.media_ready(media_id, msg, duration_s=AUDIO_S, format_name="mov,mp4,m4a,3gp,3g2,mj2",
                                audio_codec="aac", audio_key=audio_key(self.tenant, media_id))
        pipeline.start_waiting_jobs(media_id)

    def claim(self, job_id: str) -> str:
        """The transcribe stage's claim on a transcription worker, and its read of the media row."""
        from core import jobs
        from mp4totext.contracts import Stage
        from storage.db import Media, Transcription, connection

        msg = uuid.uuid4().hex
        claim = jobs.claim_stage(job_id, (Stage.WAITING, Stage.TRANSCRIBING), Stage.TRANSCRIBING, msg, 3, 600.0)
        assert claim.outcome.value == "run", claim.outcome
        with connection():
            Media.get_by_id(Transcription.get_by_id(job_id).media_id)
        return msg

    def tick(self, job_id: str, msg: str, done_s: float) -> None:
        """What a running transcription costs each second: its progress write (and live event)
        and the watchdog's cancel/claim read (MP4T_PROGRESS_INTERVAL_S, MP4T_CANCEL_POLL_S = 1 s)."""
        from core import jobs
        from storage.db import Transcription
        from workers import pipeline

        jobs.report_progress(job_id, msg, done_s, AUDIO_S, span=(5.0, 95.0))
        assert pipeline.stop_reason(Transcription, job_id, msg) is None

    def finish(self, job_id: str, msg: str) -> None:
        """stage_done with the transcript, finalize, and the phone reading the result."""
        from core import jobs, outbox
        from mp4totext.contracts import JobState, Stage
        from server.resources import get_job

        with outbox.sending():
            assert jobs.stage_done(job_id, msg, Stage.FINALIZING, result=self.result) is not None
        with outbox.sending():
            assert jobs.finish(job_id, JobState.SUCCEEDED, only_stage=Stage.FINALIZING) is not None
        get_job(f"transcriptions/{job_id}")

    def job(self) -> None:
        """A whole job without its progress ticks (measured apart: they scale with its length)."""
        from server.auth import current_tenant, current_user

        current_tenant.set(self.tenant)
        current_user.set(self.user)
        media_id = self.upload()
        job_id = self.create(media_id)
        self.prepare(media_id)
        msg = self.claim(job_id)
        self.finish(job_id, msg)

    def running(self) -> tuple[str, str]:
        """A job up to its running transcribe stage (for the tick measurement)."""
        from server.auth import current_tenant, current_user

        current_tenant.set(self.tenant)
        current_user.set(self.user)
        media_id = self.upload()
        job_id = self.create(media_id)
        self.prepare(media_id)
        return job_id, self.claim(job_id)


def _flush_stub_broker() -> None:
    from core import queue

    queue.get_broker().flush_all()


def _count_statements(fn: Callable[[], None]) -> int:
    """SQL statements ``fn`` sends (peewee's execute_sql calls)."""
    from storage.db import database

    db = database.obj
    count = [0]
    original = db.execute_sql

    def counting(*a: Any, **kw: Any) -> Any:
        count[0] += 1
        return original(*a, **kw)

    db.execute_sql = counting
    try:
        fn()
    finally:
        db.execute_sql = original
    return count[0]


def _db_child(url: str, tenant: str, idx: int, mode: str, seconds: float, result: dict[str, Any],
              ready: Any, warm_up: Any, start: Any, release: Any, out: Any) -> None:
    from core import outbox

    try:
        # Every process start runs the schema check (CREATE INDEX IF NOT EXISTS, a SHARE lock on each
        # table until it commits): all processes start before any of them writes, or a starting one
        # deadlocks with the writers (seen in the first run of this script).
        _db_runtime(url)
        ready.put(idx)
        warm_up.wait()
        phone = Phone(tenant, f"user-{idx}", result)
        statements = _count_statements(phone.job)  # also the warm-up
        warm = 1
        running = []
        if mode == "tick":
            running = [phone.running() for _ in range(10)]
            warm += 10
        _flush_stub_broker()
        ready.put(idx)
        start.wait()
        cpu0 = time.process_time()
        deadline = time.monotonic() + seconds
        count, lat = 0, []
        done_s = 1.0
        cycle = itertools.cycle(running)
        while time.monotonic() < deadline:
            t = time.perf_counter()
            if mode == "tick":
                job_id, msg = next(cycle)
                phone.tick(job_id, msg, done_s)
                done_s = min(done_s + 0.5, AUDIO_S)
            elif mode == "poll":
                outbox.publish()  # the outbox relay's once-a-second look (nothing pending)
            else:
                phone.job()
            lat.append(time.perf_counter() - t)
            count += 1
            if count % 200 == 0:
                _flush_stub_broker()
        out.put({"idx": idx, "count": count, "lat": lat, "warm": warm, "statements": statements,
                 "client_cpu_s": time.process_time() - cpu0})
        release.wait()
    except BaseException as exc:  # reported to the parent, which fails the run
        out.put({"idx": idx, "error": f"{type(exc).__name__}: {exc}"})
        raise


def _pg(dbname: str = "postgres") -> Any:
    import psycopg2

    conn = psycopg2.connect(f"{PG_DSN}/{dbname}")
    conn.autocommit = True
    return conn


def _pg_stats(admin: Any, name: str) -> dict[str, int]:
    cur = admin.cursor()
    cur.execute("SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, tup_fetched, "
                "pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint, pg_database_size(datname) "
                "FROM pg_stat_database WHERE datname = %s", (name,))
    keys = ("commits", "rollbacks", "inserted", "updated", "deleted", "fetched", "wal_bytes", "db_bytes")
    return dict(zip(keys, (int(v) for v in cur.fetchone())))


def _table_stats(conn: Any) -> dict[str, tuple[int, int, int, int]]:
    """(inserted, updated, deleted, HOT-updated) rows per table of the database; a TOAST table
    is named after its table."""
    cur = conn.cursor()
    cur.execute("SELECT COALESCE(o.relname || ' (TOAST)', c.relname), s.n_tup_ins, s.n_tup_upd, s.n_tup_del, "
                "s.n_tup_hot_upd FROM pg_stat_all_tables s JOIN pg_class c ON c.oid = s.relid "
                "LEFT JOIN pg_class o ON o.reltoastrelid = c.oid WHERE s.schemaname IN ('public', 'pg_toast')")
    return {r[0]: tuple(int(x) for x in r[1:]) for r in cur.fetchall()}


def _backends(admin: Any, name: str) -> list[int]:
    cur = admin.cursor()
    cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
    return [r[0] for r in cur.fetchall()]


def _setup_child(url: str, n_tenants: int, out: Any) -> None:
    from server.auth import create_key

    _db_runtime(url)
    out.put([create_key(f"capacity-{k}")[1].id for k in range(n_tenants)])


def _run_level(url: str, name: str, admin: Any, mine: Any, tenants: list[str], procs: int, mode: str,
               seconds: float, result: dict[str, Any]) -> dict[str, Any]:
    ready, out = FORK.Queue(), FORK.Queue()
    warm_up, start, release = FORK.Event(), FORK.Event(), FORK.Event()
    children = [FORK.Process(target=_db_child, args=(url, tenants[k % len(tenants)], k, mode, seconds, result,
                                                     ready, warm_up, start, release, out)) for k in range(procs)]
    for c in children:
        c.start()
    try:
        for _ in range(procs):
            ready.get(timeout=120)
        time.sleep(0.7)  # the schema checks' statistics flushed
        before, tables0 = _pg_stats(admin, name), _table_stats(mine)
        warm_up.set()
        for _ in range(procs):
            ready.get(timeout=120)
        # the backends of this database (other sessions' PostgreSQL work is not counted); the
        # shared WAL writer, checkpointer and autovacuum are left out
        cpu = Cpu(pids=_backends(admin, name))
        wal0 = _pg_stats(admin, name)["wal_bytes"]
        cpu.start()
        start.set()
        answers = [out.get(timeout=seconds + 120) for _ in range(procs)]
        used = cpu.stop()
        wal_timed = _pg_stats(admin, name)["wal_bytes"] - wal0  # the whole cluster's WAL: other sessions count
    finally:
        release.set()
        for c in children:
            c.join(timeout=30)
            if c.is_alive():
                c.kill()
    errors = [a["error"] for a in answers if "error" in a]
    if errors:
        raise RuntimeError(f"database clients failed: {errors}")
    time.sleep(0.7)  # backends flush their statistics when they exit
    after, tables1 = _pg_stats(admin, name), _table_stats(mine)
    count = sum(a["count"] for a in answers)
    client_cpu = sum(a["client_cpu_s"] for a in answers)
    total = count + sum(a["warm"] for a in answers)
    lat = [x for a in answers for x in a["lat"]]
    rate = count / seconds
    row = {"mode": mode, "processes": procs, "tenants": len(set(tenants[k % len(tenants)] for k in range(procs))),
           "count": count, "rate_per_s": rate, "p50_ms": pct(lat, 0.5) * 1e3, "p95_ms": pct(lat, 0.95) * 1e3,
           "postgres_cpu_ms_per_op": used["server_cpu_s"] / max(count, 1) * 1e3,
           "client_cpu_ms_per_op": client_cpu / max(count, 1) * 1e3,
           "postgres_cores": used["server_cores"], "machine_cores": used["machine_cores"],
           "ops_per_postgres_core_s": count / max(used["server_cpu_s"], 1e-9),
           "wal_kib_per_op_timed": wal_timed / max(count, 1) / 1024}
    if mode == "job":
        d = {k: after[k] - before[k] for k in after}
        row.update({
            "statements_per_job": answers[0]["statements"],
            "commits_per_job": d["commits"] / total,
            "rollbacks_per_job": d["rollbacks"] / total,
            "rows_written_per_job": (d["inserted"] + d["updated"] + d["deleted"]) / total,
            "rows_inserted_per_job": d["inserted"] / total, "rows_updated_per_job": d["updated"] / total,
            "rows_deleted_per_job": d["deleted"] / total,
            "wal_kib_per_job": d["wal_bytes"] / total / 1024,
            "rows_per_job_by_table": {
                t: [round((v[i] - tables0.get(t, (0, 0, 0, 0))[i]) / total, 2) for i in range(4)]
                for t, v in sorted(tables1.items()) if v != tables0.get(t, (0, 0, 0, 0))},
        })
    return row


def _history_child(url: str, tenant: str, rows: int, out: Any) -> None:
    """Add ``rows`` finished media + transcriptions of ``tenant`` in two halves; after each, time
    the two reads that cover the whole table (so the cost per retained row can be read off)."""
    try:
        _db_runtime(url)
        from core import jobs
        from server import media_service
        from storage.db import database

        db = database.obj

        def best(fn: Callable[[], Any]) -> float:
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times)

        points = []
        t = time.monotonic()
        half = rows // 2
        for first, last in ((1, half), (half + 1, rows)):
            with db.connection_context():
                db.execute_sql(
                    "INSERT INTO media (id, tenant_id, request_id, filename, content_type, size_bytes, sha256, "
                    "object_key, audio_key, state, error_message, duration_s, format_name, audio_codec, attempts, "
                    "owner, create_time, update_time) SELECT md5('m' || i), %s, NULL, 'lecture.mp4', 'video/mp4', "
                    "31000, '', 'k/' || i, 'a/' || i, 'READY', '', 600, 'mp4', 'aac', 1, 'user-' || (i %% 1000), "
                    "now() - (i || ' s')::interval, now() FROM generate_series(%s, %s) i", (tenant, first, last))
                db.execute_sql(
                    "INSERT INTO transcription (id, tenant_id, media_id, config, priority, state, stage, progress, "
                    "processed_s, duration_s, sequence, attempts, total_attempts, cancel_requested, error_message, "
                    "error_reason, ai_items, owner, create_time, update_time) SELECT md5('t' || i), %s, md5('m' || i), "
                    "'{}', 5, 'SUCCEEDED', 'DONE', 100, 600, 600, 6, 0, 1, false, '', '', 0, 'user-' || (i %% 1000), "
                    "now() - (i || ' s')::interval, now() FROM generate_series(%s, %s) i", (tenant, first, last))
                db.execute_sql("ANALYZE media")
                db.execute_sql("ANALYZE transcription")
                plan = db.execute_sql("EXPLAIN SELECT COUNT(*) FROM media WHERE state = 'PROCESSING'").fetchall()
            points.append({"rows": last, "backpressure_ms": best(lambda: media_service._backpressure(tenant)) * 1e3,
                           "count_by_state_ms": best(jobs.count_by_state) * 1e3})
        a, b = points
        per_m = {k: (b[k] - a[k]) / ((b["rows"] - a["rows"]) / 1e6) for k in ("backpressure_ms", "count_by_state_ms")}
        out.put({"history_rows": rows, "fill_s": time.monotonic() - t, "points": points,
                 "backpressure_ms": b["backpressure_ms"], "count_by_state_ms": b["count_by_state_ms"],
                 "backpressure_ms_per_million_rows": per_m["backpressure_ms"],
                 "count_by_state_ms_per_million_rows": per_m["count_by_state_ms"],
                 "backpressure_plan": " | ".join(r[0].strip() for r in plan)})
    except BaseException as exc:
        out.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


def bench_db(seconds: float, history_rows: int) -> dict[str, Any]:
    from storage import schema

    name = f"mp4t_cap_{uuid.uuid4().hex[:8]}"
    url = f"{PG_DSN}/{name}"
    admin = _pg()
    admin.cursor().execute(f"CREATE DATABASE {name}")
    out: dict[str, Any] = {"database": name}
    try:
        result = transcript(AUDIO_S)
        out["result_json_kib"] = len(json.dumps(result, separators=(",", ":"))) / 1024
        q = FORK.Queue()
        p = FORK.Process(target=_setup_child, args=(url, 8, q))
        p.start()
        tenants = q.get(timeout=120)
        p.join()
        assert schema.SCHEMA_VERSION  # init_db ran in the child (core.runtime.init)
        mine = _pg(name)
        size0 = _pg_stats(admin, name)["db_bytes"]
        rows = []
        for procs, n_tenants in ((1, 1), (4, 1), (8, 1), (8, 8)):
            row = _run_level(url, name, admin, mine, tenants[:n_tenants], procs, "job", seconds, result)
            rows.append(row)
            print(f"  db job, {procs} process(es), {n_tenants} tenant(s): {row['rate_per_s']:.1f} jobs/s, "
                  f"p50 {row['p50_ms']:.1f} ms, postgres {row['postgres_cpu_ms_per_op']:.2f} CPU-ms/job, clients "
                  f"{row['client_cpu_ms_per_op']:.1f} CPU-ms/job", flush=True)
        jobs_total = sum(r["count"] for r in rows) + sum(r["processes"] for r in rows)
        size1 = _pg_stats(admin, name)["db_bytes"]
        out["db_bytes_per_job"] = (size1 - size0) / jobs_total
        out["jobs"] = rows
        tick = _run_level(url, name, admin, mine, tenants[:1], 8, "tick", seconds, result)
        print(f"  db tick, 8 processes: {tick['rate_per_s']:.0f} ticks/s, postgres "
              f"{tick['postgres_cpu_ms_per_op']:.3f} CPU-ms/tick", flush=True)
        out["tick"] = tick
        poll = _run_level(url, name, admin, mine, tenants[:1], 8, "poll", seconds, result)
        print(f"  db relay poll, 8 processes: {poll['rate_per_s']:.0f} polls/s, postgres "
              f"{poll['postgres_cpu_ms_per_op']:.3f} CPU-ms/poll", flush=True)
        out["poll"] = poll
        mine.close()
        if history_rows:
            p = FORK.Process(target=_history_child, args=(url, tenants[0], history_rows, q))
            p.start()
            hist = q.get(timeout=600)
            p.join()
            if "error" in hist:
                raise RuntimeError(hist["error"])
            out["history"] = hist
            print(f"  db history {history_rows} rows: backpressure check {hist['backpressure_ms']:.1f} ms, "
                  f"count_by_state {hist['count_by_state_ms']:.1f} ms", flush=True)
    finally:
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()
    return out


# ---------------------------------------------------------------- 2. RabbitMQ


def _bus_subscriber(url: str, ready: Any, stop: Any, out: Any) -> None:
    from mp4totext.events import RabbitBus

    bus = RabbitBus(url, "mp4totext.progress")
    seen = [0, 0.0]

    def dispatch(_event: Any) -> None:
        seen[0] += 1
        seen[1] = time.monotonic()

    bus.hub.dispatch = dispatch  # type: ignore[method-assign]
    bus.start()
    bus.connected.wait(30)
    ready.put(1)
    stop.wait()
    bus.close()
    out.put((seen[0], seen[1]))


def _bus_publisher(url: str, event: dict[str, Any], start: Any, seconds: float, out: Any) -> None:
    from mp4totext.events import RabbitBus

    bus = RabbitBus(url, "mp4totext.progress")
    bus.publish(event)  # connect
    start.wait()
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < seconds:
        bus.publish(event)
        n += 1
    out.put((n, t0, time.monotonic()))
    bus.close()


def bench_broker(seconds: float) -> dict[str, Any]:
    import pika

    from core import queue
    from mp4totext import config
    from mp4totext.contracts import JobState, ProgressEvent, Stage
    from storage.db import new_id

    vhost = f"mp4t-cap-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True,
                   capture_output=True)
    url = f"{RABBIT}/{vhost}"
    out: dict[str, Any] = {"vhost": vhost}
    try:
        settings = config.Settings(broker_url=url)
        broker = queue.make_broker(settings)
        queue.enqueue("transcribe", new_id(), 5)  # connect, declare
        publish = []
        for threads in (1, 8):
            stop = time.monotonic() + seconds
            counts = [0] * threads

            def publisher(k: int) -> None:
                while time.monotonic() < stop:
                    queue.enqueue("transcribe", new_id(), 5)
                    counts[k] += 1

            used = run_threads(Cpu(("beam.smp",)), publisher, threads)
            n = sum(counts)
            publish.append({"threads": threads, "count": n, "rate_per_s": n / used["wall_s"],
                            "rabbit_cpu_ms_per_msg": used["server_cpu_s"] / n * 1e3,
                            "rabbit_cores": used["server_cores"], "machine_cores": used["machine_cores"]})
            print(f"  broker confirmed publish, {threads} thread(s): {n / used['wall_s']:.0f} msg/s", flush=True)
        out["publish"] = publish
        conn = pika.BlockingConnection(pika.URLParameters(url))
        method, _props, body = conn.channel().basic_get("high", auto_ack=False)
        out["message_bytes"] = len(body) if body else 0
        conn.close()
        # consume + ack, as Dramatiq workers do (4 consumers with prefetch 4: two critical-worker threads x 2)
        waiting = broker.get_queue_message_counts("high")[0]
        consumed = [0] * 4
        last = [0.0] * 4
        stop = time.monotonic() + seconds

        def consumer(k: int) -> None:
            c = broker.consume("high", prefetch=4, timeout=500)
            try:
                while time.monotonic() < stop:
                    m = next(c)
                    if m is None:
                        break
                    c.ack(m)
                    consumed[k] += 1
                    last[k] = time.monotonic()
            finally:
                c.close()

        cpu = Cpu(("beam.smp",))
        used = run_threads(cpu, consumer, 4)
        n = sum(consumed)
        busy_s = max(last) - cpu.t0  # to the last message (the queue may empty before the time is up)
        out["consume"] = {"consumers": 4, "prefetch": 4, "waiting": waiting, "count": n,
                          "rate_per_s": n / busy_s, "rabbit_cpu_ms_per_msg": used["server_cpu_s"] / max(n, 1) * 1e3,
                          "rabbit_cores": used["server_cpu_s"] / busy_s}
        print(f"  broker consume+ack, 4 consumers: {n / busy_s:.0f} msg/s", flush=True)
        broker.close()
        # the progress bus: 4 server processes each receive every event
        event = ProgressEvent(id=new_id(), sequence=17, state=JobState.RUNNING, stage=Stage.TRANSCRIBING,
                              progress=41.25, processed_s=251.2, duration_s=AUDIO_S, attempts=1,
                              time=dt.datetime.now(dt.timezone.utc)).model_dump(mode="json")
        subs, pubs = 4, 2
        ready, start, stop_ev, res_sub, res_pub = FORK.Queue(), FORK.Event(), FORK.Event(), FORK.Queue(), FORK.Queue()
        sp = [FORK.Process(target=_bus_subscriber, args=(url, ready, stop_ev, res_sub)) for _ in range(subs)]
        pp = [FORK.Process(target=_bus_publisher, args=(url, event, start, seconds, res_pub)) for _ in range(pubs)]
        for p in sp:
            p.start()
        for _ in range(subs):
            ready.get(timeout=60)
        for p in pp:
            p.start()
        time.sleep(1.0)
        cpu = Cpu(("beam.smp",))
        cpu.start()
        start.set()
        published = [res_pub.get(timeout=seconds + 60) for _ in range(pubs)]
        time.sleep(3.0)  # let the subscribers drain what is queued
        used = cpu.stop()
        stop_ev.set()
        got = [res_sub.get(timeout=60) for _ in range(subs)]
        for p in sp + pp:
            p.join(timeout=30)
        n_pub = sum(n for n, _, _ in published)
        t0 = min(t for _, t, _ in published)
        t_pub = max(t for _, _, t in published) - t0
        n_got = sum(n for n, _ in got)
        t_got = max(t for _, t in got) - t0
        event_bytes = len(json.dumps(event, separators=(",", ":")))
        out["bus"] = {"publishers": pubs, "subscribers": subs, "event_bytes": event_bytes,
                      "published": n_pub, "publish_rate_per_s": n_pub / t_pub, "delivered": n_got,
                      "delivered_fraction": n_got / max((n_pub + pubs) * subs, 1), "delivery_rate_per_s": n_got / t_got,
                      "rabbit_cpu_ms_per_delivery": used["server_cpu_s"] / max(n_got, 1) * 1e3,
                      "rabbit_cores": used["server_cpu_s"] / t_got}
        print(f"  progress bus: {n_pub / t_pub:.0f} events/s published, {n_got / t_got:.0f} deliveries/s to {subs} "
              "subscribers", flush=True)
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True)
    return out


# ---------------------------------------------------------------- 3. S3 (SeaweedFS)


def bench_s3(seconds: float, tmp: pathlib.Path) -> dict[str, Any]:
    from mp4totext import config
    from storage.objects import make_store
    from tests.support.s3 import SeaweedS3

    weed = shutil.which("weed") or str(pathlib.Path(sys.executable).parent / "weed")
    (tmp / "weed").mkdir()
    (tmp / "logs").mkdir(exist_ok=True)
    server = SeaweedS3(weed, tmp / "weed", tmp / "logs")
    out: dict[str, Any] = {}
    t = time.monotonic()
    server.start()
    out["start_s"] = time.monotonic() - t
    try:
        info = server.info
        s = config.Settings(storage_backend="s3", s3_endpoint=info["endpoint"], s3_access_key=info["access_key"],
                            s3_secret_key=info["secret_key"], s3_bucket=info["bucket"])
        store = make_store(s)
        small = os.urandom(SMALL)
        keys: list[str] = []
        store.put_stream("warm", io.BytesIO(small))

        def run(threads: int, op: Callable[[int, int], None]) -> dict[str, Any]:
            stop = time.monotonic() + seconds
            counts = [0] * threads
            lat: list[list[float]] = [[] for _ in range(threads)]

            def worker(k: int) -> None:
                i = 0
                while time.monotonic() < stop:
                    t0 = time.perf_counter()
                    op(k, i)
                    lat[k].append(time.perf_counter() - t0)
                    counts[k] += 1
                    i += 1

            used = run_threads(Cpu(pids=[server.proc.pid]), worker, threads)
            n = sum(counts)
            flat = [x for lst in lat for x in lst]
            return {"threads": threads, "count": n, "rate_per_s": n / used["wall_s"], "p50_ms": pct(flat, 0.5) * 1e3,
                    "p95_ms": pct(flat, 0.95) * 1e3, "weed_cpu_ms_per_op": used["server_cpu_s"] / n * 1e3,
                    "weed_cores": used["server_cores"], "machine_cores": used["machine_cores"]}

        lock = threading.Lock()

        def put(k: int, i: int) -> None:
            key = f"small/{k}/{i}"
            store.put_stream(key, io.BytesIO(small))
            with lock:
                keys.append(key)

        out["put_30k"] = run(8, put)
        print(f"  s3 PUT 30 KB, 8 threads: {out['put_30k']['rate_per_s']:.0f}/s", flush=True)
        gets = tmp / "gets"
        gets.mkdir()

        def get(k: int, i: int) -> None:
            store.get_file(keys[(k * 7919 + i) % len(keys)], str(gets / f"{k}"))

        out["get_30k"] = run(8, get)
        print(f"  s3 GET 30 KB, 8 threads: {out['get_30k']['rate_per_s']:.0f}/s", flush=True)
        big = os.urandom(LARGE)
        puts, getsl = [], []
        cpu = Cpu(pids=[server.proc.pid])
        cpu.start()
        for k in range(3):
            t0 = time.perf_counter()
            store.put_stream(f"large/{k}", io.BytesIO(big))
            puts.append(LARGE / 2**20 / (time.perf_counter() - t0))
        put_cpu = cpu.stop()
        cpu.start()
        for k in range(3):
            t0 = time.perf_counter()
            store.get_file(f"large/{k}", str(tmp / "large.bin"))
            getsl.append(LARGE / 2**20 / (time.perf_counter() - t0))
        get_cpu = cpu.stop()
        out["put_64m"] = {"runs_mib_s": puts, "best_mib_s": max(puts), "median_mib_s": statistics.median(puts),
                          "part_size_mib": s.s3_part_size / 2**20, "parallel_uploads": s.s3_parallel_uploads,
                          "weed_cpu_s_per_gib": put_cpu["server_cpu_s"] / (3 * LARGE / 2**30)}
        out["get_64m"] = {"runs_mib_s": getsl, "best_mib_s": max(getsl), "median_mib_s": statistics.median(getsl),
                          "weed_cpu_s_per_gib": get_cpu["server_cpu_s"] / (3 * LARGE / 2**30)}
        print(f"  s3 64 MiB: PUT {statistics.median(puts):.0f} MiB/s, GET {statistics.median(getsl):.0f} MiB/s "
              "(median of 3)", flush=True)
    finally:
        server.stop()
    return out


# ---------------------------------------------------------------- 4. media preparation


def bench_prepare(tmp: pathlib.Path) -> dict[str, Any]:
    from workers.stages.media import extract_audio, probe

    src = tmp / "lecture.m4a"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"sine=frequency=220:sample_rate=44100:duration={AUDIO_S:g}", "-ac", "1", "-c:a", "aac",
                    "-b:a", "64k", str(src)], check=True)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        info = probe(str(src))
        extract_audio(str(src), str(tmp / "audio.wav"), expected_duration_s=info.duration_s)
        times.append(time.perf_counter() - t0)
    return {"audio_s": AUDIO_S, "source_bytes": src.stat().st_size, "wav_bytes": (tmp / "audio.wav").stat().st_size,
            "probe_extract_s": min(times)}


# ---------------------------------------------------------------- report


def table(res: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    db = res.get("db")
    if db:
        for r in db["jobs"]:
            rows.append((f"PostgreSQL: whole jobs/s, {r['processes']} client process(es), {r['tenants']} tenant(s)",
                         f"{r['rate_per_s']:.1f} (p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms; postgres "
                         f"{r['postgres_cpu_ms_per_op']:.2f} CPU-ms/job, clients {r['client_cpu_ms_per_op']:.0f}; "
                         f"cores busy: postgres {r['postgres_cores']:.2f}, machine {r['machine_cores']:.2f})"))
        r = db["jobs"][0]
        rows.append(("PostgreSQL: per job (statements / commits / rows written / WAL)",
                     f"{r['statements_per_job']} / {r['commits_per_job']:.1f} / {r['rows_written_per_job']:.1f} "
                     f"(ins {r['rows_inserted_per_job']:.1f}, upd {r['rows_updated_per_job']:.1f}, "
                     f"del {r['rows_deleted_per_job']:.1f}) / {r['wal_kib_per_job']:.0f} KiB"))
        top = sorted(r["rows_per_job_by_table"].items(), key=lambda kv: -sum(kv[1][:3]))[:8]
        rows.append(("PostgreSQL: rows ins/upd/del per job, by table",
                     "; ".join(f"{t} {v[0]:g}/{v[1]:g}/{v[2]:g}" for t, v in top)))
        rows.append(("PostgreSQL: database bytes per job (10-min transcript JSON)",
                     f"{db['db_bytes_per_job'] / 1024:.0f} KiB (result JSON {db['result_json_kib']:.0f} KiB)"))
        t = db["tick"]
        rows.append(("PostgreSQL: running-job ticks/s (progress write + watchdog read), 8 processes",
                     f"{t['rate_per_s']:.0f} (p50 {t['p50_ms']:.1f} ms; postgres {t['postgres_cpu_ms_per_op']:.3f} "
                     f"CPU-ms/tick, clients {t['client_cpu_ms_per_op']:.2f}; WAL {t['wal_kib_per_op_timed']:.2f} "
                     f"KiB/tick; cores busy: postgres "
                     f"{t['postgres_cores']:.2f}, machine {t['machine_cores']:.2f})"))
        t = db["poll"]
        rows.append(("PostgreSQL: outbox relay polls/s (each server and worker process polls once a second)",
                     f"{t['rate_per_s']:.0f} (p50 {t['p50_ms']:.2f} ms; postgres {t['postgres_cpu_ms_per_op']:.3f} "
                     f"CPU-ms/poll; cores busy: postgres {t['postgres_cores']:.2f}, machine {t['machine_cores']:.2f})"))
        h = db.get("history")
        if h:
            p1, p2 = h["points"]
            rows.append(("PostgreSQL: upload backpressure check, ms at "
                         f"{p1['rows']:,} / {p2['rows']:,} finished jobs in the tables",
                         f"{p1['backpressure_ms']:.1f} / {p2['backpressure_ms']:.1f} "
                         f"(+{h['backpressure_ms_per_million_rows']:.0f} ms per million rows; "
                         f"{h['backpressure_plan'].split('|')[1].strip()[:48]})"))
            rows.append(("PostgreSQL: mp4t_jobs gauge (count_by_state), ms at "
                         f"{p1['rows']:,} / {p2['rows']:,} finished jobs",
                         f"{p1['count_by_state_ms']:.1f} / {p2['count_by_state_ms']:.1f} "
                         f"(+{h['count_by_state_ms_per_million_rows']:.0f} ms per million rows)"))
    br = res.get("broker")
    if br:
        for p in br["publish"]:
            rows.append((f"RabbitMQ: confirmed publishes/s (core.queue.enqueue), {p['threads']} thread(s)",
                         f"{p['rate_per_s']:.0f} ({br['message_bytes']} B; rabbit {p['rabbit_cpu_ms_per_msg']:.3f} "
                         f"CPU-ms/msg, {p['rabbit_cores']:.2f} cores)"))
        c = br["consume"]
        rows.append(("RabbitMQ: consume + ack/s (Dramatiq consumer, 4 x prefetch 4)",
                     f"{c['rate_per_s']:.0f} (rabbit {c['rabbit_cpu_ms_per_msg']:.3f} CPU-ms/msg)"))
        b = br["bus"]
        rows.append((f"RabbitMQ: progress bus, {b['publishers']} publishers -> {b['subscribers']} subscribers",
                     f"{b['publish_rate_per_s']:.0f} events/s in, {b['delivery_rate_per_s']:.0f} deliveries/s out "
                     f"({b['delivered_fraction']:.2f} delivered; {b['event_bytes']} B; rabbit "
                     f"{b['rabbit_cpu_ms_per_delivery']:.3f} CPU-ms/delivery)"))
    s3 = res.get("s3")
    if s3:
        for k, what in (("put_30k", "PUT"), ("get_30k", "GET")):
            r = s3[k]
            rows.append((f"S3 (SeaweedFS): {what}/s of 30 KB, 8 threads",
                         f"{r['rate_per_s']:.0f} (p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms; weed "
                         f"{r['weed_cpu_ms_per_op']:.2f} CPU-ms/op, {r['weed_cores']:.2f} cores)"))
        for k, what in (("put_64m", "PUT"), ("get_64m", "GET")):
            r = s3[k]
            rows.append((f"S3 (SeaweedFS): {what} 64 MiB, MiB/s (median / best of 3)",
                         f"{r['median_mib_s']:.0f} / {r['best_mib_s']:.0f} (weed {r['weed_cpu_s_per_gib']:.1f} "
                         "CPU-s/GiB)"))
    pr = res.get("prepare")
    if pr:
        rows.append(("Media preparation: probe + extract 600 s AAC -> 16 kHz WAV (one process)",
                     f"{pr['probe_extract_s']:.2f} s ({pr['source_bytes'] / 2**20:.1f} MiB in, "
                     f"{pr['wav_bytes'] / 2**20:.1f} MiB WAV out)"))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each timed measurement")
    ap.add_argument("--history-rows", type=int, default=120_000, help="finished jobs added for the table-growth "
                    "figure (0 = skip)")
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--skip-db", action="store_true")
    ap.add_argument("--skip-broker", action="store_true")
    ap.add_argument("--skip-s3", action="store_true")
    ap.add_argument("--skip-prepare", action="store_true")
    args = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="mp4t-capacity-"))
    _TMP.append(tmp)
    res: dict[str, Any] = {"started": now_utc(), "load_avg_start": load_avg(), "cpus": os.cpu_count(),
                           "host": platform.node(), "seconds": args.seconds}
    t0 = time.monotonic()
    try:
        if not args.skip_db:
            print("PostgreSQL ...", flush=True)
            t = time.monotonic()
            res["db"] = bench_db(args.seconds, args.history_rows)
            res["db"]["elapsed_s"] = time.monotonic() - t
        if not args.skip_broker:
            print("RabbitMQ ...", flush=True)
            t = time.monotonic()
            res["broker"] = bench_broker(args.seconds)
            res["broker"]["elapsed_s"] = time.monotonic() - t
        if not args.skip_s3:
            print("S3 (SeaweedFS) ...", flush=True)
            t = time.monotonic()
            res["s3"] = bench_s3(args.seconds, tmp)
            res["s3"]["elapsed_s"] = time.monotonic() - t
        if not args.skip_prepare:
            print("media preparation ...", flush=True)
            res["prepare"] = bench_prepare(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res.update({"finished": now_utc(), "load_avg_end": load_avg(), "elapsed_s": time.monotonic() - t0})
    rows = [("started / finished", f"{res['started']} / {res['finished']} ({res['elapsed_s']:.0f} s)"),
            ("load average at start / end", f"{res['load_avg_start']} / {res['load_avg_end']}"),
            ("CPUs", str(res["cpus"])), *table(res)]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
