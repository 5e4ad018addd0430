"""Batched decoding through the real stack (issue 14): a worker whose threshold is below the
file's length decodes it batched (its log line says so) with timed words, and a cancel during
the batched decoding ends the job within seconds (the stage's watchdog between batches)."""
from __future__ import annotations

import pathlib
import time
from typing import Any

from mp4totext import samples
from mp4totext.v1 import transcription_pb2 as tpb
from tests.support import Stack, log_lines, wait_for


def decoding_lines(stack: Stack, job_name: str) -> list[dict[str, Any]]:
    job_id = job_name.split("/")[1]
    return [ln for ln in log_lines(stack.workers["high"]) if ln.get("event") == "whisper_decoding"
            and ln.get("job_id") == job_id]


def test_long_media_is_decoded_batched_and_a_cancel_stops_it_between_batches(stack: Stack, client: Any,
                                                                              tmp_path: pathlib.Path) -> None:
    text = samples.lecture_text(80)
    lecture = samples.make_media(text, str(tmp_path / "lecture.m4a"), video=False)
    media = client.upload(lecture)
    # 80 s: three 30 s chunks, one per batch (batches shrink to report progress); the cancel lands between two.
    stack.restart_worker("high", MP4T_WHISPER_BATCH_MIN_S="30", MP4T_WHISPER_BATCH_SIZE="2")
    try:
        done = client.get(client.wait(client.create(media.name).name, timeout=300).name)
        assert done.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED, (done.state, done.error_message)
        assert [(ln["mode"], ln["batch_size"]) for ln in decoding_lines(stack, done.name)] == [("batched", 1)]
        words = [w for seg in done.result.segments for w in seg.words]
        assert len(words) > 100
        starts = [w.start_offset.ToTimedelta().total_seconds() for w in words]
        assert starts == sorted(starts)
        assert samples.word_error_rate(text, done.result.text) < 0.12
        assert done.result.language_code == "en"

        short = client.upload(samples.make_media(samples.lecture_text(12), str(tmp_path / "short.m4a"), video=False))
        done = client.wait(client.create(short.name).name, timeout=120)
        assert done.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED
        assert [ln["mode"] for ln in decoding_lines(stack, done.name)] == ["sequential"]

        job = client.create(media.name)
        wait_for(lambda: decoding_lines(stack, job.name), 120, "batched decoding to start", 0.05)
        time.sleep(1.0)
        client.call(client.transcriptions.CancelTranscription, tpb.CancelTranscriptionRequest(name=job.name))
        asked = time.monotonic()
        done = client.wait(job.name, timeout=120)
        cancel_s = time.monotonic() - asked
        assert done.state == tpb.TRANSCRIPTION_STATE_CANCELLED, (done.state, done.error_message)
        assert cancel_s < 10, f"cancel took {cancel_s:.1f} s"
        print(f"\nbatched decoding cancelled {cancel_s:.1f} s after the request")
    finally:
        stack.restart_worker("high")
