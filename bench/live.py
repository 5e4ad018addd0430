"""Live captions on this machine: latency, accuracy against the offline job, streams per replica,
and a SIGKILL mid-stream (issue 25).

    .venv/bin/python bench/live.py [--sentences 8] [--models tiny.en,base] [--max-streams 3] [--json PATH]

Real-time paced clients (mp4totext.live_client at 1x, 100 ms chunks, as a phone's recorder)
send generated speech (espeak-ng, a pause after each sentence) to real server processes:

1. Latency and accuracy, one stream per model: first interim text after the first word's end,
   and each final segment after the end of its utterance (the word ends come from an offline
   tiny.en word-timestamp pass over the same audio), p50/p95; WER of the live transcript and of
   the offline job the recording became, on the same audio.
2. Streams per replica: N streams at once on one replica (MP4T_LIVE_MAX_STREAMS=N), N = 1..max;
   a stream keeps up when its final-segment latency p95 stays <= 2.0 s and it hears the end of
   the audio within 2.0 s of sending it. The replica's figure is the largest N where all keep up.
3. SIGKILL: a stream to replica A, A killed with SIGKILL after the first final segment, the
   client resumes on replica B (what a load balancer does); the stored recording's sha256 is
   compared with what the client sent, and the segment ids checked for gaps and duplicates.

Servers are ``mp4totext serve`` processes sharing a SQLite database and a local object store
(replicas of one deployment) and a fresh RabbitMQ vhost; an embedded-mode worker prepares the
media and runs the offline job.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mp4totext import samples  # noqa: E402
from mp4totext.client import Client  # noqa: E402
from mp4totext.live_cli import file_pcm  # noqa: E402
from mp4totext.live_client import LiveCaptions, pcm_chunks  # noqa: E402
from mp4totext.v1 import live_pb2 as lpb  # noqa: E402
from mp4totext.v1 import transcription_pb2 as tpb  # noqa: E402

RABBIT = "amqp://guest:guest@127.0.0.1:5672"
PY = str(ROOT / ".venv" / "bin" / "python")


def norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def wer(ref: str, hyp: str) -> float:
    import jiwer

    return float(jiwer.wer(norm(ref), norm(hyp)))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def lecture(n: int, tmp: pathlib.Path) -> tuple[bytes, str, list[float]]:
    """PCM16 of ``n`` sentences, 0.8 s of silence after each; the text; each utterance's end (s)."""
    parts, ends, t = [], [], 0.0
    texts = (samples.SENTENCES * 3)[1:n + 1]
    for i, text in enumerate(texts):
        wav = tmp / f"s{i}.wav"
        samples.speech_wav(text, str(wav))
        pcm = file_pcm(str(wav))
        audio = np.frombuffer(pcm, dtype="<i2")
        loud = np.nonzero(np.abs(audio) > 300)[0]
        ends.append(t + (loud[-1] + 1) / 16000 if len(loud) else t)
        parts.append(pcm + b"\0" * int(32000 * 0.8))
        t += len(parts[-1]) / 32000
    return b"".join(parts), " ".join(texts), ends


def first_word_end(pcm: bytes, models_dir: str) -> float:
    from workers.stages.model_files import locate
    from workers.stages.transcribe import load_model

    model = load_model(locate("tiny.en", models_dir), "cpu", "default", 2)
    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    segments, _ = model.transcribe(audio[:16000 * 8], language="en", word_timestamps=True)
    for seg in segments:
        for w in seg.words or []:
            return float(w.end)
    return 0.0


class Deployment:
    """Server replicas and one worker sharing a SQLite file, a local store and a RabbitMQ vhost."""

    def __init__(self, tmp: pathlib.Path, models: str) -> None:
        self.tmp, self.procs = tmp, []
        self.vhost = f"mp4t-live-{uuid.uuid4().hex[:8]}"
        subprocess.run(["rabbitmqctl", "add_vhost", self.vhost], check=True, capture_output=True)
        subprocess.run(["rabbitmqctl", "set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*"], check=True,
                       capture_output=True)
        self.env = {**os.environ, "MP4T_DATA_DIR": str(tmp / "data"), "MP4T_BROKER_URL": f"{RABBIT}/{self.vhost}",
                    "MP4T_WHISPER_MODELS": models, "MP4T_LOG_FORMAT": "json", "MP4T_GRPC_GRACE_S": "1"}
        (tmp / "data").mkdir(exist_ok=True)
        out = subprocess.run([PY, "-m", "launch", "create-key", "--tenant", "bench"], env=self.env, check=True,
                             capture_output=True, text=True, cwd=ROOT).stdout
        self.key = json.loads(out.strip().splitlines()[-1])["api_key"]

    def server(self, **env: str) -> tuple[subprocess.Popen, str]:
        log = open(self.tmp / f"server-{len(self.procs)}.log", "w")
        port = _free_port()
        p = subprocess.Popen([PY, "-m", "launch", "serve"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                             env={**self.env, "MP4T_GRPC_LISTEN": f"127.0.0.1:{port}", **env})
        self.procs.append(p)
        target = f"127.0.0.1:{port}"
        _wait_serving(target)
        end = time.monotonic() + 300  # the live models load in the background: measure warm replicas
        while "live_models_loaded" not in (self.tmp / f"server-{len(self.procs) - 1}.log").read_text():
            if time.monotonic() > end:
                raise TimeoutError("the live models did not load")
            time.sleep(0.2)
        return p, target

    def worker(self) -> None:
        log = open(self.tmp / "worker.log", "w")
        self.procs.append(subprocess.Popen([PY, "-m", "launch", "worker"], cwd=ROOT, stdout=log,
                                           stderr=subprocess.STDOUT, env=self.env))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run(["rabbitmqctl", "delete_vhost", self.vhost], capture_output=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_serving(target: str, timeout: float = 90.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with grpc.insecure_channel(target) as ch:
                if health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{target} did not become SERVING")


def stream(target: str, key: str, pcm: bytes, ends: list[float], first_end: float, model_lang: str = "en",
           transcribe: bool = False, on_segment: Any = None) -> dict[str, Any]:
    """One paced stream: latencies (s) of the first interim and of each final, lag, text, names."""
    sent_at: list[float] = []
    finals: list[tuple[float, lpb.LiveSegment]] = []
    interims: list[tuple[float, float]] = []
    cfg = lpb.LiveConfig(encoding=lpb.AUDIO_ENCODING_PCM16, sample_rate_hertz=16000, language_code=model_lang)
    if transcribe:
        cfg.transcription_config.CopyFrom(tpb.TranscriptionConfig())

    def on_event(e: lpb.StreamLiveResponse) -> None:
        now = time.monotonic()
        which = e.WhichOneof("event")
        if which == "segment":
            finals.append((now, e.segment))
            if on_segment is not None:
                on_segment(e.segment)
        elif which == "interim" and e.interim.text:
            interims.append((now, e.interim.audio_offset.ToTimedelta().total_seconds()))

    with Client(target, key) as client:
        captions = LiveCaptions(client, cfg)
        start = time.monotonic()
        sent_at.append(start)
        ended = captions.run(pcm_chunks(pcm), on_event, realtime=True)
    audio_s = len(pcm) / 32000
    # a final's latency: when it arrived, less when its utterance's last sample was sent (1x pacing)
    final_lat = []
    for arrived, seg in finals:
        end_s = seg.end_offset.ToTimedelta().total_seconds()
        utterance_end = min((e for e in ends if e >= end_s - 0.6), default=end_s)
        final_lat.append(arrived - (start + utterance_end))
        if os.environ.get("BENCH_LIVE_DEBUG"):
            print(f"  final end={end_s:.2f} utterance_end={utterance_end:.2f} arrived={arrived - start:.2f} "
                  f"latency={final_lat[-1]:.2f} {seg.text[:40]!r}", flush=True)
    first = (interims[0][0] - (start + first_end)) if interims else float("nan")
    lag = max((now - start - heard for now, heard in interims), default=0.0)
    return {"first_interim_s": first, "final_latency_s": final_lat, "lag_max_s": lag,
            "text": " ".join(s.text for _, s in finals), "ids": [s.id for _, s in finals], "ended": ended,
            "reconnects": captions.reconnects, "wall_s": time.monotonic() - start, "audio_s": audio_s}


def part_latency(dep: Deployment, models: list[str], pcm: bytes, text: str, ends: list[float],
                 first_end: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in models:
        env = {"MP4T_WHISPER_MODELS": model, "MP4T_LIVE_MAX_STREAMS": "1"}
        proc, target = dep.server(**env)
        r = stream(target, dep.key, pcm, ends, first_end, transcribe=True)
        with Client(target, dep.key) as client:
            job = client.wait(r["ended"].transcription, timeout=900)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        out[model] = {"first_interim_s": round(r["first_interim_s"], 3),
                      "final_p50_s": round(pct(r["final_latency_s"], 50), 3),
                      "final_p95_s": round(pct(r["final_latency_s"], 95), 3), "finals": len(r["ids"]),
                      "wer_live": round(wer(text, r["text"]), 4), "wer_offline": round(wer(text, job.result.text), 4),
                      "offline_model": job.result.model}
        print(f"[latency] {model}: {out[model]}", flush=True)
    return out


def part_streams(dep: Deployment, models: list[str], pcm: bytes, ends: list[float], first_end: float,
                 max_streams: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in models:
        rows = []
        for n in range(1, max_streams + 1):
            proc, target = dep.server(MP4T_WHISPER_MODELS=model, MP4T_LIVE_MAX_STREAMS=str(n))
            results: list[dict[str, Any]] = []
            threads = [threading.Thread(target=lambda: results.append(stream(target, dep.key, pcm, ends, first_end)))
                       for _ in range(n)]
            for t in threads:
                t.start()
                time.sleep(0.37)  # not in lockstep
            for t in threads:
                t.join()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            p95 = max(pct(r["final_latency_s"], 95) for r in results)
            lag = max(r["lag_max_s"] for r in results)
            kept_up = p95 <= 2.0 and lag <= 3.0
            rows.append({"streams": n, "final_p95_s": round(p95, 3), "lag_max_s": round(lag, 3), "kept_up": kept_up})
            print(f"[streams] {model}: {rows[-1]}", flush=True)
            if not kept_up:
                break
        out[model] = {"rows": rows, "streams_per_replica": max((r["streams"] for r in rows if r["kept_up"]),
                                                                default=0)}
    return out


def part_sigkill(dep: Deployment, pcm: bytes, ends: list[float], first_end: float) -> dict[str, Any]:
    from mp4totext.v1 import live_pb2_grpc

    a, target_a = dep.server(MP4T_WHISPER_MODELS="tiny.en")
    _b, target_b = dep.server(MP4T_WHISPER_MODELS="tiny.en")
    killed: list[float] = []
    client_b = Client(target_b, dep.key)
    holder: dict[str, Any] = {}

    def on_segment(seg: lpb.LiveSegment) -> None:
        if not killed:
            a.send_signal(signal.SIGKILL)
            killed.append(time.monotonic())
            # what a load balancer does: the reconnect reaches another replica
            holder["captions"].stub = live_pb2_grpc.LiveServiceStub(client_b.channel)

    cfg = lpb.LiveConfig(encoding=lpb.AUDIO_ENCODING_PCM16, sample_rate_hertz=16000, language_code="en")
    ids: list[int] = []
    with Client(target_a, dep.key) as client:
        captions = LiveCaptions(client, cfg)
        holder["captions"] = captions

        def on_event(e: lpb.StreamLiveResponse) -> None:
            if e.WhichOneof("event") == "segment":
                ids.append(e.segment.id)
                on_segment(e.segment)

        ended = captions.run(pcm_chunks(pcm), on_event, realtime=True)
    media = client_b.wait_media(ended.media)
    from mp4totext.config import from_env
    from storage.objects import make_store

    s = from_env(dep.env)
    key = f"media/{_tenant_of(dep, ended.media)}/{ended.media.split('/')[1]}/original"
    path = dep.tmp / "recording.wav"
    make_store(s).get_file(key, str(path))
    stored = path.read_bytes()[44:]
    client_b.close()
    return {"killed": bool(killed), "reconnects": captions.reconnects,
            "sha256_equal": hashlib.sha256(stored).hexdigest() == hashlib.sha256(pcm).hexdigest(),
            "bytes_sent": len(pcm), "bytes_stored": len(stored), "segment_ids_contiguous": ids == list(range(len(ids))),
            "segments": len(ids)}


def _tenant_of(dep: Deployment, media_name: str) -> str:
    import sqlite3

    con = sqlite3.connect(str(dep.tmp / "data" / "mp4totext.db"))
    try:
        return con.execute("SELECT tenant_id FROM media WHERE id = ?", (media_name.split("/")[1],)).fetchone()[0]
    finally:
        con.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sentences", type=int, default=8)
    ap.add_argument("--models", default="tiny.en,base")
    ap.add_argument("--max-streams", type=int, default=3)
    ap.add_argument("--skip", default="", help="parts to skip: latency,streams,sigkill")
    ap.add_argument("--json")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    skip = set(args.skip.split(","))
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="mp4t-bench-live-") as tmp_name:
        tmp = pathlib.Path(tmp_name)
        pcm, text, ends = lecture(args.sentences, tmp)
        res["audio_s"] = round(len(pcm) / 32000, 2)
        dep = Deployment(tmp, "base,tiny.en")
        try:
            dep.worker()
            first_end = first_word_end(pcm, str(tmp / "data" / "models"))
            if "latency" not in skip:
                res["latency"] = part_latency(dep, models, pcm, text, ends, first_end)
            if "streams" not in skip:
                res["streams"] = part_streams(dep, models, pcm, ends, first_end, args.max_streams)
            if "sigkill" not in skip:
                res["sigkill"] = part_sigkill(dep, pcm, ends, first_end)
                print(f"[sigkill] {res['sigkill']}", flush=True)
        finally:
            dep.stop()
    print(json.dumps(res, indent=2, default=str))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
