"""Embedded mode: gRPC server + in-process workers, SQLite, local-disk storage, in-memory queue."""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import threading

from core import runtime
from launch import live
from core.plan import QUEUES
from core.queue import make_broker
from mp4totext import config
from mp4totext.cli import KEY_FILE, cmd_transcribe
from mp4totext.samples import DEMO_TEXT, make_media
from observability.logging import setup_logging
from observability.tracing import setup_tracing
from server.app import Server, install_signal_handlers
from server.auth import create_key
from workers.main import Worker

LOG_FILE = "embedded.log"


def _key(data_dir: pathlib.Path) -> str:
    path = data_dir / KEY_FILE
    if path.exists():
        return path.read_text().strip()
    key, _tenant = create_key("local", "embedded mode")
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def _wants_speakers(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "speakers", False) or getattr(args, "min_speakers", 0)
                or getattr(args, "max_speakers", 0) or getattr(args, "known_speaker", None))


def _queues(args: argparse.Namespace) -> list[str]:
    """All queues, except "diarize" for a one-shot run that does not ask for speakers: loading
    the speaker models (torch, pyannote.audio) would only delay that run by seconds."""
    one_shot = bool(args.file or args.demo) and not args.serve
    return [q for q in QUEUES if q != "diarize" or not one_shot or _wants_speakers(args)]


def _transcribe(args: argparse.Namespace, port: int, key: str) -> int:
    client_args = argparse.Namespace(server=f"127.0.0.1:{port}", api_key=key,
                                     language=getattr(args, "language", ""), expect=getattr(args, "expect", None),
                                     priority="normal", format=getattr(args, "format", "text"), output=None,
                                     file=args.file,
                                     speakers=getattr(args, "speakers", False),
                                     min_speakers=getattr(args, "min_speakers", 0),
                                     max_speakers=getattr(args, "max_speakers", 0),
                                     known_speaker=getattr(args, "known_speaker", None))
    with tempfile.TemporaryDirectory() as tmp:
        if args.demo:
            client_args.file = make_media(DEMO_TEXT, os.path.join(tmp, "demo.mp4"))
            print("demo: transcribing a generated English sample (espeak-ng speech in an MP4)", file=sys.stderr)
        return cmd_transcribe(client_args)


def run_embedded(args: argparse.Namespace) -> int:
    overrides = {"broker_url": "memory", "storage_backend": "local",
                 "database_url": os.environ.get("MP4T_DATABASE_URL", "")}
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.listen:
        overrides["grpc_listen"] = args.listen
    s = config.reload(**overrides)
    data_dir = pathlib.Path(s.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    # In a terminal the server's log goes to a file, so it does not run across the progress bars.
    log_file = str(data_dir / LOG_FILE) if sys.stderr.isatty() else None
    setup_logging(s.log_level, s.log_format, "embedded", file=log_file)
    setup_tracing("mp4totext-embedded")
    runtime.init(s)
    broker = make_broker(s)
    # Speaker recognition runs here too when the diarize extra and the offline models are
    # installed (loaded now, so GetCapabilities is true only once it really works); without
    # them the server refuses it with the install instructions, and the user sees why here.
    worker = Worker(broker, s, _queues(args), threads=max(2, s.worker_threads), optional_diarization=True)
    if worker.diarization_unavailable:
        print(f"mp4totext embedded: speaker recognition is off: {worker.diarization_unavailable}", file=sys.stderr)
    server = Server(live_decoders=live.decoders(s)).start()
    key = _key(data_dir)
    stopped = threading.Event()

    def stop() -> None:
        server.stop()
        worker.stop(5)
        stopped.set()

    install_signal_handlers(stop)
    print(f"mp4totext embedded: listening on {s.grpc_listen} (data in {data_dir.resolve()}); "
          f"API key in {data_dir / KEY_FILE}" + (f"; log in {log_file}" if log_file else ""), file=sys.stderr)
    rc = 0
    if args.file or args.demo:
        rc = _transcribe(args, server.port, key)
        if not args.serve:
            stop()
            return rc
    print("press Ctrl-C to stop", file=sys.stderr)
    stopped.wait()
    return rc
