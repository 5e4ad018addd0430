"""Issue 14 speed targets, each as a ratio against bare sequential faster-whisper measured in the same run.

    .venv/bin/python bench/speed.py [--lecture-s 300] [--short-s 30] [--repeat 2] [--upload-mib 256]
                                    [--skip-distributed] [--skip-haproxy] [--skip-concurrency] [--threshold]

Baseline: the model the service recognises English with (tiny.en), loaded, called directly
with the workers' options (beam 5, VAD, word timestamps), sequential decoding, best of
``--repeat``. Against it, on the same files:

1. a ``--lecture-s`` lecture end-to-end (upload -> SUCCEEDED seen by Watch), embedded mode and
   RabbitMQ + S3 (target <= 0.75 each); a ``--short-s`` file end-to-end, embedded (<= 1.10);
2. gRPC upload / a direct put_object to the same S3 server (>= 0.9), and upload time through
   HAProxy + two replicas / straight to one server (<= 1.10) (bench/bench.py's parts);
3. aggregate audio-seconds per second with 1, 2 and 4 jobs at once on one worker host (one
   process, one model instance; MP4T_WORKER_THREADS=4), for CTranslate2 thread settings
   (inter_threads = MP4T_WHISPER_NUM_WORKERS, intra_threads = MP4T_WHISPER_CPU_THREADS);
4. ``--threshold``: the stage in this process, sequential and batched, on files of several lengths
   (how MP4T_WHISPER_BATCH_MIN_S was chosen).

``--once stage|bare FILE`` transcribes FILE once in a fresh process (models loaded first) with the
transcribe stage or with bare sequential faster-whisper: two commands to time against each other
as whole processes (e.g. hyperfine or /usr/bin/time, A B A B).

Needs RabbitMQ on 127.0.0.1:5672 for part 1b-2 and haproxy for the HAProxy figure.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mp4totext import config, samples  # noqa: E402
from mp4totext.client import Client  # noqa: E402
from tests.support import CLI, Proc, free_port, grpc_ready, wait_for  # noqa: E402

# bench/bench.py: the baseline, the stack and the upload figures
_spec = importlib.util.spec_from_file_location("mp4t_bench", ROOT / "bench" / "bench.py")
assert _spec is not None and _spec.loader is not None
base_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base_bench)


def load_avg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def wav_of(path: str, tmp: pathlib.Path) -> str:
    from workers.stages.media import extract_audio

    wav = str(tmp / (pathlib.Path(path).stem + ".wav"))
    extract_audio(path, wav, "ffmpeg")
    return wav


def threshold_figures(tmp: pathlib.Path, lengths: list[int], repeat: int) -> list[tuple[str, str]]:
    """The transcribe stage in-process (language automatic, as a job), sequential vs batched."""
    from core.models import ModelSet
    from workers import actors
    from workers.stages.media import load_wav
    from workers.stages.transcribe import SEQUENTIAL, Batching, TranscribeOptions, transcribe_routed

    s = config.Settings()
    models = ModelSet.of(s.model_sources)
    actors.whisper_model(s)
    load = functools.partial(actors.load_spec, s)
    rows = []
    for seconds in lengths:
        text = samples.lecture_text(seconds)
        audio = load_wav(wav_of(samples.make_media(text, str(tmp / f"t{seconds}.m4a"), video=False), tmp))
        best: dict[str, tuple[float, float]] = {}
        for _ in range(repeat):
            for label, batching in (("sequential", SEQUENTIAL), ("batched", Batching(0, s.whisper_batch_size))):
                t = time.perf_counter()
                result = transcribe_routed(models, load, audio, TranscribeOptions(), None, 0.5, batching)
                took = time.perf_counter() - t
                if label not in best or took < best[label][0]:
                    best[label] = (took, samples.word_error_rate(text, result.text))
        (seq, seq_wer), (bat, bat_wer) = best["sequential"], best["batched"]
        rows.append((f"stage, {len(audio) / 16000:.0f} s: sequential / batched (s), batched/sequential, WER seq/bat",
                     f"{seq:.2f} / {bat:.2f}, {bat / seq:.3f}, {seq_wer:.3f}/{bat_wer:.3f}"))
    return rows


def once(mode: str, path: str) -> int:
    from core.models import ModelSet
    from workers import actors
    from workers.stages.media import load_wav
    from workers.stages.model_files import locate
    from workers.stages.transcribe import Batching, TranscribeOptions, load_model, transcribe_routed

    s = config.Settings()
    with tempfile.TemporaryDirectory() as tmp:
        audio = load_wav(wav_of(path, pathlib.Path(tmp)))
    if mode == "bare":
        model = load_model(locate("tiny.en", ""), s.whisper_device, s.whisper_compute_type, s.whisper_cpu_threads)
        segments, _info = model.transcribe(audio, beam_size=s.whisper_beam_size, vad_filter=True,
                                           word_timestamps=True, condition_on_previous_text=False)
        text = " ".join(seg.text.strip() for seg in segments)
    else:
        actors.whisper_model(s)
        text = transcribe_routed(ModelSet.of(s.model_sources), functools.partial(actors.load_spec, s), audio,
                                 TranscribeOptions(beam_size=s.whisper_beam_size), None, s.language_min_probability,
                                 Batching(s.whisper_batch_min_s, s.whisper_batch_size),
                                 functools.partial(actors.load_detector, s)).text
    print(len(text.split()), "words")
    return 0


def bare_times(paths: list[str], repeat: int) -> dict[str, float]:
    return {p: base_bench.bare_whisper(p, repeat) for p in paths}


def embedded(env: dict[str, str], data: pathlib.Path, log_dir: pathlib.Path,
             extra: dict[str, str]) -> tuple[Proc, str, str]:
    port = free_port()
    proc = Proc("embedded", [*CLI, "embedded", "--serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data)],
                {**env, **extra}, log_dir)
    grpc_ready(f"127.0.0.1:{port}")
    return proc, f"127.0.0.1:{port}", (data / "api.key").read_text().strip()


def concurrency_figures(env: dict[str, str], tmp: pathlib.Path, log_dir: pathlib.Path, path: str,
                        audio_s: float, thread_sets: list[tuple[int, int]]) -> list[tuple[str, str]]:
    """Aggregate audio-seconds per second with 1, 2, 4 jobs at once on one worker host."""
    rows = []
    for inter, intra in thread_sets:
        data = tmp / f"conc-{inter}-{intra}"
        proc, target, key = embedded(env, data, log_dir, {"MP4T_WORKER_THREADS": "4",
                                                          "MP4T_WHISPER_NUM_WORKERS": str(inter),
                                                          "MP4T_WHISPER_CPU_THREADS": str(intra)})
        try:
            with Client(target, key) as c:
                media = c.upload(path)
                c.wait(c.create(media.name).name)  # warm-up
                rates = []
                for n in (1, 2, 4):
                    with ThreadPoolExecutor(n) as pool:
                        t = time.perf_counter()
                        names = [c.create(media.name).name for _ in range(n)]
                        finals = list(pool.map(c.wait, names))
                        took = time.perf_counter() - t
                    assert all(f.result.text for f in finals)
                    rates.append(n * audio_s / took)
        finally:
            proc.stop()
        rows.append((f"audio-s/s with 1 / 2 / 4 jobs at once, inter_threads={inter} intra_threads={intra}",
                     " / ".join(f"{r:.1f}" for r in rates)))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lecture-s", type=float, default=300)
    ap.add_argument("--short-s", type=float, default=30)
    ap.add_argument("--concurrency-s", type=float, default=60, help="length of each concurrent job's file")
    ap.add_argument("--upload-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--skip-distributed", action="store_true")
    ap.add_argument("--skip-haproxy", action="store_true")
    ap.add_argument("--skip-concurrency", action="store_true")
    ap.add_argument("--threshold", action="store_true", help="only part 4 (sequential vs batched by length)")
    ap.add_argument("--threshold-lengths", default="15,30,45,60,90,120")
    ap.add_argument("--once", nargs=2, metavar=("stage|bare", "FILE"))
    args = ap.parse_args()
    if args.once:
        return once(*args.once)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="mp4t-speed-"))
    log_dir = tmp / "logs"
    log_dir.mkdir()
    procs: list[Proc] = []
    rows: list[tuple[str, str]] = [("load average (1/5/15 min) at start", load_avg())]
    ok = False
    try:
        if args.threshold:
            rows += threshold_figures(tmp, [int(x) for x in args.threshold_lengths.split(",")], args.repeat)
            ok = True
            return 0
        lecture = samples.make_media(samples.lecture_text(args.lecture_s), str(tmp / "lecture.mp4"))
        short = samples.make_media(samples.lecture_text(args.short_s), str(tmp / "short.mp4"))
        from workers.stages.media import load_wav

        lecture_s = len(load_wav(wav_of(lecture, tmp))) / 16000
        short_s = len(load_wav(wav_of(short, tmp))) / 16000
        env = {k: v for k, v in os.environ.items() if not k.startswith("MP4T_")}
        env["PYTHONUNBUFFERED"] = "1"
        bare = bare_times([lecture, short], args.repeat)
        rows.append((f"bare sequential tiny.en, lecture {lecture_s:.0f} s / short {short_s:.0f} s (s)",
                     f"{bare[lecture]:.2f} / {bare[short]:.2f}"))
        proc, target, key = embedded(env, tmp / "embedded", log_dir, {})
        try:
            # The targets compare the same model on the same file: the job says its language
            # ("en": tiny.en, as the baseline). Automatic language adds the multilingual base
            # model's detection, one encoder pass per 30 s window, which bare tiny.en never does.
            e2e_lecture = base_bench.end_to_end(target, key, lecture, args.repeat, "en")
            e2e_short = base_bench.end_to_end(target, key, short, max(args.repeat, 3), "en")
            auto_lecture = base_bench.end_to_end(target, key, lecture, args.repeat)
            auto_short = base_bench.end_to_end(target, key, short, max(args.repeat, 3))
        finally:
            proc.stop()
        rows.append(("embedded end-to-end, language en: lecture / short (s)", f"{e2e_lecture:.2f} / {e2e_short:.2f}"))
        rows.append(("embedded / bare, lecture (target <= 0.75)", f"{e2e_lecture / bare[lecture]:.3f}"))
        rows.append(("embedded / bare, short (target <= 1.10)", f"{e2e_short / bare[short]:.3f}"))
        rows.append(("embedded, language automatic (base detects): lecture / short (s)",
                     f"{auto_lecture:.2f} / {auto_short:.2f}"))
        rows.append(("same / bare tiny.en: lecture / short", f"{auto_lecture / bare[lecture]:.3f} / "
                                                             f"{auto_short / bare[short]:.3f}"))
        if not args.skip_distributed:
            rows += distributed(args, env, tmp, log_dir, procs, lecture, bare[lecture])
        if not args.skip_concurrency:
            conc = samples.make_media(samples.lecture_text(args.concurrency_s), str(tmp / "conc.mp4"))
            conc_s = len(load_wav(wav_of(conc, tmp))) / 16000
            rows.append(("concurrency file (s of audio)", f"{conc_s:.1f}"))
            rows += concurrency_figures(env, tmp, log_dir, conc, conc_s, [(1, 2), (2, 1), (1, 1)])
        ok = True
    finally:
        for p in procs:
            p.stop()
        rows.append(("load average (1/5/15 min) at the end", load_avg()))
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"benchmark failed; process logs kept in {log_dir}", file=sys.stderr)
        base_bench.print_report("mp4totext speed benchmark", rows)
    return 0


def distributed(args: argparse.Namespace, env: dict[str, str], tmp: pathlib.Path, log_dir: pathlib.Path,
                procs: list[Proc], lecture: str, bare: float) -> list[tuple[str, str]]:
    rows = []
    weed, endpoint = base_bench.start_weed(tmp / "weed", log_dir)
    procs.append(weed)
    vhost = f"speed-{uuid.uuid4().hex[:6]}"
    subprocess.run(["rabbitmqctl", "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True,
                   capture_output=True)
    try:
        port, http_port, agent_port = free_port(), free_port(), free_port()
        denv = {**env, "MP4T_DATA_DIR": str(tmp / "dist"),
                "MP4T_BROKER_URL": f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
                "MP4T_STORAGE_BACKEND": "s3", "MP4T_S3_ENDPOINT": endpoint, "MP4T_S3_ACCESS_KEY": "bench",
                "MP4T_S3_SECRET_KEY": "benchsecret", "MP4T_S3_BUCKET": "bench",
                "MP4T_GRPC_LISTEN": f"127.0.0.1:{port}", "MP4T_HTTP_LISTEN": f"127.0.0.1:{http_port}",
                "MP4T_AGENT_LISTEN": f"127.0.0.1:{agent_port}"}
        server = Proc("server", [*CLI, "serve"], denv, log_dir)
        procs.append(server)
        wenv = {k: v for k, v in denv.items() if k not in ("MP4T_HTTP_LISTEN", "MP4T_AGENT_LISTEN")}
        for q in ("critical,low", "high"):
            procs.append(Proc(f"worker-{q}", [*CLI, "worker", "--queues", q], wenv, log_dir))
        target = f"127.0.0.1:{port}"
        grpc_ready(target)
        high = procs[-1]
        wait_for(lambda: "worker_started" in high.log(), 120, "transcription worker (model loaded)")
        key = base_bench.create_key(denv)
        e2e = base_bench.end_to_end(target, key, lecture, args.repeat, "en")
        rows.append(("RabbitMQ+S3 end-to-end, language en, lecture (s)", f"{e2e:.2f}"))
        rows.append(("RabbitMQ+S3 / bare, lecture (target <= 0.75)", f"{e2e / bare:.3f}"))
        for k, v in base_bench.upload_figures(target, key, endpoint, server, tmp, args.upload_mib):
            rows.append((k.replace("target >= 0.8", "target >= 0.9"), v))
        if not args.skip_haproxy:
            hargs = argparse.Namespace(upload_mib=args.upload_mib, repeat=args.repeat, upload_only=True)
            rows += base_bench.haproxy_figures(denv, (port, http_port, agent_port), key, lecture, tmp, log_dir, procs,
                                               hargs)
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
