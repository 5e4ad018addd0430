"""A client in a second language against the real stack: clients/node/transcribe.js (Node.js,
@grpc/grpc-js, @grpc/proto-loader reading protos/ at run time, no Python anywhere) uploads with
the single-stream UploadMedia, creates a transcription, follows WatchTranscription to the end and
prints the transcript as JSON. What it prints is checked against the speech it was given and
against what the Python client reads back for the same resources.

Needs node and `npm ci --prefix clients/node` (scripts/setup.sh test does both).
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import subprocess
from typing import Any

import pytest

from mp4totext import samples
from tests.support import ROOT, SPEECH_TEXT, Stack, need

NODE_CLIENT = ROOT / "clients" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    exe = shutil.which("node")
    need(exe is not None and (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir(),
         "node with the Node client's packages (npm ci --prefix clients/node)")
    return str(exe)


def transcribe(node: str, target: str, key: str, media: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([node, str(NODE_CLIENT / "transcribe.js"), "--target", target, "--key", key,
                           "--timeout", "240", str(media)],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_node_client_uploads_transcribes_and_prints_the_transcript(node: str, stack: Stack, key_a: str,
                                                                    speech_mp4: pathlib.Path, client: Any) -> None:
    from mp4totext.v1 import media_pb2

    proc = transcribe(node, stack.targets[-1], key_a, speech_mp4)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["state"] == "TRANSCRIPTION_STATE_SUCCEEDED", out
    assert samples.word_error_rate(SPEECH_TEXT, out["text"]) < 0.35, out["text"]
    assert out["language_code"] == "en" and abs(out["duration_s"] - 20) < 10
    assert out["sha256"] == hashlib.sha256(speech_mp4.read_bytes()).hexdigest()
    starts = [s["start_s"] for s in out["segments"]]
    assert starts and starts == sorted(starts) and all(s["end_s"] >= s["start_s"] for s in out["segments"])
    assert " ".join(s["text"].strip() for s in out["segments"]).split() == out["text"].split()
    # It followed the job through Watch (progress lines on stderr), to the terminal event.
    assert "TRANSCRIPTION_STATE_SUCCEEDED" in proc.stderr.splitlines()[-1]

    # The same resources, read back by the Python client with the same key.
    job = client.get(out["transcription"])
    assert job.media == out["media"] and job.result.text == out["text"]
    media = client.get_media(out["media"])
    assert media.size_bytes == speech_mp4.stat().st_size and media.state == media_pb2.MEDIA_STATE_READY


def test_node_client_with_a_bad_key_is_unauthenticated(node: str, stack: Stack, speech_mp4: pathlib.Path) -> None:
    proc = transcribe(node, stack.target, "m2t_not-a-real-key", speech_mp4)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    error = json.loads(proc.stderr.strip().splitlines()[-1])["error"]
    assert error["status"] == "UNAUTHENTICATED" and error["code"] == 16, error
    assert error["message"], error


def test_node_live_client_streams_captions_and_the_recording_becomes_media(node: str, stack: Stack, key_a: str,
                                                                          media_dir: pathlib.Path,
                                                                          client: Any) -> None:
    """clients/node/live.js: StreamLive at 1x from Node; final segments as JSON lines; the media."""
    from mp4totext.v1 import media_pb2

    wav = media_dir / "node-live.wav"
    samples.speech_wav(samples.DEMO_TEXT, str(media_dir / "node-live-22k.wav"))
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(media_dir / "node-live-22k.wav"), "-ac", "1",
                    "-ar", "16000", str(wav)], check=True)
    proc = subprocess.run([node, str(NODE_CLIENT / "live.js"), "--target", stack.target, "--key", key_a, "--realtime",
                           str(wav)], capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(ln) for ln in proc.stdout.splitlines()]
    segments = [ln["segment"] for ln in lines if "segment" in ln]
    ended = lines[-1]["ended"]
    assert [s["id"] for s in segments] == list(range(len(segments))) and segments
    assert samples.word_error_rate(samples.DEMO_TEXT, " ".join(s["text"] for s in segments)) < 0.3, segments
    media = client.wait_media(ended["media"])
    assert media.state == media_pb2.MEDIA_STATE_READY
    import wave

    with wave.open(str(wav)) as w:
        sent = w.getnframes() * 2
    assert media.size_bytes == sent + 44  # every sample sent, in a WAV
