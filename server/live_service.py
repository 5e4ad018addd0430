"""LiveService: live captions over one bidirectional stream, decoded on this replica.

Where it runs: live decoding needs a warm model and an answer within a second, not a queue hop
per chunk, so it runs in the server replica that holds the stream (the composition root gives
this service a decoder factory; a deployment runs a ``live`` group of server replicas with
MP4T_LIVE_MAX_STREAMS > 0 and HAProxy routes /mp4totext.v1.LiveService/ to it, scaled on
mp4t_live_streams). The audio itself is durable (core.live), so a stream may resume on any
replica of the group. Admission control: a replica decodes at most MP4T_LIVE_MAX_STREAMS
streams (what bench/live.py measured it holds in real time); one more is refused with
RESOURCE_EXHAUSTED + RetryInfo before anything is stored, and the client (or the proxy) goes to
another replica instead of every stream on this one falling behind.
"""
from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np
import structlog
from google.protobuf import json_format

from core import live
from core.models import ModelSet
from core.registry import ai_status, diarization_status
from mp4totext.v1 import live_pb2 as lpb
from mp4totext.v1 import live_pb2_grpc
from mp4totext.v1 import transcription_pb2 as tpb
from observability import metrics
from server import convert
from server.auth import current_tenant, current_user
from server.errors import exhausted, invalid, not_found, unavailable
from server.upload_reader import MAX_CHUNK
from server.validation import job_config, language_of, parse_name, request_id
from storage.live import LiveSession

log = structlog.get_logger(__name__)

COLLECTION = "live"
ENCODINGS = {lpb.AUDIO_ENCODING_PCM16: live.PCM16, lpb.AUDIO_ENCODING_OGG_OPUS: live.OGG_OPUS}
STATES = {live.ACTIVE: lpb.LIVE_SESSION_STATE_ACTIVE, live.ENDED: lpb.LIVE_SESSION_STATE_ENDED,
          live.FAILED: lpb.LIVE_SESSION_STATE_FAILED}
RETRY_S = 2.0
# (model name, language, start seconds) -> a decoder: feed(pcm), ready(), step(), finish() (workers.stages.live)
DecoderFactory = Callable[[str, str, float], Any]


def segment_to_proto(seg: dict[str, Any]) -> lpb.LiveSegment:
    msg = lpb.LiveSegment(id=seg["id"], text=seg["text"], language_code=seg.get("language", ""),
                          start_offset=convert.dur(seg["start"]), end_offset=convert.dur(seg["end"]))
    for w in seg.get("words", []):
        msg.words.append(tpb.Word(word=w["word"], start_offset=convert.dur(w["start"]),
                                  end_offset=convert.dur(w["end"]), probability=w.get("probability", 0.0)))
    return msg


def to_proto(s: LiveSession, segments: bool = True) -> lpb.LiveSession:
    msg = lpb.LiveSession(name=f"{COLLECTION}/{s.id}", state=STATES[s.state], committed_size=s.committed_size,
                          committed_duration=convert.dur(live.seconds_of(s.encoding, s.committed_size)),
                          media=f"media/{s.media_id}" if s.state == live.ENDED else "",
                          transcription=f"transcriptions/{s.transcription_id}" if s.transcription_id else "",
                          error_message=s.error_message, model=s.model, language_code=s.language,
                          create_time=convert.ts(s.create_time), update_time=convert.ts(s.update_time))
    json_format.ParseDict(s.config or {}, msg.config, ignore_unknown_fields=True)
    if segments:
        msg.segments.extend(segment_to_proto(seg) for seg in s.segments or [])
    return msg


def lookup(name: str, field: str = "name") -> LiveSession:
    session_id = parse_name(name, COLLECTION, field)
    s = live.get(current_tenant.get(), current_user.get(""), session_id)
    if s is None:
        raise not_found(f"{COLLECTION}/{session_id}")
    return s


class Pcm:
    """Client bytes -> 16 kHz mono float32: PCM16 directly, Ogg Opus through an ffmpeg pipe."""

    def __init__(self, encoding: str, ffmpeg: str) -> None:
        self.encoding, self.odd = encoding, b""
        self.skip = 0  # decoded samples still to drop (a resumed Ogg stream: what precedes the last final)
        self.proc: subprocess.Popen | None = None
        self.out = bytearray()
        self.lock = threading.Lock()
        if encoding == live.OGG_OPUS:
            self.proc = subprocess.Popen([ffmpeg, "-nostdin", "-v", "error", "-f", "ogg", "-i", "pipe:0", "-f", "s16le",
                                          "-ac", "1", "-ar", str(live.SAMPLE_RATE), "pipe:1"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            threading.Thread(target=self._drain, name="live-opus", daemon=True).start()

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(65536):
            with self.lock:
                self.out += chunk

    def decode(self, data: bytes) -> np.ndarray:
        if self.proc is None:
            raw = self.odd + data
            self.odd = raw[len(raw) // 2 * 2:]
            return self._samples(raw[:len(raw) // 2 * 2])
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()
        return self._take()

    def close(self) -> np.ndarray:
        """What is left (Opus: the decoder's tail, after its input ends)."""
        if self.proc is None:
            return np.zeros(0, dtype=np.float32)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        time.sleep(0.05)
        return self._take()

    def kill(self) -> None:
        """End the decoder process whatever happened to the stream (idempotent)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.kill()
            self.proc.wait(timeout=10)

    def _take(self) -> np.ndarray:
        with self.lock:
            n = len(self.out) // 2 * 2
            raw, self.out = bytes(self.out[:n]), self.out[n:]
        samples = self._samples(raw)
        drop = min(self.skip, len(samples))
        self.skip -= drop
        return samples[drop:]

    @staticmethod
    def _samples(raw: bytes) -> np.ndarray:
        return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


class LiveService(live_pb2_grpc.LiveServiceServicer):
    def __init__(self, settings: Any, decoders: DecoderFactory | None) -> None:
        self.s, self.decoders = settings, decoders
        self.active = 0
        self.lock = threading.Lock()

    def GetLiveSession(self, request: lpb.GetLiveSessionRequest, context: Any) -> lpb.LiveSession:
        return to_proto(lookup(request.name))

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        if self.decoders is None or self.s.live_max_streams <= 0:
            raise unavailable("live captions are not served by this server (MP4T_LIVE_MAX_STREAMS=0, or no model); "
                              "connect to a live replica", RETRY_S)
        with self.lock:
            if self.active >= self.s.live_max_streams:
                metrics.LIVE_REFUSED.inc()
                raise exhausted(f"this replica decodes {self.active} live streams, all it can in real time; "
                                f"retry in {RETRY_S:g} s (another replica may take it)", RETRY_S)
            self.active += 1
            metrics.LIVE_STREAMS.set(self.active)
        try:
            yield
        finally:
            with self.lock:
                self.active -= 1
                metrics.LIVE_STREAMS.set(self.active)

    def StreamLive(self, requests: Iterator[lpb.StreamLiveRequest], context: Any) -> Iterator[lpb.StreamLiveResponse]:
        first = next(requests, None)
        if first is None:
            return
        with self._slot():
            session, resumed = self._open(first)
            recorder = live.Recorder(session, session.committed_size)
            session = recorder.s  # read after this stream took the session over: its segments are final
            pcm = Pcm(session.encoding, self.s.ffmpeg)
            try:
                decoder = self._decoder(session, pcm)
                log.info("live_stream_started", live_session=session.id, resumed=resumed, model=session.model,
                         committed_size=session.committed_size)
                yield lpb.StreamLiveResponse(session=to_proto(session, segments=resumed))
                yield from _Stream(self.s, session, recorder, pcm, decoder).run(requests)
            finally:
                pcm.kill()

    def _open(self, first: lpb.StreamLiveRequest) -> tuple[LiveSession, bool]:
        which = first.WhichOneof("request")
        if which == "resume":
            s = lookup(first.resume.session, "resume.session")  # live.Recorder refuses one not ACTIVE
            if not 0 <= first.resume.write_offset <= s.committed_size:
                raise live.WrongOffset(first.resume.write_offset, s.committed_size)
            return s, True
        if which != "start":
            raise invalid("the first message must be `start` (a new session) or `resume` (an existing one)")
        spec = self._start_spec(first.start)
        s = live.start(current_tenant.get(), current_user.get(""), spec)
        return s, s.committed_size > 0 or bool(s.segments)

    def _start_spec(self, start: lpb.StartLive) -> live.Start:
        cfg = start.config
        encoding = ENCODINGS.get(cfg.encoding)
        if encoding is None:
            raise invalid("start.config.encoding is required: AUDIO_ENCODING_PCM16 (16 kHz mono) or "
                          "AUDIO_ENCODING_OGG_OPUS")
        if encoding == live.PCM16 and cfg.sample_rate_hertz not in (0, live.SAMPLE_RATE):
            raise invalid(f"start.config.sample_rate_hertz={cfg.sample_rate_hertz}: PCM16 must be 16000 Hz mono")
        expected = [language_of(c, "start.config.expected_language_codes") or "" for c in cfg.expected_language_codes]
        language = (language_of(cfg.language_code, "start.config.language_code") if cfg.language_code else None) \
            or next((c for c in expected if c), "en")
        models = ModelSet.of(self.s.model_sources)
        model = models.for_language(language, "transcribe", None).name
        job, priority = None, 0
        if cfg.HasField("transcription_config"):
            tc = tpb.TranscriptionConfig()
            tc.CopyFrom(cfg.transcription_config)
            if not tc.language_code and not tc.expected_language_codes:
                tc.language_code = language
            job, priority = job_config(tc, models, diarization_status, ai_status)
        return live.Start(encoding=encoding, filename=cfg.filename[:1024], language=language, model=model,
                          config=json_format.MessageToDict(cfg), job_config=job, job_priority=priority,
                          request_id=request_id(start.request_id, "start.request_id"))

    def _decoder(self, s: LiveSession, pcm: Pcm) -> Any:
        """A decoder that continues after the session's last final segment (audio since then re-read)."""
        assert self.decoders is not None
        start_s = s.segments[-1]["end"] if s.segments else 0.0
        if s.encoding == live.PCM16:  # a segment ends within what was stored (it is flushed first)
            start_s = min(start_s, live.seconds_of(s.encoding, s.committed_size))
        decoder = self.decoders(s.model, s.language, start_s)
        decoder.context = " ".join(seg["text"] for seg in (s.segments or [])[-3:])
        if s.committed_size:
            if s.encoding == live.PCM16:
                decoder.feed(pcm.decode(live.audio_from(s, int(start_s * live.SAMPLE_RATE) * 2)))
            else:  # an Ogg stream cannot start in the middle: decode it all, drop what precedes start_s
                pcm.skip = int(start_s * live.SAMPLE_RATE)
                decoder.feed(pcm.decode(live.audio_from(s, 0)))
        return decoder


class _Stream:
    """One stream's loop: store and acknowledge audio, decode, record and send final segments."""

    def __init__(self, s: Any, session: LiveSession, recorder: live.Recorder, pcm: Pcm, decoder: Any) -> None:
        self.s, self.session, self.rec, self.pcm, self.dec = s, session, recorder, pcm, decoder
        self.next_id = len(session.segments or [])
        self.last_flush = time.monotonic()
        self.interim = ""

    def run(self, requests: Iterator[lpb.StreamLiveRequest]) -> Iterator[lpb.StreamLiveResponse]:
        try:
            for req in requests:
                which = req.WhichOneof("request")
                if which == "audio":
                    yield from self._audio(req.audio)
                elif which == "finish":
                    yield from self._finish()
                    return
                else:
                    raise invalid(f"`{which}` may only be the first message; then send `audio` and `finish`")
        finally:
            if self.rec.buf:
                with contextlib.suppress(Exception):  # the client left without finish: keep what it sent
                    self.rec.flush()

    def _audio(self, data: bytes) -> Iterator[lpb.StreamLiveResponse]:
        if len(data) > MAX_CHUNK:
            raise invalid(f"an audio chunk holds at most {MAX_CHUNK} bytes")
        self.rec.add(data)
        self.dec.feed(self.pcm.decode(data))
        if time.monotonic() - self.last_flush >= self.s.live_flush_s:
            yield self._ack()
        if self.dec.ready():
            yield from self._update(self.dec.step())

    def _ack(self) -> lpb.StreamLiveResponse:
        committed = self.rec.flush()
        self.last_flush = time.monotonic()
        return lpb.StreamLiveResponse(ack=lpb.LiveAck(
            committed_size=committed, committed_duration=convert.dur(live.seconds_of(self.session.encoding,
                                                                                     committed))))

    def _update(self, update: Any) -> Iterator[lpb.StreamLiveResponse]:
        if update.finals and self.rec.buf:  # its audio is stored before the segment is (a resume starts there)
            yield self._ack()
        for final in update.finals:
            seg = {"id": self.next_id, "start": round(final.start, 3), "end": round(final.end, 3), "text": final.text,
                   "language": self.session.language,
                   "words": [{"word": w.text, "start": round(w.start, 3), "end": round(w.end, 3),
                              "probability": round(w.probability, 3)} for w in final.words]}
            self.rec.segment(seg)  # recorded before it is sent: a resumed stream never sends it again
            self.next_id += 1
            metrics.LIVE_SEGMENTS.inc()
            yield lpb.StreamLiveResponse(segment=segment_to_proto(seg))
        if update.interim != self.interim or update.finals:
            self.interim = update.interim
            yield lpb.StreamLiveResponse(interim=lpb.LiveInterim(
                text=update.interim, audio_offset=convert.dur(update.audio_end)))

    def _finish(self) -> Iterator[lpb.StreamLiveResponse]:
        tail = self.pcm.close()
        if len(tail):
            self.dec.feed(tail)
        yield self._ack()
        yield from self._update(self.dec.finish())
        media, job = live.end(self.session.id, live_seconds=self.dec.received)
        s = live.reload(self.session.id)
        log.info("live_stream_ended", live_session=s.id, seconds=round(self.dec.received, 3), segments=self.next_id)
        yield lpb.StreamLiveResponse(ended=lpb.LiveEnded(
            session=to_proto(s), media=f"media/{media.id}" if media else "",
            transcription=f"transcriptions/{job.id}" if job else ""))

