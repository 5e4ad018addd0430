"""Speaker recognition with the built-in offline pipeline (segmentation-3.0 + CAM++), measured.

    .venv/bin/python bench/diarization.py            # DER, real-time factor and peak RSS: our stage vs bare pyannote
    .venv/bin/python bench/diarization.py --sweep    # DER and speaker counts per clustering threshold

Not part of CI. The audio is espeak-ng dialogues with known turns (mp4totext/samples.py), so the
truth is exact; synthetic voices are more alike than people are (several espeak-ng variants
share one synthesizer), which makes them a conservative test of the clustering threshold.

The sweep runs segmentation and embeddings once per dialogue (pyannote's own training-mode
cache) and re-clusters for every parameter set, so it measures the clustering alone.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mp4totext import samples  # noqa: E402
from mp4totext.contracts import Segment, TranscriptResult, Word  # noqa: E402

VOICES_2_MALE = [("en-gb" if v == "en-us+f2" else v, t) for v, t in samples.DIALOGUE]
VOICES_4 = samples.DIALOGUE_3 + [("en-us+klatt", "And a fourth voice joins at the end to say goodbye to everyone."),
                                 ("en-us+f2", "Goodbye, and thank you for listening to all four of us."),
                                 ("en-us+klatt", "Yes, goodbye, see you next week.")]
MONOLOGUE = [("en-us+m3", text) for _v, text in samples.DIALOGUE]
TELEPHONE = "aecho=0.8:0.6:40|70:0.3|0.2,highpass=f=200,lowpass=f=3400"

# name -> (turns, repeat, ffmpeg filter)
SCENARIOS: dict[str, tuple[list[tuple[str, str]], int, str]] = {
    "2 voices (m3/f2)": (samples.DIALOGUE, 1, ""),
    "3 voices (m3/f2/m7)": (samples.DIALOGUE_3, 1, ""),
    "2 male voices (us m3/gb)": (VOICES_2_MALE, 1, ""),
    "3 voices, telephone+echo": (samples.DIALOGUE_3, 1, TELEPHONE),
    "4 voices (+klatt)": (VOICES_4, 1, ""),
    "1 voice (monologue)": (MONOLOGUE, 1, ""),
    "2 voices x3 (100 s)": (samples.DIALOGUE, 3, ""),
}
THRESHOLDS = [round(0.3 + 0.05 * i, 2) for i in range(15)]
MIN_CLUSTER_SIZES = [1, 4, 8, 12]
COLLAR = 0.25  # seconds around each true boundary not scored (espeak-ng's turn edges are soft)


def load(path: str, tmp: str) -> Any:
    from workers.stages.media import extract_audio, load_wav

    wav = os.path.join(tmp, pathlib.Path(path).stem + ".wav")
    extract_audio(path, wav)
    return load_wav(wav)


def make(tmp: str, which: list[int]) -> dict[str, tuple[Any, list[tuple[float, float, str]]]]:
    """name -> (16 kHz float32 audio, true turns) for the scenarios numbered ``which`` (all if empty)."""
    out = {}
    for i, (name, (turns, repeat, filt)) in enumerate(SCENARIOS.items()):
        if which and i not in which:
            continue
        path, truth = samples.make_dialogue(os.path.join(tmp, f"s{i}.m4a"), turns, repeat=repeat, ffmpeg_filter=filt)
        out[name] = (load(path, tmp), truth)
    return out


def reference(truth: list[tuple[float, float, str]]) -> Any:
    from pyannote.core import Annotation
    from pyannote.core import Segment as Seg

    ann = Annotation()
    for start, end, voice in truth:
        ann[Seg(start, end)] = voice
    return ann


def hypothesis(turns: list[Any]) -> Any:
    from pyannote.core import Annotation
    from pyannote.core import Segment as Seg

    ann = Annotation()
    for t in turns:
        ann[Seg(t.start, t.end)] = t.speaker
    return ann


def der(truth: list[tuple[float, float, str]], annotation: Any) -> float:
    from pyannote.metrics.diarization import DiarizationErrorRate

    return float(DiarizationErrorRate(collar=COLLAR)(reference(truth), annotation))


def annotation_of(output: Any) -> Any:
    return getattr(output, "speaker_diarization", output)


# ---------------------------------------------------------------- sweep


def sweep(data: dict[str, tuple[Any, list]], step: float) -> None:
    import torch

    from workers.stages import campplus

    pipeline = campplus.build_pipeline(step=step)
    pipeline.training = True  # pyannote caches segmentation + embeddings in the file dict
    files = {name: {"waveform": torch.from_numpy(audio)[None], "sample_rate": 16000, "uri": name}
             for name, (audio, _truth) in data.items()}
    for name, file in files.items():
        started = time.perf_counter()
        pipeline(file)
        print(f"{name}: segmentation + embeddings (step {step}) in {time.perf_counter() - started:.1f} s, "
              f"RTF {(time.perf_counter() - started) / (len(data[name][0]) / 16000):.3f}", flush=True)
    rows = []
    for mcs in MIN_CLUSTER_SIZES:
        for threshold in THRESHOLDS:
            pipeline.instantiate({"segmentation": campplus.SEGMENTATION,
                                  "clustering": {"method": "centroid", "threshold": threshold,
                                                 "min_cluster_size": mcs}})
            ders, counts = {}, 0
            for name, (_audio, truth) in data.items():
                ann = annotation_of(pipeline(files[name]))
                ders[name] = der(truth, ann)
                counts += len(ann.labels()) == len({v for _s, _e, v in truth})
            rows.append((mcs, threshold, statistics.mean(ders.values()), max(ders.values()), counts, ders))
            print(f"min_cluster_size={mcs:2d} threshold={threshold:.2f} mean DER={rows[-1][2]:.3f} "
                  f"max DER={rows[-1][3]:.3f} speaker count right {counts}/{len(data)}", flush=True)
    names = list(data)
    print(f"\nstep {step}, collar {COLLAR} s")
    print("\n| min_cluster_size | threshold | mean DER | max DER | count right | " + " | ".join(names) + " |")
    print("|---|---|---|---|---|" + "---|" * len(names))
    for mcs, threshold, mean, worst, counts, ders in rows:
        print(f"| {mcs} | {threshold:.2f} | {mean:.3f} | {worst:.3f} | {counts}/{len(data)} | "
              + " | ".join(f"{ders[n]:.3f}" for n in names) + " |")


# ---------------------------------------------------------------- stage vs bare pyannote


class PeakRss:
    """Peak resident set size of this process while the block runs (sampled every 5 ms)."""

    def __init__(self) -> None:
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.stop.wait(0.005)

    def __enter__(self) -> PeakRss:
        self.before = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def transcript(truth: list[tuple[float, float, str]]) -> TranscriptResult:
    """A stand-in transcription: one segment per true turn, ten evenly spaced words in it."""
    segments = []
    for i, (start, end, _voice) in enumerate(truth):
        step = (end - start) / 10
        words = [Word(word=f" w{j}", start=start + j * step, end=start + (j + 1) * step) for j in range(10)]
        segments.append(Segment(id=i, start=start, end=end, text="".join(w.word for w in words).strip(), words=words))
    return TranscriptResult(text=" ".join(s.text for s in segments), segments=segments, duration=truth[-1][1])


def measure(fn: Callable[[], Any], repeats: int) -> tuple[float, int, int, Any]:
    """(best seconds, peak RSS, peak RSS above the start, last output) over ``repeats`` warm runs."""
    best, peak, delta, out = float("inf"), 0, 0, None
    for _ in range(repeats):
        with PeakRss() as rss:
            started = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - started)
        peak, delta = max(peak, rss.peak), max(delta, rss.peak - rss.before)
    return best, peak, delta, out


def compare(data: dict[str, tuple[Any, list]], names: list[str], repeats: int) -> None:
    import torch

    from mp4totext import config
    from workers.stages.diarize import OFFLINE, diarize, load_pipeline, pipeline_label, run_stage

    started = time.perf_counter()
    pipeline = load_pipeline(OFFLINE, "cpu", "", config.Settings().diarization_batch_size)
    print(f"offline pipeline loaded in {time.perf_counter() - started:.1f} s ({pipeline_label(OFFLINE)}), "
          f"torch threads {torch.get_num_threads()}")
    print("\n| dialogue | audio s | DER stage | DER bare | RTF stage | RTF bare | RTF ratio | peak RSS stage MiB "
          "| peak RSS bare MiB | RSS ratio | peak growth stage/bare MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        audio, truth = data[name]
        seconds = len(audio) / 16000
        result = transcript(truth)
        waveform = {"waveform": torch.from_numpy(audio)[None], "sample_rate": 16000}
        pipeline(waveform)  # warm-up
        bare_s, bare_peak, bare_delta, bare_out = measure(lambda: pipeline(waveform), repeats)
        stage_s, stage_peak, stage_delta, merged = measure(
            lambda: run_stage(pipeline, audio, result, pipeline_name=pipeline_label(OFFLINE)), repeats)
        stage_der = der(truth, hypothesis(diarize(pipeline, audio)))
        bare_der = der(truth, annotation_of(bare_out))
        mib = 1 << 20
        print(f"| {name} | {seconds:.1f} | {stage_der:.3f} | {bare_der:.3f} | {stage_s / seconds:.4f} | "
              f"{bare_s / seconds:.4f} | {stage_s / bare_s:.3f} | {stage_peak / mib:.0f} | {bare_peak / mib:.0f} | "
              f"{stage_peak / bare_peak:.3f} | {stage_delta / mib:.0f}/{bare_delta / mib:.0f} |", flush=True)
        assert merged.speaker_count >= 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="DER and speaker counts per clustering threshold")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--step", type=float, default=0.1, help="window hop (fraction of 10 s) for --sweep")
    p.add_argument("--scenarios", default="", help="comma-separated scenario numbers (default: all)")
    args = p.parse_args()
    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
    with tempfile.TemporaryDirectory() as tmp:
        data = make(tmp, [int(i) for i in args.scenarios.split(",") if i])
        if args.sweep:
            sweep(data, args.step)
        else:
            compare(data, ["2 voices (m3/f2)", "3 voices (m3/f2/m7)", "2 voices x3 (100 s)"], args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
