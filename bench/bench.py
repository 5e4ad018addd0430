"""Benchmarks: prints figures as ratios against a baseline measured in the same run.

    .venv/bin/python bench/bench.py [--seconds 40] [--upload-mib 256] [--repeat 3] [--skip-distributed]

1. Bare faster-whisper (model already loaded, same options as the workers: VAD, word
   timestamps, beam 5) on one file of real (espeak-ng) speech.
2. Our end-to-end time for the same file (upload -> validate/extract -> transcribe ->
   finalize -> Watch sees SUCCEEDED) with warm workers: embedded mode, and with RabbitMQ + S3.
3. Upload throughput of a big file through gRPC into S3 vs a direct minio put_object of the
   same file to the same S3 server, and the server's RSS growth during the upload.
4. Through HAProxy (haproxy/haproxy.cfg) in front of two server replicas vs straight to one
   server, same run: upload time, end-to-end time and unary RPC (GetMedia) p50 latency.
5. Speaker recognition on a 33 s two-voice dialogue on CPU: the diarize worker's stage time
   and real-time factor, its peak RSS, against the bare pyannote pipeline call on the same
   waveform in this process, both with the default offline pretrained pipeline
   (segmentation-3.0 + CAM++).

Targets: e2e/bare <= 1.15 embedded, <= 1.25 with RabbitMQ + S3; upload >= 0.8 of direct put;
server RSS growth < 64 MiB for a 256 MiB upload; HAProxy adds <= 10 % to upload time and
<= 5 ms to unary p50. Needs RabbitMQ on 127.0.0.1:5672 for parts 2b-4, haproxy for part 4.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mp4totext import config, samples  # noqa: E402
from mp4totext.client import Client  # noqa: E402
from tests.support import CLI, PeakRss, Proc, free_port, grpc_ready, haproxy_config, port_open, wait_for  # noqa: E402

MiB = 1024 * 1024
PY = sys.executable


def bare_whisper(path: str, repeat: int) -> float:
    from workers.stages.model_files import locate
    from workers.stages.transcribe import load_model

    s = config.Settings()
    # The model the service runs English speech on (tiny.en in the default set base + tiny.en);
    # the service also detects the language with base first, which this baseline does not.
    model = load_model(locate("tiny.en", ""), s.whisper_device, s.whisper_compute_type, s.whisper_cpu_threads)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        segments, _info = model.transcribe(path, beam_size=s.whisper_beam_size, vad_filter=True,
                                           word_timestamps=True, condition_on_previous_text=False)
        list(segments)
        times.append(time.perf_counter() - t)
    return min(times)


def end_to_end(target: str, key: str, path: str, repeat: int, language: str = "") -> float:
    """Best of ``repeat``: upload, create (``language`` given, or automatic), Watch to SUCCEEDED."""
    times = []
    with Client(target, key) as c:
        for _ in range(repeat):
            t = time.perf_counter()
            media = c.upload(path)
            job = c.create(media.name, language_code=language)
            final = c.wait(job.name)
            times.append(time.perf_counter() - t)
            assert final.result.text, final
    return min(times)


def create_key(env: dict[str, str]) -> str:
    import json

    out = subprocess.run([*CLI, "create-key", "--tenant", "bench"], env=env,
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout)["api_key"]


def start_weed(tmp: pathlib.Path, log_dir: pathlib.Path) -> tuple[Proc, str]:
    weed = shutil.which("weed") or str(pathlib.Path(PY).parent / "weed")
    tmp.mkdir(parents=True, exist_ok=True)
    ports = []
    while len(ports) < 4:
        p = free_port()
        if p + 10000 < 65535 and not port_open("127.0.0.1", p + 10000) and p not in ports:
            ports.append(p)
    proc = Proc("weed", [weed, "server", f"-dir={tmp}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
                         f"-master.port={ports[0]}", f"-volume.port={ports[1]}", f"-filer.port={ports[2]}",
                         f"-s3.port={ports[3]}", "-volume.max=20", "-s3.port.iceberg=0", "-s3.port.lance=0"],
                dict(os.environ), log_dir)
    endpoint = f"127.0.0.1:{ports[3]}"
    from minio import Minio

    client = Minio(endpoint, access_key="bench", secret_key="benchsecret", secure=False)

    def ready() -> bool:
        try:
            if not client.bucket_exists("bench"):
                client.make_bucket("bench")
            return True
        except Exception:
            return False

    wait_for(ready, 60, "SeaweedFS", 0.5)
    return proc, endpoint


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=40)
    ap.add_argument("--upload-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-distributed", action="store_true")
    ap.add_argument("--upload-only", action="store_true", help="only the upload figures")
    ap.add_argument("--skip-haproxy", action="store_true", help="skip part 4 (HAProxy vs direct)")
    ap.add_argument("--skip-diarization", action="store_true", help="skip part 5 (speaker recognition)")
    args = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="mp4t-bench-"))
    log_dir = tmp / "logs"
    log_dir.mkdir()
    procs: list[Proc] = []
    rows: list[tuple[str, str]] = []
    ok = False
    try:
        speech = samples.make_media(samples.lecture_text(args.seconds), str(tmp / "speech.mp4"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MP4T_")}
        env.update(MP4T_DATA_DIR=str(tmp / "embedded"), PYTHONUNBUFFERED="1")
        bare = 0.0 if args.upload_only else bare_whisper(speech, args.repeat)
        if not args.upload_only:
            rows.append(("bare faster-whisper (s)", f"{bare:.3f}"))
            rows += embedded_figures(env, tmp, log_dir, speech, bare, args.repeat)
        if not args.skip_distributed:
            weed, endpoint = start_weed(tmp / "weed", log_dir)
            procs.append(weed)
            vhost = f"bench-{uuid.uuid4().hex[:6]}"
            subprocess.run(["rabbitmqctl", "add_vhost", vhost], check=True, capture_output=True)
            subprocess.run(["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True,
                           capture_output=True)
            try:
                port, http_port, agent_port = free_port(), free_port(), free_port()
                denv = {**env, "MP4T_DATA_DIR": str(tmp / "dist"), "MP4T_BROKER_URL":
                        f"amqp://guest:guest@127.0.0.1:5672/{vhost}", "MP4T_STORAGE_BACKEND": "s3",
                        "MP4T_S3_ENDPOINT": endpoint, "MP4T_S3_ACCESS_KEY": "bench", "MP4T_S3_SECRET_KEY":
                        "benchsecret", "MP4T_S3_BUCKET": "bench", "MP4T_GRPC_LISTEN": f"127.0.0.1:{port}",
                        "MP4T_HTTP_LISTEN": f"127.0.0.1:{http_port}", "MP4T_AGENT_LISTEN": f"127.0.0.1:{agent_port}",
                        }
                server = Proc("server", [*CLI, "serve"], denv, log_dir)
                procs.append(server)
                wenv = {k: v for k, v in denv.items() if k not in ("MP4T_HTTP_LISTEN", "MP4T_AGENT_LISTEN")}
                for q in ("critical,low", "high"):
                    procs.append(Proc(f"worker-{q}", [*CLI, "worker", "--queues", q], wenv,
                                      log_dir))
                target = f"127.0.0.1:{port}"
                grpc_ready(target)
                high = procs[-1]
                wait_for(lambda: "worker_started" in high.log(), 120, "transcription worker (model loaded)")
                key = create_key(denv)
                if not args.upload_only:
                    e2e_dist = end_to_end(target, key, speech, args.repeat)
                    rows.append(("RabbitMQ+S3 end-to-end (s)", f"{e2e_dist:.3f}"))
                    rows.append(("RabbitMQ+S3 / bare (target <= 1.25)", f"{e2e_dist / bare:.3f}"))
                rows += upload_figures(target, key, endpoint, server, tmp, args.upload_mib)
                if not args.skip_diarization and not args.upload_only:
                    rows += diarization_figures(wenv, target, key, tmp, log_dir, procs)
                if not args.skip_haproxy:
                    rows += haproxy_figures(denv, (port, http_port, agent_port), key, speech, tmp, log_dir, procs,
                                            args)
            finally:
                subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True)
        ok = True
    finally:
        for p in procs:
            p.stop()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"benchmark failed; process logs kept in {log_dir}", file=sys.stderr)
    print_report("mp4totext benchmark", rows)
    return 0


def print_report(title: str, rows: list[tuple[str, str]]) -> None:
    """The figures as an aligned table under ``title``, the date and the CPU count (bench/speed.py too)."""
    width = max(len(k) for k, _ in rows)
    print(f"\n{title} (" + time.strftime("%Y-%m-%d %H:%M %Z") + f", {os.cpu_count()} CPUs)")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def embedded_figures(env: dict[str, str], tmp: pathlib.Path, log_dir: pathlib.Path, speech: str, bare: float,
                     repeat: int) -> list[tuple[str, str]]:
    port = free_port()
    emb = Proc("embedded", [*CLI, "embedded", "--serve", "--listen", f"127.0.0.1:{port}",
                            "--data-dir", str(tmp / "embedded")], env, log_dir)
    try:
        grpc_ready(f"127.0.0.1:{port}")
        key = (tmp / "embedded" / "api.key").read_text().strip()
        e2e = end_to_end(f"127.0.0.1:{port}", key, speech, repeat)
    finally:
        emb.stop()
    return [("embedded end-to-end (s)", f"{e2e:.3f}"), ("embedded / bare (target <= 1.15)", f"{e2e / bare:.3f}")]


def upload_figures(target: str, key: str, endpoint: str, server: Proc, tmp: pathlib.Path,
                   mib: int) -> list[tuple[str, str]]:
    from minio import Minio

    big = tmp / "big.bin"
    with open(big, "wb") as fh:
        for _ in range(mib):
            fh.write(os.urandom(MiB))
    s = config.Settings()
    direct = Minio(endpoint, access_key="bench", secret_key="benchsecret", secure=False)
    t = time.perf_counter()
    with open(big, "rb") as fh:
        direct.put_object("bench", "direct/big.bin", fh, length=-1, part_size=s.s3_part_size,
                          num_parallel_uploads=s.s3_parallel_uploads)
    direct_s = time.perf_counter() - t
    with PeakRss(server.pid) as rss, Client(target, key) as c:
        t = time.perf_counter()
        c.upload(str(big), checksum=False, resumable_upload=False)  # the direct put does not hash either
        grpc_s = time.perf_counter() - t
    with Client(target, key) as c:
        # The client's default for files of 8 MiB or more: an upload session, each 8 MiB part
        # stored and committed before the next is read (a crash re-sends at most one part).
        t = time.perf_counter()
        c.upload(str(big), checksum=False, resumable_upload=True)
        session_s = time.perf_counter() - t
    return [
        (f"direct put_object {mib} MiB (MiB/s)", f"{mib / direct_s:.1f}"),
        (f"gRPC upload {mib} MiB, one stream (MiB/s)", f"{mib / grpc_s:.1f}"),
        ("gRPC / direct throughput (target >= 0.8)", f"{direct_s / grpc_s:.3f}"),
        ("server RSS growth during upload (MiB, target < 64)", f"{rss.growth / MiB:.1f}"),
        (f"gRPC upload {mib} MiB, resumable session (MiB/s)", f"{mib / session_s:.1f}"),
        ("resumable session / direct throughput", f"{direct_s / session_s:.3f}"),
    ]


def diarization_figures(env: dict[str, str], target: str, key: str, tmp: pathlib.Path, log_dir: pathlib.Path,
                        procs: list[Proc]) -> list[tuple[str, str]]:
    import importlib.util

    if importlib.util.find_spec("pyannote.audio") is None:
        return [("speaker recognition", "skipped: pip install -e '.[diarize]'")]
    from mp4totext.v1 import transcription_pb2 as tpb
    from workers.stages.diarize import OFFLINE, load_pipeline
    from workers.stages.media import extract_audio, load_wav

    dialogue, _truth = samples.make_dialogue(str(tmp / "dialogue.m4a"))
    worker = Proc("worker-diarize", [*CLI, "worker", "--queues", "diarize"],
                  {**env, "MP4T_DIARIZATION_PIPELINE": OFFLINE}, log_dir)
    procs.append(worker)
    wait_for(lambda: "worker_started" in worker.log() or not worker.alive(), 180, "diarize worker")
    # Baseline: the bare pipeline on the same waveform, in this process (loaded once, warm run).
    extract_audio(dialogue, str(tmp / "dialogue.wav"), "ffmpeg")
    audio = load_wav(str(tmp / "dialogue.wav"))
    pipe = load_pipeline(OFFLINE, "cpu", "", config.Settings().diarization_batch_size)
    import torch

    waveform = {"waveform": torch.from_numpy(audio)[None], "sample_rate": 16000}
    pipe(waveform)
    t = time.perf_counter()
    pipe(waveform)
    bare = time.perf_counter() - t
    with Client(target, key) as c:
        media = c.upload(dialogue)
        cfg = tpb.DiarizationConfig(enable_speaker_diarization=True)
        c.wait(c.create(media.name, diarization_config=cfg).name)  # warm-up job
        with PeakRss(worker.pid) as rss:
            done = c.wait(c.create(media.name, diarization_config=cfg).name)
    stage = done.result.diarization.processing_duration.ToTimedelta().total_seconds()
    audio_s = len(audio) / 16000
    return [
        ("dialogue length (s)", f"{audio_s:.1f}"),
        ("bare pyannote pipeline, CPU (s)", f"{bare:.2f}"),
        ("diarize stage in the worker (s)", f"{stage:.2f}"),
        ("diarize stage / bare pipeline", f"{stage / bare:.3f}"),
        ("diarize stage real-time factor (stage s / audio s)", f"{stage / audio_s:.3f}"),
        ("diarize worker peak RSS during the job (MiB)", f"{rss.peak / MiB:.0f}"),
        ("diarize worker RSS growth during the job (MiB)", f"{rss.growth / MiB:.0f}"),
    ]


def haproxy_figures(env: dict[str, str], first: tuple[int, int, int], key: str, speech: str, tmp: pathlib.Path,
                    log_dir: pathlib.Path, procs: list[Proc], args: argparse.Namespace) -> list[tuple[str, str]]:
    """Same operations straight to one server and through HAProxy + two replicas, interleaved."""
    from mp4totext.v1 import media_pb2

    second = (free_port(), free_port(), free_port())
    env2 = {**env, "MP4T_GRPC_LISTEN": f"127.0.0.1:{second[0]}", "MP4T_HTTP_LISTEN": f"127.0.0.1:{second[1]}",
            "MP4T_AGENT_LISTEN": f"127.0.0.1:{second[2]}"}
    procs.append(Proc("server2", [*CLI, "serve"], env2, log_dir))
    grpc_ready(f"127.0.0.1:{second[0]}")
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(haproxy_config([("s1", *first), ("s2", *second)]))
    edge_port, stats_port = free_port(), free_port()
    henv = {**os.environ, "MP4T_HAPROXY_GRPC_BIND": f"127.0.0.1:{edge_port}",
            "MP4T_HAPROXY_STATS_BIND": f"127.0.0.1:{stats_port}", "MP4T_RATE_LIMIT_PER_S": "100000",
            "MP4T_RATE_LIMIT_PER_KEY_S": "100000"}
    procs.append(Proc("haproxy", ["haproxy", "-db", "-f", str(cfg)], henv, log_dir))
    direct, edge = f"127.0.0.1:{first[0]}", f"127.0.0.1:{edge_port}"
    grpc_ready(edge)
    time.sleep(2.5)  # both replicas UP (checks every 1 s, rise 2)

    big = tmp / "big.bin"
    if not big.exists():
        with open(big, "wb") as fh:
            for _ in range(args.upload_mib):
                fh.write(os.urandom(MiB))
    up = {direct: [], edge: []}
    unary = {direct: [], edge: []}
    e2e = {direct: [], edge: []}
    for _ in range(args.repeat):
        for target in (direct, edge):
            with Client(target, key) as c:
                t = time.perf_counter()
                media = c.upload(str(big), checksum=False)
                up[target].append(time.perf_counter() - t)
                c.get_media(media.name)  # warm the channel
                for _ in range(200):
                    t = time.perf_counter()
                    c.media.GetMedia(media_pb2.GetMediaRequest(name=media.name), metadata=c.metadata, timeout=10)
                    unary[target].append(time.perf_counter() - t)
            if not args.upload_only:
                e2e[target].append(end_to_end(target, key, speech, 1))

    def p50(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    rows = [
        (f"upload {args.upload_mib} MiB direct / via HAProxy (s)", f"{min(up[direct]):.3f} / {min(up[edge]):.3f}"),
        ("HAProxy / direct upload time (target <= 1.10)", f"{min(up[edge]) / min(up[direct]):.3f}"),
        ("GetMedia p50 direct / via HAProxy (ms)", f"{p50(unary[direct]) * 1000:.2f} / {p50(unary[edge]) * 1000:.2f}"),
        ("HAProxy added unary p50 (ms, target <= 5)", f"{(p50(unary[edge]) - p50(unary[direct])) * 1000:.2f}"),
    ]
    if not args.upload_only:
        rows.append(("HAProxy / direct end-to-end", f"{min(e2e[edge]) / min(e2e[direct]):.3f}"))
    return rows


if __name__ == "__main__":
    sys.exit(main())
