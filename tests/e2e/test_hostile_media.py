"""A corpus of hostile media, generated here: each file ends READY or FAILED with a reason a
person can act on, never a hang, a crash, a network fetch or a leaked internal.

Playlists are the dangerous ones: ffmpeg follows the URLs inside an HLS playlist, so an upload
could make a worker fetch from the service's own network (SSRF). The worker's ffmpeg and
ffprobe may only open local files.
"""
from __future__ import annotations

import pathlib
import socket
import subprocess
import threading
from typing import Any

import pytest

from mp4totext.v1 import media_pb2
from tests.support import wait_for

LEAKS = ("0x", "/tmp", "Traceback", "/work/")


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True, timeout=120)


class Listener:
    """A TCP port that records whether anything connected to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, pathlib.Path], Listener]:
    d = tmp_path_factory.mktemp("hostile-media")
    listener = Listener()
    files: dict[str, pathlib.Path] = {}
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=300:duration=8",
            "-f", "lavfi", "-i", "testsrc=size=64x64:rate=5:duration=8",
            "-c:a", "aac", "-c:v", "libx264", "-shortest", str(d / "ok.mp4"))
    whole = (d / "ok.mp4").read_bytes()
    files["truncated"] = d / "truncated.mp4"
    files["truncated"].write_bytes(whole[: len(whole) // 3])
    files["no_audio"] = d / "no_audio.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=5:duration=3", "-c:v", "libx264", str(files["no_audio"]))
    files["many_streams"] = d / "many.mkv"
    inputs = [a for i in range(8) for a in ("-f", "lavfi", "-i", f"sine=frequency={200 + 50 * i}:duration=4")]
    maps = [a for i in range(8) for a in ("-map", str(i))]
    _ffmpeg(*inputs, *maps, "-c:a", "libopus", str(files["many_streams"]))
    files["huge_rate"] = d / "huge_rate.wav"
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=1000:duration=3:sample_rate=384000", str(files["huge_rate"]))
    files["playlist"] = d / "evil.m3u8"
    files["playlist"].write_text("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n"
                                 f"http://127.0.0.1:{listener.port}/segment.ts\n#EXT-X-ENDLIST\n")
    files["local_playlist"] = d / "local.m3u8"
    files["local_playlist"].write_text("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n/etc/passwd\n#EXT-X-ENDLIST\n")
    files["text"] = d / "notes.mp4"
    files["text"].write_text("this is not a video\n" * 100)
    files["hostile_name"] = d / "ok.mp4"
    return files, listener


EXPECT = {  # READY, or FAILED with these words in the reason
    "truncated": ("FAILED", ""), "no_audio": ("FAILED", "no audio"), "many_streams": ("READY", ""),
    "huge_rate": ("READY", ""), "playlist": ("FAILED", ""), "local_playlist": ("FAILED", ""),
    "text": ("FAILED", "not a readable audio or video file"), "hostile_name": ("READY", ""),
}
NAMES = {"hostile_name": "../../etc/ünï\u202ecodé\t<script>.mp4"}


def test_hostile_media_end_cleanly(client: Any, corpus: tuple[dict[str, pathlib.Path], Listener]) -> None:
    files, listener = corpus
    uploaded = {}
    for what, path in files.items():
        uploaded[what] = client.upload(str(path)) if what not in NAMES else _upload_named(client, path, NAMES[what])
    outcome = {}
    for what, media in uploaded.items():
        outcome[what] = wait_for(lambda m=media: (r := client.get_media(m.name)).state
                                 != media_pb2.MEDIA_STATE_PROCESSING and r, 120, f"{what} to be prepared")
    report = {w: (media_pb2.MediaState.Name(m.state), m.error_message) for w, m in outcome.items()}
    print("\nhostile media:", *(f"\n  {w}: {s} {e}" for w, (s, e) in report.items()))
    for what, (state, words) in EXPECT.items():
        got_state, reason = report[what]
        assert got_state == f"MEDIA_STATE_{state}", (what, report[what])
        assert words in reason and not any(leak in reason for leak in LEAKS), (what, reason)
    assert listener.connections == 0, "a playlist made the worker fetch from the network"


def _upload_named(client: Any, path: pathlib.Path, name: str) -> Any:
    import hashlib
    import uuid

    data = path.read_bytes()

    def reqs() -> Any:
        yield media_pb2.UploadMediaRequest(metadata=media_pb2.UploadMetadata(
            filename=name, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), request_id=str(uuid.uuid4())))
        yield media_pb2.UploadMediaRequest(chunk=media_pb2.UploadChunk(data=data))

    return client.media.UploadMedia(reqs(), metadata=client.metadata, timeout=60).media
