"""Embedded mode: gRPC server + in-process workers, SQLite, local-disk storage, in-memory queue."""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import threading

from core import runtime
from core.plan import QUEUES
from core.queue import make_broker
from mp4totext import config
from mp4totext.cli import KEY_FILE, cmd_transcribe
from mp4totext.samples import SENTENCES, make_media
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


def _transcribe(args: argparse.Namespace, port: int, key: str) -> int:
    client_args = argparse.Namespace(server=f"127.0.0.1:{port}", api_key=key, language="", priority="normal",
                                     format="text", output=None, file=args.file)
    with tempfile.TemporaryDirectory() as tmp:
        if args.demo:
            client_args.file = make_media(" ".join(SENTENCES[:4]), os.path.join(tmp, "demo.mp4"))
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
    worker = Worker(broker, s, list(QUEUES), threads=max(2, s.worker_threads), optional_diarization=True)
    server = Server().start()
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
