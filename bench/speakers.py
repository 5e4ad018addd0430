"""Speaker recognition on real voices: the generated conversation set of tests/support/realvoices.py.

    .venv/bin/python bench/speakers.py [--steps 0.1,0.25] [--thresholds 0.5,0.6,...] [--conditions 0,1]
    .venv/bin/python bench/speakers.py --known [--known-thresholds 0.3,0.4,...]

Per condition (2, 3, 4 speakers; a telephone-band + noise variant) and per setting (segmentation
step x clustering threshold x min_cluster_size), one run: DER without a collar and with a 0.25 s
collar, JER, whether the speaker count is right, the share of words on the right speaker for three
ways of giving words speakers, and the stage's time per audio minute. Segmentation and embeddings
run once per (file, step) (pyannote's training-mode cache) and only the clustering is repeated, so
the settings are compared on the same embeddings. The recognised words come from tiny.en on the
whole mix (what a job gives the speaker stage); the reference words from tiny.en on each utterance
alone (tests/support/realvoices.py).

``--known`` measures known speakers instead, at the product's settings: on realvoices.KNOWN_SET
(each speaker's reference utterance held out of the conversation, plus one outsider's reference
that must match nobody), the cosine similarity of each found speaker to its own reference and to
the others, and per threshold how many speakers are named right, named wrong, and whether the
outsider's name was given to anyone.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mp4totext.contracts import TranscriptResult  # noqa: E402
from tests.support import realvoices  # noqa: E402

THRESHOLDS = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8]
MIN_CLUSTER_SIZES = [2, 4, 8]
ATTRIBUTIONS = ("overlap", "midpoint", "exclusive")
CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "mp4t-realvoices-words.json"


def whisper() -> Any:
    from workers.stages.model_files import locate
    from workers.stages.transcribe import load_model

    return load_model(locate("tiny.en", ROOT / "data" / "models"), "cpu")


recognised = realvoices.transcript
annotation = realvoices.annotation


def turns_of(ann: Any) -> list[Any]:
    from workers.stages.diarize import Turn

    return [Turn(float(seg.start), float(seg.end), str(label)) for seg, _t, label in ann.itertracks(yield_label=True)]


def score(conv: realvoices.Conversation, output: Any, result: TranscriptResult) -> dict[str, Any]:
    from pyannote.metrics.diarization import DiarizationErrorRate, JaccardErrorRate

    from workers.stages.diarize import assign_speakers, speaker_for

    ref, hyp = annotation(conv.turns), output.speaker_diarization
    row = {"der": float(DiarizationErrorRate(collar=0.0)(ref, hyp)),
           "der_collar": float(DiarizationErrorRate(collar=0.25)(ref, hyp)),
           "jer": float(JaccardErrorRate(collar=0.0)(ref, hyp)),
           "count_right": len(hyp.labels()) == len(conv.speakers), "speakers": len(hyp.labels())}
    mapping = DiarizationErrorRate(collar=0.0).optimal_mapping(ref, hyp)  # hypothesis label -> reference
    for how in ATTRIBUTIONS:
        turns = turns_of(output.exclusive_speaker_diarization if how == "exclusive" else hyp)
        if how == "midpoint":
            words = [w for s in result.segments for w in s.words]
            hyp_words = [(w.start, w.end, speaker_for((w.start + w.end) / 2, (w.start + w.end) / 2, turns))
                         for w in words]
        else:
            merged = assign_speakers(result, turns)
            hyp_words = [(w.start, w.end, w.speaker) for s in merged.segments for w in s.words]
        row[f"words_{how}"] = realvoices.words_on_right_speaker(conv, hyp_words, mapping)
    return row


def run(conditions: list[realvoices.Condition], steps: list[float], thresholds: list[float],
        sizes: list[int]) -> None:
    import torch

    from workers.stages import campplus

    model = whisper()
    convs, results = [], []
    for cond in conditions:
        conv = realvoices.conversation(cond)
        realvoices.words_for(conv, realvoices.whisper_words(model), CACHE)
        convs.append(conv)
        results.append(recognised(model, conv.audio))
    audio_min = sum(c.seconds for c in convs) / 60
    print(f"{len(convs)} conversations, {audio_min:.1f} min of audio, "
          f"{sum(len(c.words) for c in convs)} reference words, torch threads {torch.get_num_threads()}", flush=True)
    rows: list[tuple[float, float, int, float, dict[str, dict[str, Any]]]] = []
    for step in steps:
        pipeline = campplus.build_pipeline(step=step)
        pipeline.training = True  # segmentation + embeddings cached in each file dict
        files = [{"waveform": torch.from_numpy(c.audio)[None], "sample_rate": 16000, "uri": c.name} for c in convs]
        started = time.perf_counter()
        for f in files:
            pipeline(f)
        per_min = (time.perf_counter() - started) / audio_min
        print(f"step {step}: segmentation + embeddings + clustering {per_min:.1f} s per audio minute "
              f"({per_min / 60:.3f}x the audio)", flush=True)
        for size in sizes:
            for threshold in thresholds:
                pipeline.instantiate({"segmentation": dict(campplus.SEGMENTATION), "clustering": {
                    "method": "centroid", "threshold": threshold, "min_cluster_size": size}})
                scores = {c.name: score(c, pipeline(f), r) for c, f, r in zip(convs, files, results)}
                rows.append((step, threshold, size, per_min, scores))
                print(summary_line(step, threshold, size, scores), flush=True)
    table(rows)


def _groups(scores: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for name, row in scores.items():
        key = name.split(" #")[0] + (", telephone" if "telephone" in name else "")
        out.setdefault(key, []).append(row)
    return out


def summary_line(step: float, threshold: float, size: int, scores: dict[str, dict[str, Any]]) -> str:
    rows = list(scores.values())
    return (f"step {step} threshold {threshold:.2f} min_cluster_size {size}: "
            f"mean DER {statistics.mean(r['der'] for r in rows):.3f}"
            f" count right {sum(r['count_right'] for r in rows)}/{len(rows)} words right (overlap) "
            f"{statistics.mean(r['words_overlap'] for r in rows):.3f}")


def table(rows: list[tuple[float, float, int, float, dict[str, dict[str, Any]]]]) -> None:
    print("\n| step | threshold | min cluster | condition | files | DER | DER 0.25 s | JER | count right | "
          "words right: overlap / midpoint / exclusive | s per audio min |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for step, threshold, size, per_min, scores in rows:
        for group, rs in _groups(scores).items():
            mean = lambda k: statistics.mean(r[k] for r in rs)  # noqa: E731
            print(f"| {step} | {threshold:.2f} | {size} | {group} | {len(rs)} | {mean('der'):.3f} | "
                  f"{mean('der_collar'):.3f} | {mean('jer'):.3f} | {sum(r['count_right'] for r in rs)}/{len(rs)} | "
                  f"{mean('words_overlap'):.3f} / {mean('words_midpoint'):.3f} / {mean('words_exclusive'):.3f} | "
                  f"{per_min:.1f} |")


def known(conditions: list[realvoices.Condition], thresholds: list[float]) -> None:
    from pyannote.metrics.diarization import DiarizationErrorRate

    from workers.stages import campplus, known_speakers
    from workers.stages.diarize import diarize_voices, fill_voices

    pipeline = campplus.build_pipeline()
    own, others = [], []
    counts = {t: {"right": 0, "wrong": 0, "unnamed": 0, "outsider": 0} for t in thresholds}
    speakers = 0
    for cond in conditions:
        conv = realvoices.conversation(cond)
        extra = realvoices.outsider(cond)
        refs = {s: known_speakers.voice_of(pipeline, realvoices.held_out(s).audio) for s in [*conv.speakers, extra]}
        turns, voices = diarize_voices(pipeline, conv.audio)  # the product's path (centroids, fallbacks)
        voices = fill_voices(pipeline, conv.audio, turns, voices)
        hyp = annotation([(t.start, t.end, t.speaker) for t in turns])
        truth = DiarizationErrorRate(collar=0.0).optimal_mapping(annotation(conv.turns), hyp)
        sim = known_speakers.similarities(voices, refs)
        for i, label in enumerate(voices):
            for j, name in enumerate(refs):
                (own if truth.get(label) == name else others).append(float(sim[i, j]))
        speakers += len(conv.speakers)
        for t in thresholds:
            got = known_speakers.match(voices, refs, t)
            for label, m in got.items():
                counts[t]["right" if truth.get(label) == m.name else "wrong"] += 1
                counts[t]["outsider"] += m.name == extra
            counts[t]["unnamed"] += len(conv.speakers) - sum(truth.get(lb) == m.name for lb, m in got.items())
        print(f"{cond.name}: {len(voices)} found for {len(conv.speakers)}; similarity to own reference "
              + ", ".join(f"{float(sim[i, list(refs).index(truth[lb])]):.2f}" for i, lb in enumerate(voices)
                          if lb in truth), flush=True)
    q = lambda xs, f: sorted(xs)[min(len(xs) - 1, int(f * len(xs)))] if xs else float("nan")  # noqa: E731
    print(f"\nsimilarity to own reference: min {min(own):.2f}, 10 % {q(own, 0.1):.2f}, median {q(own, 0.5):.2f}; "
          f"to another speaker's: median {q(others, 0.5):.2f}, 90 % {q(others, 0.9):.2f}, max {max(others):.2f}")
    print(f"\n| threshold | named right (of {speakers}) | named wrong | not named | outsider's name given |")
    print("|---|---|---|---|---|")
    for t in thresholds:
        c = counts[t]
        print(f"| {t:.2f} | {c['right']} | {c['wrong']} | {c['unnamed']} | {c['outsider']} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="0.1,0.25", help="segmentation hops (fraction of the 10 s window)")
    p.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)))
    p.add_argument("--sizes", default=",".join(map(str, MIN_CLUSTER_SIZES)), help="min_cluster_size values")
    p.add_argument("--conditions", default="", help="indices into realvoices.SET (default: all)")
    p.add_argument("--known", action="store_true", help="measure known-speaker naming (realvoices.KNOWN_SET)")
    p.add_argument("--known-thresholds", default="0.3,0.35,0.4,0.45,0.5,0.55,0.6,0.65,0.7")
    args = p.parse_args(argv)
    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
    if args.known:
        known(realvoices.KNOWN_SET, [float(x) for x in args.known_thresholds.split(",")])
        return 0
    picked = [realvoices.SET[int(i)] for i in args.conditions.split(",") if i] or realvoices.SET
    run(picked, [float(x) for x in args.steps.split(",")], [float(x) for x in args.thresholds.split(",")],
        [int(x) for x in args.sizes.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
