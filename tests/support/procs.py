"""Child processes with log files, their JSON log lines, RSS sampling and gRPC readiness."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import threading
import time
import uuid
from typing import Any

import grpc

from tests.support.common import ROOT, wait_for


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


def log_lines(proc: Proc) -> list[dict[str, Any]]:
    """Every JSON log line of ``proc``, parsed (other output is ignored)."""
    out = []
    for line in proc.log().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def log_event(proc: Proc, event: str) -> dict[str, Any] | None:
    """The first JSON log line of ``proc`` whose event is ``event``."""
    for line in proc.log().splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if data.get("event") == event:
                return data
    return None


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
