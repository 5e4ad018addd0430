"""The CLI and the embedded mode, as a user runs them (subprocesses)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest

from mp4totext import samples
from tests.support import CLI, ROOT, SPEECH_TEXT, Stack


def run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_embedded_mode_end_to_end(speech_mp4: pathlib.Path, tmp_path: pathlib.Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MP4T_")}
    # port 0: the server picks a free port and the embedded client uses it
    proc = run(["embedded", str(speech_mp4), "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert samples.word_error_rate(SPEECH_TEXT, proc.stdout) < 0.35, proc.stdout
    assert (tmp_path / "mp4totext.db").exists() and (tmp_path / "api.key").exists()
    originals = list((tmp_path / "objects").rglob("original"))
    assert len(originals) == 1 and originals[0].stat().st_size == speech_mp4.stat().st_size


@pytest.mark.fast
def test_demo_transcript_is_what_was_spoken(tmp_path: pathlib.Path) -> None:
    """`bash scripts/run.sh` is the first thing a newcomer runs: its transcript must be exact."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MP4T_")}
    proc = run(["embedded", "--demo", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert samples.word_error_rate(samples.DEMO_TEXT, proc.stdout) == 0, proc.stdout


def test_cli_end_to_end(stack: Stack, speech_mp4: pathlib.Path, tmp_path: pathlib.Path) -> None:
    env = dict(stack.env)
    created = run(["create-key", "--tenant", "cli-user"], env)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["api_key"]
    common = ["--server", stack.target, "--api-key", key]
    out = tmp_path / "t.txt"
    proc = run(["transcribe", str(speech_mp4), "-o", str(out), *common], env)
    assert proc.returncode == 0, proc.stderr
    assert samples.word_error_rate(SPEECH_TEXT, out.read_text()) < 0.35
    listed = run(["list", "transcriptions", *common], env)
    assert listed.returncode == 0 and "SUCCEEDED" in listed.stdout
    job = listed.stdout.split()[0]
    got = run(["get", job, *common], env)
    assert json.loads(got.stdout)["state"] == "TRANSCRIPTION_STATE_SUCCEEDED"
    media = json.loads(got.stdout)["media"]
    assert "SUCCEEDED" in run(["cancel", job, *common], env).stdout  # no-op on a finished job
    refused = run(["delete", media, *common], env)
    assert refused.returncode == 2 and "FAILED_PRECONDITION" in refused.stderr
    assert run(["delete", media, "--force", *common], env).returncode == 0
    gone = run(["get", job, *common], env)
    assert gone.returncode == 2 and "NOT_FOUND" in gone.stderr
    as_json = run(["transcribe", str(speech_mp4), "--format", "json", *common], env)
    assert json.loads(as_json.stdout)["result"]["language_code"] == "en"
    bad = run(["list", "media", "--server", stack.target, "--api-key", "wrong"], env)
    assert bad.returncode == 2 and "UNAUTHENTICATED" in bad.stderr
