"""The user's commands: a client of the API (no server or worker code in here).

    mp4totext transcribe FILE            upload, watch, print the transcript (--speakers, --format srt...)
    mp4totext export transcriptions/ID   download as txt, srt, vtt, json or tsv
    mp4totext list|get|cancel|delete     manage media and transcriptions
    mp4totext token --user ID [--ttl S]  mint an end-user token for your app (tenant API key)
    mp4totext webhooks create URL --events ...|list|deliveries|redeliver NAME   (tenant API key)

``launch.cli`` adds the commands that run the service (serve, worker, embedded, create-key).
In a terminal, progress shows as bars with speed and time left (rich); elsewhere only the
status lines (uploaded, created, the result's summary) are printed, to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Any, Callable

import grpc
from google.protobuf import json_format
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from mp4totext import cli_webhooks, config
from mp4totext.client import ITEM_TERMINAL, Client, enhancement_requests
from mp4totext.live_cli import add_live
from mp4totext.v1 import media_pb2
from mp4totext.v1 import transcription_pb2 as tpb

KEY_FILE = "api.key"


def _client(args: argparse.Namespace) -> Client:
    key = args.api_key or os.environ.get("MP4T_API_KEY")
    if not key:
        key_path = pathlib.Path(config.settings().data_dir) / KEY_FILE
        if key_path.exists():
            key = key_path.read_text().strip()
    if not key:
        raise SystemExit("no API key: pass --api-key, set MP4T_API_KEY, or run `mp4totext create-key`")
    return Client(args.server, key)


EXPORT_CHOICES = ["text", "txt", "srt", "vtt", "json", "tsv", "md"]
ITEM_CHOICES = ["cleanup", "translation", "summary", "lecture_notes"]


def known_speaker_args(values: list[str] | None) -> list[tuple[str, str]]:
    """``--known-speaker NAME=FILE`` values as (name, file) pairs."""
    pairs = []
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path:
            raise SystemExit(f"--known-speaker {value!r}: expected NAME=FILE, e.g. 'Ayşe=ayse.m4a'")
        if not os.path.isfile(path):
            raise SystemExit(f"--known-speaker {value!r}: no such file {path!r}")
        pairs.append((name.strip(), path))
    return pairs


def _config(args: argparse.Namespace, known: list[tpb.KnownSpeaker] | None = None) -> dict:
    cfg: dict = {"language_code": getattr(args, "language", ""),
                 "priority": tpb.Priority.Value(f"PRIORITY_{getattr(args, 'priority', 'normal').upper()}")}
    if getattr(args, "task", "transcribe") == "translate":
        cfg["task"] = tpb.TRANSCRIPTION_TASK_TRANSLATE
    if getattr(args, "model", None):
        cfg["model"] = args.model
    if getattr(args, "expect", None):
        cfg["expected_language_codes"] = [c.strip() for c in args.expect.split(",") if c.strip()]
    if getattr(args, "prompt", None):
        cfg["initial_prompt"] = args.prompt
    if getattr(args, "hotword", None):
        cfg["hotwords"] = args.hotword
    if getattr(args, "beam_size", 0):
        cfg["beam_size"] = args.beam_size
    if getattr(args, "no_vad", False):
        cfg["enable_vad"] = False
    items = _items(args)
    if items:
        cfg["enhancements"] = items
    if known or any(getattr(args, a, None) for a in ("speakers", "min_speakers", "max_speakers")):
        cfg["diarization_config"] = tpb.DiarizationConfig(
            enable_speaker_diarization=True, min_speaker_count=getattr(args, "min_speakers", 0) or 0,
            max_speaker_count=getattr(args, "max_speakers", 0) or 0, known_speakers=known or [])
    return cfg


def _write(args: argparse.Namespace, data: bytes) -> None:
    if getattr(args, "output", None):
        pathlib.Path(args.output).write_bytes(data)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(data.decode("utf-8"))
        sys.stdout.flush()


def _items(args: argparse.Namespace) -> list:
    translate = [c.strip() for c in (getattr(args, "translate_to", None) or "").split(",") if c.strip()]
    return enhancement_requests(getattr(args, "cleanup", False), translate, getattr(args, "summary", False),
                                getattr(args, "notes", False), getattr(args, "ai_language", "") or "")


def _export(client: Client, args: argparse.Namespace, name: str) -> bytes:
    fmt = "txt" if args.format == "text" else args.format
    return client.export(name, fmt, getattr(args, "max_line_length", 0) or 0,
                         getattr(args, "max_lines", 0) or 0, getattr(args, "max_caption_seconds", 0.0) or 0.0,
                         kind=getattr(args, "item", "") or "", language=getattr(args, "item_language", "") or "")


def _items_report(job: tpb.Transcription) -> None:
    for e in job.enhancements:
        kind = tpb.EnhancementKind.Name(e.kind).removeprefix("ENHANCEMENT_KIND_").lower()
        state = tpb.EnhancementState.Name(e.state).removeprefix("ENHANCEMENT_STATE_")
        lang = f" {e.target_language_code}" if e.target_language_code else ""
        why = f": {e.error_message}" if e.error_message else ""
        stderr.print(f"{kind}{lang}: {state} ({e.usage.prompt_tokens}+{e.usage.completion_tokens} tokens){why}")


stderr = Console(stderr=True, highlight=False)


def _progress(*columns: Any) -> Progress:
    """Bars with speed and time left in a terminal; nothing (plain status lines only) elsewhere."""
    columns = columns or (TaskProgressColumn(), TextColumn("{task.fields[detail]}"), TimeRemainingColumn())
    return Progress(TextColumn("{task.description:<11}"), BarColumn(), *columns, console=stderr,
                    disable=not stderr.is_terminal)


def _watch(client: Client, name: str) -> None:
    """Show the job's progress until it ends (speed as multiples of real time)."""
    with _progress() as bars:
        task = bars.add_task("transcribe", total=100.0, detail="")
        started = None
        for ev in client.watch(name):
            stage = tpb.TranscriptionStage.Name(ev.stage).removeprefix("TRANSCRIPTION_STAGE_").lower()
            done_s = ev.processed_duration.ToTimedelta().total_seconds()
            if ev.stage == tpb.TRANSCRIPTION_STAGE_TRANSCRIBING and started is None:
                started = (bars.get_time(), done_s)
            speed = ""
            if started is not None and bars.get_time() > started[0] and done_s > started[1]:
                speed = f" {(done_s - started[1]) / (bars.get_time() - started[0]):.1f}x real time"
            if ev.enhancements and ev.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED:  # the AI items run now
                ended = sum(i.state in ITEM_TERMINAL for i in ev.enhancements)
                chunks = sum(i.chunks_done for i in ev.enhancements), sum(i.chunks_total for i in ev.enhancements)
                stage, speed = f"AI items {ended}/{len(ev.enhancements)}", f", chunks {chunks[0]}/{chunks[1]}"
            bars.update(task, completed=ev.progress_percent, detail=f"{stage}{speed}")


def cmd_transcribe(args: argparse.Namespace) -> int:
    references = known_speaker_args(getattr(args, "known_speaker", None))
    with _client(args) as client:
        known = [client.known_speaker(name, path) for name, path in references]
        if known:
            stderr.print("known speakers: " + ", ".join(f"{k.display_name} ({k.media})" for k in known))
        size = os.path.getsize(args.file)
        with _progress(DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()) as bars:
            task = bars.add_task("upload", total=size, detail="")
            media = client.upload(args.file, on_progress=lambda sent, _total: bars.update(task, completed=sent))
        stderr.print(f"uploaded {media.name} ({media.size_bytes} bytes)")
        job = client.create(media.name, **_config(args, known))
        stderr.print(f"created {job.name}")
        _watch(client, job.name)
        job = client.get(job.name)
        if job.state != tpb.TRANSCRIPTION_STATE_SUCCEEDED:
            state = tpb.TranscriptionState.Name(job.state)
            stderr.print(f"{job.name} ended {state}: {job.error_message}")
            return 1
        for warning in job.warnings:
            stderr.print(f"warning: {warning}")
        _items_report(job)
        _write(args, _export(client, args, job.name))
        r = job.result
        speakers = f" speakers={r.speaker_count}" if r.speaker_count else ""
        mixed = " languages=" + ",".join(x.language_code for x in r.languages) if len(r.languages) > 1 else ""
        stderr.print(f"language={r.language_code} ({r.language_probability:.2f}){mixed} model={r.model} "
                     f"duration={r.duration.ToTimedelta()} processing={r.processing_duration.ToTimedelta()}{speakers}")
    return 0


def cmd_enhance(args: argparse.Namespace) -> int:
    with _client(args) as client:
        items = _items(args)
        if not items:
            stderr.print("nothing asked: give --cleanup, --translate-to, --summary or --notes")
            return 2
        job = client.enhance(args.name, items)
        _watch(client, job.name)
        job = client.get(job.name, basic=True)
        _items_report(job)
        failed = [e for e in job.enhancements if e.state != tpb.ENHANCEMENT_STATE_SUCCEEDED]
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _write(args, _export(client, args, args.name))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
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
    with _client(args) as client:
        msg = client.get_media(args.name) if args.name.startswith("media/") else client.get(args.name)
        print(json_format.MessageToJson(msg, preserving_proto_field_name=True))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.call(client.transcriptions.CancelTranscription, tpb.CancelTranscriptionRequest(name=args.name))
        print(f"{job.name}\t{tpb.TranscriptionState.Name(job.state)}\tcancel_requested={job.cancel_requested}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.name.startswith("media/"):
            client.call(client.media.DeleteMedia, media_pb2.DeleteMediaRequest(name=args.name, force=args.force))
        else:
            client.call(client.transcriptions.DeleteTranscription, tpb.DeleteTranscriptionRequest(name=args.name))
        print(f"deleted {args.name}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    with _client(args) as client:
        resp = client.create_user_token(args.user, args.ttl, tuple(args.scope or ()))
    print(json.dumps({"token": resp.token, "user_id": resp.user_id, "key_id": resp.key_id,
                      "expire_time": resp.expire_time.ToJsonString(), "scopes": list(resp.scopes)}))
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    with _client(args) as client:
        resp = client.usage(args.start or "", args.end or "", args.user or "", args.per_user)
    print(json.dumps(json_format.MessageToDict(resp, preserving_proto_field_name=True), indent=2))
    return 0


def _add_usage(sub: Any, client_args: Callable[[argparse.ArgumentParser], None]) -> None:
    sp = sub.add_parser("usage", help="usage per day (audio, speakers, LLM, uploads) with totals and quotas")
    sp.add_argument("--from", dest="start", help="first day YYYY-MM-DD (UTC; default the 1st of this month)")
    sp.add_argument("--to", dest="end", help="last day YYYY-MM-DD (default today)")
    sp.add_argument("--user", help="one end user's usage (tenant API key only)")
    sp.add_argument("--per-user", action="store_true", help="one row per day and end user")
    client_args(sp)
    sp.set_defaults(fn=cmd_usage)


def speaker_args(sp: argparse.ArgumentParser, what: str) -> None:
    """--speakers, --min/max-speakers and --known-speaker NAME=FILE."""
    sp.add_argument("--speakers", action="store_true", help=what)
    sp.add_argument("--min-speakers", type=int, default=0)
    sp.add_argument("--max-speakers", type=int, default=0)
    sp.add_argument("--known-speaker", action="append", metavar="NAME=FILE",
                    help="a person who may speak and a recording of only their voice (repeat): their speaker "
                         "is labelled NAME; implies --speakers")


def add_commands(sub: Any) -> None:
    """Add the user's commands to an argparse subparsers object."""

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

    def ai_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--cleanup", action="store_true", help="AI clean-up of the transcript (punctuation, fillers)")
        sp.add_argument("--translate-to", help="AI translation into these languages, e.g. en,de")
        sp.add_argument("--summary", action="store_true", help="AI summary (decisions and action items for meetings)")
        sp.add_argument("--notes", action="store_true", help="AI lecture notes")
        sp.add_argument("--ai-language", default="", help="language of the summary/notes (default: the transcript's)")

    sp = sub.add_parser("transcribe", help="upload FILE, watch progress, print or save the transcript")
    sp.add_argument("file")
    sp.add_argument("--language", default="", help="BCP-47 code or 'auto' (default)")
    sp.add_argument("--expect", help="languages the speech may be in, e.g. tr,en (detection chooses among them)")
    sp.add_argument("--model", help="a model of the server, e.g. base (default: chosen by language; GetCapabilities lists them)")
    sp.add_argument("--priority", default="normal", choices=["low", "normal", "high", "urgent"])
    sp.add_argument("--task", default="transcribe", choices=["transcribe", "translate"],
                    help="translate = English text from any language (multilingual models)")
    speaker_args(sp, "speaker recognition: who said what")
    sp.add_argument("--prompt", help="initial prompt: names, jargon, style to follow")
    sp.add_argument("--hotword", action="append", help="custom vocabulary (repeat for several)")
    sp.add_argument("--beam-size", type=int, default=0)
    sp.add_argument("--no-vad", action="store_true", help="do not skip silence")
    ai_args(sp)
    export_args(sp)
    client_args(sp)
    sp.set_defaults(fn=cmd_transcribe)

    sp = sub.add_parser("enhance", help="ask for AI items on transcriptions/ID and watch them")
    sp.add_argument("name")
    ai_args(sp)
    client_args(sp)
    sp.set_defaults(fn=cmd_enhance)

    sp = sub.add_parser("export", help="download transcriptions/ID (or one of its AI items) as a file")
    sp.add_argument("name")
    sp.add_argument("--item", choices=ITEM_CHOICES, help="export this AI item instead of the transcript")
    sp.add_argument("--item-language", default="", help="the AI item's target language (translations)")
    export_args(sp)
    client_args(sp)
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("token", help="mint an end-user token for your app's user (needs the tenant's API key)")
    sp.add_argument("--user", required=True, help="your own id for the end user")
    sp.add_argument("--ttl", type=float, default=None, help="lifetime in seconds (default 3600, at most 86400)")
    sp.add_argument("--scope", action="append", choices=["read", "write"], help="restrict it (repeat); default both")
    client_args(sp)
    sp.set_defaults(fn=cmd_token)

    _add_usage(sub, client_args)
    add_live(sub, client_args, _client)
    cli_webhooks.add(sub, client_args, _client)
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


def run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse ``argv`` and run its command; API errors print as ``error: CODE: details`` (exit 2)."""
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that cannot be read, or changed during its upload
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mp4totext", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_commands(p.add_subparsers(dest="cmd", required=True))
    return run(p, argv)


if __name__ == "__main__":
    sys.exit(main())
