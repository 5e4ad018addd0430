"""Paths, the product's command line, and small waiting/port helpers shared by tests and bench."""
from __future__ import annotations

import os
import pathlib
import socket
import sys
import time
from typing import Any

import pytest

from mp4totext import samples

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The one place that names the product's entry point: every test and the benchmark launch
# the CLI as [*CLI, "serve" | "worker" | ...].
CLI = [sys.executable, "-m", "launch"]

SPEECH_TEXT = " ".join(samples.SENTENCES[:5])


def need(condition: bool, what: str) -> None:
    """Skip locally, fail in CI (CI=true), when a service or program the test needs is missing."""
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
