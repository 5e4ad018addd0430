"""Live captions' two halves on real components: the streaming decoder on tiny.en and espeak-ng
speech, and live sessions' durable audio on SQLite + the local object store."""
from __future__ import annotations

import pathlib
import subprocess
import wave
from typing import Any, Iterator

import numpy as np
import pytest

from core import live, runtime
from core.upload_sessions import Superseded, WrongOffset
from mp4totext import samples
from mp4totext.config import Settings
from mp4totext.live_cli import file_pcm
from storage.db import Media, Tenant, database
from storage.live import LiveChunk
from workers.stages.live import LiveDecoder, Word, _common_prefix, _without_repeat


def w(text: str, start: float, end: float) -> Word:
    return Word(start, end, " " + text)


def test_local_agreement_keeps_what_two_hypotheses_begin_with() -> None:
    prev = [w("today", 0, 0.4), w("we", 0.4, 0.6), w("walk", 0.6, 0.9)]
    cur = [w("Today,", 0, 0.4), w("we", 0.4, 0.6), w("will", 0.6, 0.8), w("talk", 0.8, 1.1)]
    assert [x.key for x in _common_prefix(prev, cur)] == ["today", "we"]  # case and punctuation aside
    assert _common_prefix([], cur) == []
    stable = [w("the", 1, 1.2), w("end", 1.2, 1.5)]
    assert [x.key for x in _without_repeat(stable, [w("end", 1.25, 1.5), w("of", 1.5, 1.6)])] == ["of"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from workers.stages.model_files import locate
    from workers.stages.transcribe import load_model

    return load_model(locate("tiny.en", str(tmp_path_factory.mktemp("models"))), "cpu", "int8", 2)


def speech(tmp: pathlib.Path, texts: list[str]) -> np.ndarray:
    parts = []
    for i, text in enumerate(texts):
        samples.speech_wav(text, str(tmp / f"{i}.wav"))
        pcm = file_pcm(str(tmp / f"{i}.wav"))
        parts.append(np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768)
        parts.append(np.zeros(12800, dtype=np.float32))  # 0.8 s pause
    return np.concatenate(parts)


def test_the_decoder_gives_interim_text_then_ordered_finals_that_match_the_speech(tiny: Any,
                                                                                  tmp_path: pathlib.Path) -> None:
    texts = samples.SENTENCES[1:4]
    audio = speech(tmp_path, texts)
    dec = LiveDecoder(tiny, "en")
    interims, finals = [], []
    for i in range(0, len(audio), 1600):  # 100 ms at a time, as a recorder
        dec.feed(audio[i:i + 1600])
        if dec.ready():
            u = dec.step()
            finals += u.finals
            if u.interim and not finals:
                interims.append(u.interim)
    finals += dec.finish().finals
    assert interims, "no interim text before the first final segment"
    assert len(finals) >= len(texts) and all(a.end <= b.start + 1e-6 for a, b in zip(finals, finals[1:]))
    assert samples.word_error_rate(" ".join(texts), " ".join(f.text for f in finals)) <= 0.15
    assert all(f.words and f.words[0].start >= f.start - 1e-6 for f in finals)


def test_silence_is_not_decoded_and_a_resumed_decoder_continues_in_stream_time(tiny: Any,
                                                                               tmp_path: pathlib.Path) -> None:
    dec = LiveDecoder(tiny, "en")
    for _ in range(30):  # 3 s of silence
        dec.feed(np.zeros(1600, dtype=np.float32))
        if dec.ready():
            assert not dec.step().decoded
    assert len(dec.buffer) <= 16000  # silence is dropped, not kept for the next decode
    audio = speech(tmp_path, [samples.SENTENCES[2]])
    later = LiveDecoder(tiny, "en", start_s=42.0)
    later.feed(audio)
    finals = later.step().finals + later.finish().finals
    assert finals and finals[0].start >= 42.0


@pytest.fixture()
def rt(tmp_path: pathlib.Path) -> Iterator[Any]:
    yield runtime.init(Settings(data_dir=str(tmp_path), broker_url="memory"))
    database.close()


def _session(rt: Any) -> Any:
    with database.connection_context():
        tenant = Tenant.create(name="live")
    return live.start(tenant.id, "", live.Start(encoding=live.PCM16, filename="", language="en", model="tiny.en",
                                                config={}, job_config=None, job_priority=0, request_id="r1"))


def test_only_stored_bytes_are_acknowledged_and_a_stale_stream_stops(rt: Any) -> None:
    s = _session(rt)
    assert live.start(s.tenant_id, "", live.Start(live.PCM16, "", "en", "tiny.en", {}, None, 0, "r1")).id == s.id
    first = live.Recorder(s, 0)
    first.add(b"\1\0" * 8000)
    assert first.committed == 0 and first.flush() == 16000  # acknowledged once stored
    with pytest.raises(WrongOffset):
        live.Recorder(live.reload(s.id), 100)
    second = live.Recorder(live.reload(s.id), 16000)  # the client resumed elsewhere
    first.add(b"\2\0" * 10)
    with pytest.raises(Superseded):
        first.flush()
    second.add(b"\3\0" * 8000)
    second.flush()
    second.segment({"id": 0, "start": 0.0, "end": 0.9, "text": "hello", "words": []})
    with pytest.raises(Superseded):
        first.segment({"id": 0, "start": 0.0, "end": 0.9, "text": "hello", "words": []})
    assert live.audio_from(live.reload(s.id), 15998) == b"\1\0" + b"\3\0" * 8000


def test_the_end_makes_a_wav_media_of_every_byte_and_drops_the_chunks(rt: Any, tmp_path: pathlib.Path) -> None:
    s = _session(rt)
    rec = live.Recorder(s, 0)
    sent = bytes(range(256)) * 250
    for i in range(0, len(sent), 6400):
        rec.add(sent[i:i + 6400])
        rec.flush()
    media, job = live.end(s.id)
    assert job is None and media is not None and live.end(s.id)[0].id == media.id  # idempotent
    path = tmp_path / "rec.wav"
    runtime.get().store.get_file(media.object_key, str(path))
    with wave.open(str(path)) as wf:
        assert (wf.getframerate(), wf.getnchannels(), wf.getsampwidth()) == (16000, 1, 2)
        assert wf.readframes(wf.getnframes()) == sent
    with database.connection_context():
        assert Media.get_by_id(media.id).size_bytes == len(sent) + 44
        assert LiveChunk.select().where(LiveChunk.session == s.id).count() == 0
    assert live.reload(s.id).state == live.ENDED


def test_ogg_opus_chunks_cut_anywhere_decode_to_the_whole_recording(tmp_path: pathlib.Path) -> None:
    from server.live_service import Pcm

    samples.speech_wav(samples.DEMO_TEXT, str(tmp_path / "s.wav"))
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(tmp_path / "s.wav"), "-ac", "1", "-ar", "16000",
                    "-c:a", "libopus", str(tmp_path / "s.ogg")], check=True)
    with wave.open(str(tmp_path / "s.wav")) as wf:
        seconds = wf.getnframes() / wf.getframerate()
    data = (tmp_path / "s.ogg").read_bytes()
    pcm = Pcm(live.OGG_OPUS, "ffmpeg")
    parts = [pcm.decode(data[i:i + 777]) for i in range(0, len(data), 777)]  # not at page boundaries
    audio = np.concatenate([*parts, pcm.close()])
    assert abs(len(audio) / 16000 - seconds) < 0.05 and np.abs(audio).max() > 0.05
    odd = Pcm(live.PCM16, "ffmpeg")  # PCM16 split inside a sample
    raw = (np.arange(100, dtype="<i2") * 300).tobytes()
    assert np.array_equal(np.concatenate([odd.decode(raw[:51]), odd.decode(raw[51:])]) * 32768,
                          np.arange(100) * 300.0)


def test_another_callers_request_id_gets_nothing_of_the_session(rt: Any) -> None:
    s = _session(rt)
    with pytest.raises(live.RequestIdTaken):
        live.start(s.tenant_id, "bob", live.Start(live.PCM16, "", "en", "tiny.en", {}, None, 0, "r1"))


def test_a_stale_streams_late_write_never_lands_on_the_newer_streams_audio(rt: Any) -> None:
    s = _session(rt)
    old = live.Recorder(s, 0)
    new = live.Recorder(live.reload(s.id), 0)  # resumed elsewhere before the old one stored anything
    new.add(b"\7\0" * 100)
    new.flush()
    old.add(b"\1\0" * 100)  # the old replica notices late and flushes at the same offset
    with pytest.raises(Superseded):
        old.flush()
    assert live.audio_from(live.reload(s.id), 0) == b"\7\0" * 100
