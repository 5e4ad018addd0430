"""Whisper base (multilingual) from its two registry packages: assembled once, verified, loaded
offline, and it recognises German (the English-only default cannot)."""
from __future__ import annotations

import pathlib

import pytest

from mp4totext.samples import make_media, word_error_rate
from workers.stages.model_files import ModelFilesMissing, assemble

GERMAN = "Guten Morgen. Heute sprechen wir über die Geschichte der Stadt und ihre Brücken."


def test_assembles_once_and_reuses(tmp_path: pathlib.Path) -> None:
    first = pathlib.Path(assemble("base", tmp_path))
    assert sorted(p.name for p in first.iterdir()) == ["config.json", "manifest.json", "model.bin", "tokenizer.json",
                                                       "vocabulary.json"]
    stamp = (first / "model.bin").stat().st_mtime_ns
    assert pathlib.Path(assemble("base", tmp_path)) == first
    assert (first / "model.bin").stat().st_mtime_ns == stamp  # not written again
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    (tmp_path / "whisper-base.lock").unlink()  # review finding: an assembled (read-only) dir is only read
    assert pathlib.Path(assemble("base", tmp_path)) == first and not (tmp_path / "whisper-base.lock").exists()


def test_workers_starting_together_assemble_once(tmp_path: pathlib.Path) -> None:
    """Three processes on one empty models directory: one assembles, the others wait and reuse it."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(3, mp_context=ctx) as pool:
        paths = list(pool.map(assemble, ["base"] * 3, [str(tmp_path)] * 3))
    assert len(set(paths)) == 1
    target = pathlib.Path(paths[0])
    assert (target / "model.bin").stat().st_size > 100_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whisper-base", "whisper-base.lock"]


def test_unknown_model_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelFilesMissing, match="no packaged model"):
        assemble("huge", tmp_path)


def test_base_transcribes_german_offline(tmp_path: pathlib.Path) -> None:
    from workers.stages.media import extract_audio, load_wav
    from workers.stages.transcribe import load_model

    model = load_model(assemble("base", tmp_path / "models"), device="cpu", local_files_only=True)
    media = make_media(GERMAN, str(tmp_path / "de.mp4"), voice="de")
    wav = str(tmp_path / "de.wav")
    extract_audio(media, wav)
    segments, info = model.transcribe(load_wav(wav), beam_size=5)
    text = " ".join(s.text for s in segments)
    assert info.language == "de", (info.language, text)
    wer = word_error_rate(GERMAN, text)
    print(f"\nWhisper base, espeak-ng German: WER {wer:.2f}: {text}")
    assert wer < 0.5, text
