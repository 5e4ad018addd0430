"""``mp4totext live FILE``: stream a file's audio as live captions (``--realtime``: at 1x, as a
recorder would), print the final segments as they come (interim text on the same line on a
terminal), and end with the media and the transcription the recording became."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from typing import Any, Callable

from mp4totext.live_client import LiveCaptions, pcm_chunks
from mp4totext.v1 import live_pb2 as lpb
from mp4totext.v1 import transcription_pb2 as tpb


def file_pcm(path: str) -> bytes:
    """The file's audio as 16 kHz mono PCM16 (ffmpeg)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise OSError("ffmpeg is not installed: apt-get install ffmpeg")
    proc = subprocess.run([ffmpeg, "-nostdin", "-v", "error", "-i", path, "-vn", "-ac", "1", "-ar", "16000", "-f",
                           "s16le", "pipe:1"], capture_output=True)
    if proc.returncode != 0:
        raise OSError(f"ffmpeg cannot read {path}: {proc.stderr.decode(errors='replace').strip()[-300:]}")
    return proc.stdout


def cmd_live(args: argparse.Namespace, client_of: Callable[[argparse.Namespace], Any]) -> int:
    config = lpb.LiveConfig(encoding=lpb.AUDIO_ENCODING_PCM16, sample_rate_hertz=16000,
                            language_code=args.language or "", filename=args.file.rsplit("/", 1)[-1])
    if args.expect:
        config.expected_language_codes.extend(c.strip() for c in args.expect.split(",") if c.strip())
    if args.transcribe:
        config.transcription_config.CopyFrom(tpb.TranscriptionConfig(
            diarization_config=tpb.DiarizationConfig(enable_speaker_diarization=True) if args.speakers else None))
    tty = sys.stdout.isatty()

    def show(event: lpb.StreamLiveResponse) -> None:
        which = event.WhichOneof("event")
        if which == "segment":
            seg = event.segment
            line = f"[{seg.start_offset.ToTimedelta()} -> {seg.end_offset.ToTimedelta()}] {seg.text}"
            print(("\r\033[K" if tty else "") + line, flush=True)
        elif which == "interim" and tty:
            print("\r\033[K" + event.interim.text[-100:], end="", flush=True)
        elif which == "session":
            print(f"live session {event.session.name} (model {event.session.model}, "
                  f"{event.session.language_code})", file=sys.stderr)

    with client_of(args) as client:
        ended = LiveCaptions(client, config).run(pcm_chunks(file_pcm(args.file)), show, realtime=args.realtime)
    print(f"recording: {ended.media}" + (f", transcription: {ended.transcription}" if ended.transcription else ""),
          file=sys.stderr)
    return 0


def add_live(sub: Any, client_args: Callable[[argparse.ArgumentParser], None],
             client_of: Callable[[argparse.Namespace], Any]) -> None:
    sp = sub.add_parser("live", help="stream FILE as live captions (--realtime: at 1x); the recording becomes media")
    sp.add_argument("file")
    sp.add_argument("--realtime", action="store_true", help="send the audio no faster than it plays")
    sp.add_argument("--language", default="", help="BCP-47 code of the speech (default: the first --expect, or en)")
    sp.add_argument("--expect", help="languages the speech may be in, e.g. tr,en")
    sp.add_argument("--transcribe", action="store_true", help="run the full transcription on the recording at the end")
    sp.add_argument("--speakers", action="store_true", help="with --transcribe: speaker recognition")
    client_args(sp)
    sp.set_defaults(fn=lambda args: cmd_live(args, client_of))
