"""Turkish and English through the models and the routed stage, on the same files in one run (issue 22).

    .venv/bin/python bench/languages.py [--quick]

Builds the strongest synthetic Turkish set espeak-ng allows (three Turkish voices, a slow
speaker, noise at 15 dB SNR, a telephone band) plus the two mixed files of issue 22 (a Turkish
lecture opening then English, and the reverse), and Debian's pocketsphinx-testdata real English
read speech when installed. Each file goes through:

- ``tiny.en``: the English-only model alone (what a wrong route gives),
- ``base (language given)``: Whisper base with the true language fixed (single-language files),
- ``routed, auto``: the service's stage (base + tiny.en, per-window detection, no hint),
- ``routed, hint tr,en``: the same with ``expected_language_codes = tr,en``.

For every part of a file (the Turkish and the English turn) it prints the part's Turkish CER or
English WER on the segments whose middle lies in that part, the share of those segments in the
part's language, whether any segment is a repetition loop, the models used, the reported language
(and uncertain flag) and the seconds taken. Nothing leaves the machine.
"""
from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from core.models import ModelSet  # noqa: E402
from mp4totext.samples import char_error_rate, make_dialogue, word_error_rate  # noqa: E402
from workers.stages import decode_checks  # noqa: E402
from workers.stages.media import extract_audio, load_wav  # noqa: E402
from workers.stages.model_files import locate  # noqa: E402
from workers.stages.transcribe import TranscribeOptions, load_model, transcribe_routed  # noqa: E402

TR = ("Bugün coğrafya dersinde Türkiye'nin dağlarını ve nehirlerini konuşacağız. Önce Karadeniz bölgesinin "
      "iklimini inceleyeceğiz. Sonra haritada büyük şehirleri bulacağız.")
EN = "Now let us continue in English. Please open your books to chapter three and look at the map of the region."
PHONE = "highpass=f=300,lowpass=f=3400,aresample=8000,aresample=16000"
# name: (turns as (voice, language, text), ffmpeg filter, noise SNR dB or None, espeak speed)
FILES: dict[str, tuple[list[tuple[str, str, str]], str, float | None, int]] = {
    "tr-en (issue 22)": ([("tr+f2", "tr", TR), ("en-us", "en", EN)], "", None, 150),
    "en-tr": ([("en-us", "en", EN), ("tr+f2", "tr", TR)], "", None, 150),
    "tr, voice tr+f2": ([("tr+f2", "tr", TR)], "", None, 150),
    "tr, voice tr+m3": ([("tr+m3", "tr", TR)], "", None, 150),
    "tr, voice tr (default)": ([("tr", "tr", TR)], "", None, 150),
    "tr+f2, slow (120 wpm)": ([("tr+f2", "tr", TR)], "", None, 120),
    "tr+f2, noise 15 dB": ([("tr+f2", "tr", TR)], "", 15.0, 150),
    "tr+f2, phone band": ([("tr+f2", "tr", TR)], PHONE, None, 150),
}
CONFIGS = {  # name: (model set, options)
    "tiny.en": ("tiny.en", {}),
    "base (language given)": ("base", {"language": "given"}),
    "routed, auto": ("base,tiny.en", {}),
    "routed, hint tr,en": ("base,tiny.en", {"expected_languages": ("tr", "en")}),
}


def _noisy(audio: np.ndarray, snr_db: float, seed: int = 7) -> np.ndarray:
    power = float(np.mean(audio[np.abs(audio) > 0.01] ** 2))
    noise = np.random.default_rng(seed).normal(0.0, np.sqrt(power / 10 ** (snr_db / 10)), len(audio))
    return (audio + noise).astype(np.float32)


def build(tmp: str) -> dict[str, tuple[np.ndarray, list[tuple[float, float, str, str]]]]:
    """Each file as 16 kHz audio and its parts (start, end, language, reference text)."""
    out = {}
    for i, (name, (turns, filt, snr, speed)) in enumerate(FILES.items()):
        path, truth = make_dialogue(f"{tmp}/{i}.m4a", [(v, t) for v, _, t in turns], pause_s=1.0,
                                    ffmpeg_filter=filt, speed=speed)
        extract_audio(path, f"{tmp}/{i}.wav")
        audio = load_wav(f"{tmp}/{i}.wav")
        out[name] = (_noisy(audio, snr) if snr else audio,
                     [(s, e, lang, text) for (s, e, _), (_, lang, text) in zip(truth, turns)])
    real = pathlib.Path("/usr/share/pocketsphinx/test/data/librivox")  # real English read speech (LibriVox)
    if (real / "transcription").exists():
        refs = {stem: text for text, stem in re.findall(r"<s> (.*?) </s> \((\S+)\)",
                                                       (real / "transcription").read_text())}
        clips, texts = [], []
        for stem in sorted(refs):
            extract_audio(str(real / f"{stem}.wav"), f"{tmp}/{stem}.wav")
            clips += [load_wav(f"{tmp}/{stem}.wav"), np.zeros(8000, np.float32)]
            texts.append(refs[stem])
        audio = np.concatenate(clips)
        out["en, real speech (LibriVox, pocketsphinx-testdata)"] = (audio, [(0.0, len(audio) / 16000, "en",
                                                                             " ".join(texts))])
    return out


def score(result: Any, parts: list[tuple[float, float, str, str]]) -> list[str]:
    """Per part: 'tr CER 0.21 (100 % tr)' / 'en WER 0.05 (100 % en)'."""
    bounds = [0.0] + [(a[1] + b[0]) / 2 for a, b in zip(parts, parts[1:])] + [float("inf")]
    cells = []
    for (lo, hi), (_, _, lang, ref) in zip(zip(bounds, bounds[1:]), parts):
        segs = [s for s in result.segments if lo <= (s.start + s.end) / 2 < hi]
        text = " ".join(s.text for s in segs)
        right = sum(1 for s in segs if s.language == lang) / max(len(segs), 1)
        err = char_error_rate(ref, text) if lang == "tr" else word_error_rate(ref, text)
        cells.append(f"{lang} {'CER' if lang == 'tr' else 'WER'} {err:.2f} ({right:.0%} {lang})")
    return cells


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the two mixed files of issue 22")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = build(tmp)
        if args.quick:
            files = {k: v for k, v in files.items() if k in ("tr-en (issue 22)", "en-tr")}
        loaded = {"tiny.en": load_model(locate("tiny.en", tmp), device="cpu"),
                  "base": load_model(locate("base", f"{tmp}/models"), device="cpu")}
        print("| file | config | models | language (p, uncertain) | parts | loops | s |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, (audio, parts) in files.items():
            for config, (sources, extra) in CONFIGS.items():
                langs = {p[2] for p in parts}
                if extra.get("language") == "given" and len(langs) > 1:
                    continue  # one fixed language cannot fit a mixed file
                if config == "tiny.en" and langs == {"en"} and "real" not in name:
                    continue
                opts = {**extra, "language": langs.pop()} if extra.get("language") else extra
                started = time.perf_counter()
                r = transcribe_routed(ModelSet.of(sources), lambda spec: loaded[spec.name], audio,
                                      TranscribeOptions(beam_size=5, vad_filter=True, **opts))
                took = time.perf_counter() - started
                loops = sum(decode_checks.has_loop(s.text) for s in r.segments)
                print(f"| {name} | {config} | {r.model} | {r.language} ({r.language_probability:.2f}"
                      f"{', uncertain' if r.language_uncertain else ''}) | {'; '.join(score(r, parts))} | "
                      f"{loops} | {took:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
