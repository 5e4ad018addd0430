"""mp4totext command line: run the server/workers/embedded mode, manage keys, and a client.

    mp4totext embedded [FILE | --demo]   server + workers in one process, no external services
    mp4totext serve                      gRPC server (production)
    mp4totext worker --queues high       Dramatiq worker for some queues
    mp4totext create-key --tenant NAME   create an API key (printed once)
    mp4totext transcribe FILE            upload, watch, print the transcript (--speakers, --format srt...)
    mp4totext export transcriptions/ID   download as txt, srt, vtt, json or tsv
    mp4totext list|get|cancel|delete     manage media and transcriptions
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import grpc

from mp4totext import config

KEY_FILE = "api.key"


def _bar(label: str, fraction: float, extra: str = "") -> None:
    if not sys.stderr.isatty() and fraction < 1.0:
        return
    width = 30
    filled = int(width * max(0.0, min(fraction, 1.0)))
    sys.stderr.write(f"\r{label:<12} [{'#' * filled}{'.' * (width - filled)}] {fraction * 100:5.1f}% {extra}")
    if fraction >= 1.0:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from mp4totext.client import Client

    key = args.api_key or os.environ.get("MP4T_API_KEY")
    if not key:
        key_path = pathlib.Path(config.settings().data_dir) / KEY_FILE
        if key_path.exists():
            key = key_path.read_text().strip()
    if not key:
        raise SystemExit("no API key: pass --api-key, set MP4T_API_KEY, or run `mp4totext create-key`")
    return Client(args.server, key)


EXPORT_CHOICES = ["text", "txt", "srt", "vtt", "json", "tsv"]


def _config(args: argparse.Namespace) -> dict:
    from mp4totext.v1 import transcription_pb2 as tpb

    cfg: dict = {"language_code": getattr(args, "language", ""),
                 "priority": tpb.Priority.Value(f"PRIORITY_{getattr(args, 'priority', 'normal').upper()}")}
    if getattr(args, "task", "transcribe") == "translate":
        cfg["task"] = tpb.TRANSCRIPTION_TASK_TRANSLATE
    if getattr(args, "prompt", None):
        cfg["initial_prompt"] = args.prompt
    if getattr(args, "hotword", None):
        cfg["hotwords"] = args.hotword
    if getattr(args, "beam_size", 0):
        cfg["beam_size"] = args.beam_size
    if getattr(args, "no_vad", False):
        cfg["enable_vad"] = False
    if getattr(args, "speakers", False) or getattr(args, "min_speakers", 0) or getattr(args, "max_speakers", 0):
        cfg["diarization_config"] = tpb.DiarizationConfig(
            enable_speaker_diarization=True, min_speaker_count=args.min_speakers or 0,
            max_speaker_count=args.max_speakers or 0)
    return cfg


def _write(args: argparse.Namespace, data: bytes) -> None:
    if getattr(args, "output", None):
        pathlib.Path(args.output).write_bytes(data)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(data.decode("utf-8"))
        sys.stdout.flush()


def _export(client, args: argparse.Namespace, name: str) -> bytes:  # type: ignore[no-untyped-def]
    fmt = "txt" if args.format == "text" else args.format
    return client.export(name, fmt, getattr(args, "max_line_length", 0) or 0,
                         getattr(args, "max_lines", 0) or 0, getattr(args, "max_caption_seconds", 0.0) or 0.0)


def cmd_transcribe(args: argparse.Namespace) -> int:
    from mp4totext.v1 import transcription_pb2 as tpb

    with _client(args) as client:
        media = client.upload(args.file, on_progress=lambda sent, total: _bar("upload", sent / max(total, 1)))
        print(f"uploaded {media.name} ({media.size_bytes} bytes)", file=sys.stderr)
        job = client.create(media.name, **_config(args))
        print(f"created {job.name}", file=sys.stderr)
        for ev in client.watch(job.name):
            stage = tpb.TranscriptionStage.Name(ev.stage).removeprefix("TRANSCRIPTION_STAGE_").lower()
            _bar("transcribe", ev.progress_percent / 100, stage)
        job = client.get(job.name)
        if job.state != tpb.TRANSCRIPTION_STATE_SUCCEEDED:
            if sys.stderr.isatty():
                sys.stderr.write("\n")
            state = tpb.TranscriptionState.Name(job.state)
            print(f"{job.name} ended {state}: {job.error_message}", file=sys.stderr)
            return 1
        for warning in job.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        _write(args, _export(client, args, job.name))
        r = job.result
        speakers = f" speakers={r.speaker_count}" if r.speaker_count else ""
        print(f"language={r.language_code} ({r.language_probability:.2f}) duration={r.duration.ToTimedelta()} "
              f"processing={r.processing_duration.ToTimedelta()}{speakers}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _write(args, _export(client, args, args.name))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from mp4totext.v1 import media_pb2, transcription_pb2 as tpb

    with _client(args) as client:
        token = ""
        while True:
            if args.what == "media":
                resp = client.call(client.media.ListMedia, media_pb2.ListMediaRequest(page_size=100, page_token=token))
                for m in resp.media:
                    print(f"{m.name}\t{media_pb2.MediaState.Name(m.state)}\t{m.size_bytes}\t{m.filename}")
            else:
                resp = client.call(client.transcriptions.ListTranscriptions,
                                   tpb.ListTranscriptionsRequest(page_size=100, page_token=token))
                for j in resp.transcriptions:
                    print(f"{j.name}\t{tpb.TranscriptionState.Name(j.state)}\t{j.progress_percent:.0f}%\t{j.media}")
            token = resp.next_page_token
            if not token:
                return 0


def cmd_get(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    with _client(args) as client:
        msg = client.get_media(args.name) if args.name.startswith("media/") else client.get(args.name)
        print(json_format.MessageToJson(msg, preserving_proto_field_name=True))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from mp4totext.v1 import transcription_pb2 as tpb

    with _client(args) as client:
        job = client.call(client.transcriptions.CancelTranscription, tpb.CancelTranscriptionRequest(name=args.name))
        print(f"{job.name}\t{tpb.TranscriptionState.Name(job.state)}\tcancel_requested={job.cancel_requested}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from mp4totext.v1 import media_pb2, transcription_pb2 as tpb

    with _client(args) as client:
        if args.name.startswith("media/"):
            client.call(client.media.DeleteMedia, media_pb2.DeleteMediaRequest(name=args.name, force=args.force))
        else:
            client.call(client.transcriptions.DeleteTranscription, tpb.DeleteTranscriptionRequest(name=args.name))
        print(f"deleted {args.name}")
    return 0


def cmd_create_key(args: argparse.Namespace) -> int:
    from mp4totext import runtime
    from server.auth import create_key

    runtime.init()
    key, tenant = create_key(args.tenant, args.label)
    print(json.dumps({"tenant": tenant.name, "tenant_id": tenant.id, "api_key": key}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from mp4totext import runtime
    from observability.logging import setup_logging
    from server.app import Server, install_signal_handlers
    from workers.broker import setup_broker

    from observability.tracing import setup_tracing

    s = config.settings()
    setup_logging(s.log_level, s.log_format, "server")
    setup_tracing("mp4totext-server")
    runtime.init(s)
    setup_broker(s)  # for enqueueing
    server = Server().start()
    install_signal_handlers(server.stop)
    server.wait()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from observability.logging import setup_logging
    from workers.main import run

    s = config.settings()
    queues = [q.strip() for q in (args.queues or s.worker_queues).split(",") if q.strip()]
    setup_logging(s.log_level, s.log_format, "worker")
    run(s, queues, args.threads or s.worker_threads)
    return 0


def cmd_embedded(args: argparse.Namespace) -> int:
    from mp4totext.embedded import run_embedded

    return run_embedded(args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mp4totext", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def client_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--server", default=os.environ.get("MP4T_SERVER", "127.0.0.1:50051"),
                        help="host:port of the gRPC server or HAProxy (env MP4T_SERVER)")
        sp.add_argument("--api-key", default=None, help="API key (env MP4T_API_KEY; default: <data_dir>/api.key)")

    def export_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--format", default="text", choices=EXPORT_CHOICES,
                        help="text/txt, srt, vtt (subtitles), json (full result), tsv")
        sp.add_argument("--max-line-length", type=int, default=0, help="subtitles: characters per line (42)")
        sp.add_argument("--max-lines", type=int, default=0, help="subtitles: lines per caption (2)")
        sp.add_argument("--max-caption-seconds", type=float, default=0.0, help="subtitles: longest caption (6)")
        sp.add_argument("-o", "--output", help="write here instead of stdout")

    sp = sub.add_parser("transcribe", help="upload FILE, watch progress, print or save the transcript")
    sp.add_argument("file")
    sp.add_argument("--language", default="", help="BCP-47 code or 'auto' (default)")
    sp.add_argument("--priority", default="normal", choices=["low", "normal", "high", "urgent"])
    sp.add_argument("--task", default="transcribe", choices=["transcribe", "translate"],
                    help="translate = English text from any language (multilingual models)")
    sp.add_argument("--speakers", action="store_true", help="speaker recognition: who said what")
    sp.add_argument("--min-speakers", type=int, default=0)
    sp.add_argument("--max-speakers", type=int, default=0)
    sp.add_argument("--prompt", help="initial prompt: names, jargon, style to follow")
    sp.add_argument("--hotword", action="append", help="custom vocabulary (repeat for several)")
    sp.add_argument("--beam-size", type=int, default=0)
    sp.add_argument("--no-vad", action="store_true", help="do not skip silence")
    export_args(sp)
    client_args(sp)
    sp.set_defaults(fn=cmd_transcribe)

    sp = sub.add_parser("export", help="download transcriptions/ID as txt, srt, vtt, json or tsv")
    sp.add_argument("name")
    export_args(sp)
    client_args(sp)
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("list", help="list media or transcriptions")
    sp.add_argument("what", choices=["media", "transcriptions"])
    client_args(sp)
    sp.set_defaults(fn=cmd_list)
    for name, fn, helptext in (("get", cmd_get, "show media/ID or transcriptions/ID as JSON"),
                               ("cancel", cmd_cancel, "cancel transcriptions/ID"),
                               ("delete", cmd_delete, "delete media/ID or transcriptions/ID")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("name")
        if name == "delete":
            sp.add_argument("--force", action="store_true", help="also delete the media's transcriptions")
        client_args(sp)
        sp.set_defaults(fn=fn)

    sp = sub.add_parser("create-key", help="create an API key for a tenant (created if new)")
    sp.add_argument("--tenant", required=True)
    sp.add_argument("--label", default="")
    sp.set_defaults(fn=cmd_create_key)

    sp = sub.add_parser("serve", help="run the gRPC server (configured by MP4T_* variables)")
    sp.set_defaults(fn=cmd_serve)

    sp = sub.add_parser("worker", help="run a Dramatiq worker")
    sp.add_argument("--queues", help="comma-separated subset of critical,high,default,low")
    sp.add_argument("--threads", type=int, default=0)
    sp.set_defaults(fn=cmd_worker)

    sp = sub.add_parser("embedded", help="server + workers in one process: SQLite, local disk, in-memory queue")
    sp.add_argument("file", nargs="?", help="transcribe this file through the server, print it, and exit")
    sp.add_argument("--demo", action="store_true", help="transcribe a generated English sample and exit")
    sp.add_argument("--serve", action="store_true", help="keep serving after FILE/--demo")
    sp.add_argument("--listen", default=None, help="host:port (default MP4T_GRPC_LISTEN or 127.0.0.1:50051)")
    sp.add_argument("--data-dir", default=None, help="default MP4T_DATA_DIR or ./data")
    sp.set_defaults(fn=cmd_embedded)

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
