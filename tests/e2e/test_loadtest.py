"""The load tool (bench/loadtest.py) in CI: 50 simulated phones through HAProxy, nothing lost or doubled.

HAProxy (haproxy/haproxy.cfg, static server lines) goes in front of the session stack's two
servers, so the run shares the stack's database, queues, S3 and workers instead of starting a
second stack; the tool runs as users run it, as a command (``--target``), with a tenant of its
own. Every phone uploads ~2 s of speech, creates a transcription, Watches it to the end, reads
the result and exports SRT.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import uuid
from typing import Any

from tests.support import ROOT, Proc, Stack, free_port, grpc_ready, haproxy_config, need, wait_for

CLIENTS = 50


def _haproxy(stack: Stack, tmp: pathlib.Path) -> tuple[Proc, str]:
    slots = [(f"s{k + 1}", int(target.rsplit(":", 1)[1]), stack.http_ports[proc], stack.agent_ports[proc])
             for k, (proc, target) in enumerate(zip(stack.servers, stack.targets))]
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(haproxy_config(slots))
    for attempt in range(5):  # a port picked by free_port() may be taken before HAProxy binds it
        port = free_port()
        env = {**os.environ, "MP4T_HAPROXY_GRPC_BIND": f"127.0.0.1:{port}",
               "MP4T_HAPROXY_STATS_BIND": f"127.0.0.1:{free_port()}",
               # every simulated phone comes from 127.0.0.1: the per-address limit would be the test
               "MP4T_RATE_LIMIT_PER_S": "100000", "MP4T_RATE_LIMIT_PER_KEY_S": "100000"}
        proc = Proc("haproxy-load", ["haproxy", "-db", "-f", str(cfg)], env, stack.log_dir)
        try:
            wait_for(lambda: not proc.alive() or _serving(f"127.0.0.1:{port}"), 30, "HAProxy serving")
        except TimeoutError:
            proc.stop()
            raise
        if proc.alive():
            return proc, f"127.0.0.1:{port}"
        proc.stop()
    raise RuntimeError("HAProxy did not start")


def _serving(target: str) -> bool:
    try:
        grpc_ready(target, timeout=1)
        return True
    except TimeoutError:
        return False


def test_fifty_phones_through_haproxy_nothing_lost_or_duplicated(stack: Stack, db: Any,
                                                                   tmp_path: pathlib.Path) -> None:
    need(shutil.which("haproxy") is not None, "haproxy (apt-get install haproxy)")
    from server.auth import create_key

    key, _tenant = create_key(f"loadtest-{uuid.uuid4().hex[:6]}")
    haproxy, target = _haproxy(stack, tmp_path)
    out = tmp_path / "report"
    pids = [f"server{k + 1}={p.pid}" for k, p in enumerate(stack.servers)]
    pids += [f"worker {q}={p.pid}" for q, p in stack.workers.items()]
    try:
        cmd = [sys.executable, str(ROOT / "bench" / "loadtest.py"), "--target", target, "--key", key,
               "--clients", str(CLIENTS), "--rate", "10", "--media-s", "2", "--deadline", "600", "--unary-seconds", "2",
               "--broker-url", stack.env["MP4T_BROKER_URL"], "--out", str(out),
               *[arg for pid in pids for arg in ("--pid", pid)]]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=840, cwd=ROOT)
    finally:
        haproxy.stop()
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads((out / "loadtest.json").read_text())
    [rep] = report["runs"]
    assert rep["clients"] == CLIENTS
    assert rep["lost"] == 0, rep["per_client"]
    assert rep["duplicated"] == 0, rep["audit"]
    assert rep["completed"] == CLIENTS and rep["failed"] == 0, rep["client_errors"]
    assert all(c["get_state"] == "TRANSCRIPTION_STATE_SUCCEEDED" for c in rep["per_client"])
    assert rep["audit"]["jobs_listed"] == CLIENTS and rep["audit"]["media_listed"] == CLIENTS
    assert rep["upload_s"]["n"] == CLIENTS and rep["time_to_result_s"]["n"] == CLIENTS
    assert set(rep["resources"]["rss"]) >= {"server1", "server2", "worker high"}
    assert rep["resources"]["queue_peak"], "queue depth was not sampled"
    assert report["unary"]["get"]["rps"] > 0 and report["unary"]["list"]["rps"] > 0
    png = pathlib.Path(rep["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "completed / failed / lost / duplicated" in run.stdout
