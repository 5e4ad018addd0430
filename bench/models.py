"""Per-model speed and accuracy on the same speech: tiny.en vs Whisper base, and our routed stage.

    .venv/bin/python bench/models.py [--repeat 3]

Speaks an English and a German passage with espeak-ng, then for each model prints its load
time, the best transcription time of ``--repeat`` runs (model loaded, beam 5, VAD), the
real-time factor and the word error rate, and base's time as a ratio of tiny.en's measured in
the same run. tiny.en is English-only, so it has no German figure. Then the stage as the
service runs it (``transcribe_routed`` with the default set base + tiny.en, language
automatic: per-window detection with base, English routed to tiny.en) against a bare
faster-whisper call of base with its own automatic detection, as a ratio. Nothing leaves the
machine.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from core.models import ModelSet  # noqa: E402
from mp4totext.samples import make_media, word_error_rate  # noqa: E402
from workers.stages.media import extract_audio, load_wav  # noqa: E402
from workers.stages.model_files import locate  # noqa: E402
from workers.stages.transcribe import TranscribeOptions, load_model, transcribe_routed  # noqa: E402

TEXTS = {
    "en": ("en-us", "The lecture today covers the history of the bridge and how engineers measured the river. "
                    "We will look at three designs, compare their costs, and discuss why the last one failed."),
    "de": ("de", "Die Vorlesung heute behandelt die Geschichte der Brücke und wie Ingenieure den Fluss gemessen "
                 "haben. Wir vergleichen drei Entwürfe und ihre Kosten."),
}


def best_routed(models: dict[str, object], audio: object, repeat: int) -> tuple[float, str, str]:
    best, text, used = float("inf"), "", ""
    for _ in range(repeat):
        started = time.perf_counter()
        result = transcribe_routed(ModelSet.of("base,tiny.en"), lambda spec: models[spec.name], audio,
                                   TranscribeOptions(beam_size=5, vad_filter=True))
        best = min(best, time.perf_counter() - started)
        text, used = result.text, f"{result.model} ({result.language})"
    return best, text, used


def best_run(model: object, audio: object, language: str | None, repeat: int) -> tuple[float, str]:
    best, text = float("inf"), ""
    for _ in range(repeat):
        started = time.perf_counter()
        run = model.transcribe  # type: ignore[attr-defined]
        segments, _info = run(audio, beam_size=5, vad_filter=True, language=language)
        text = " ".join(s.text for s in segments)
        best = min(best, time.perf_counter() - started)
    return best, text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        audio = {}
        for lang, (voice, text) in TEXTS.items():
            wav = f"{tmp}/{lang}.wav"
            extract_audio(make_media(text, f"{tmp}/{lang}.mp4", voice=voice), wav)
            audio[lang] = load_wav(wav)
        models = {"tiny.en": locate("tiny.en", tmp), "base": locate("base", f"{tmp}/models")}
        loaded: dict[str, object] = {}
        times: dict[tuple[str, str], float] = {}
        print("| model | language | load s | best of {} s | RTF | WER |".format(args.repeat))
        print("| --- | --- | --- | --- | --- | --- |")
        for name, path in models.items():
            started = time.perf_counter()
            model = loaded[name] = load_model(path, device="cpu")
            load_s = time.perf_counter() - started
            for lang, samples in audio.items():
                if name.endswith(".en") and lang != "en":
                    continue
                took, text = best_run(model, samples, lang, args.repeat)
                times[(name, lang)] = took
                seconds = len(samples) / 16000
                print(f"| {name} | {lang} | {load_s:.2f} | {took:.2f} | {took / seconds:.3f} | "
                      f"{word_error_rate(TEXTS[lang][1], text):.2f} |")
        ratio = times[("base", "en")] / times[("tiny.en", "en")]
        print(f"\nbase / tiny.en time on the same English speech: {ratio:.2f}")
        print("\n| speech | bare base, auto language s | our stage, auto language s | ours / bare | ran on | WER |")
        print("| --- | --- | --- | --- | --- | --- |")
        for lang, samples in audio.items():
            bare, _ = best_run(loaded["base"], samples, None, args.repeat)
            ours, text, used = best_routed(loaded, samples, args.repeat)
            print(f"| {lang} | {bare:.2f} | {ours:.2f} | {ours / bare:.2f} | {used} | "
                  f"{word_error_rate(TEXTS[lang][1], text):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
