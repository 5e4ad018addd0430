"""Live captions from the Python client: stream audio as it is recorded, get interim text and
final segments back, and survive a broken connection without losing a byte.

``LiveCaptions(client, config).run(chunks)`` sends the chunks (bytes: PCM16 16 kHz mono, or an
Ogg Opus byte stream) on LiveService.StreamLive, optionally paced at real time, and calls
``on_event`` for every interim, segment and ack. Bytes the server has not acknowledged are kept;
when the stream breaks (a replica killed, a network change) it reconnects with `resume`, the
server's session says how much it stored, and the rest is sent again: the recording on the
server is exactly what was sent. Final segments are delivered once each (by id), in order.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Iterable, Iterator

import grpc

from mp4totext.v1 import live_pb2 as lpb
from mp4totext.v1 import live_pb2_grpc

CHUNK_S = 0.1  # what a recorder hands over at a time
RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)


def pcm_chunks(pcm: bytes, chunk_s: float = CHUNK_S) -> Iterator[bytes]:
    """16 kHz mono PCM16 in recorder-sized chunks."""
    n = int(32000 * chunk_s)
    for i in range(0, len(pcm), n):
        yield pcm[i:i + n]


class LiveCaptions:
    """One live session from start to end (see the module docstring)."""

    def __init__(self, client: Any, config: lpb.LiveConfig, request_id: str | None = None,
                 bytes_per_s: float = 32000.0, max_reconnects: int = 20) -> None:
        self.client, self.config = client, config
        self.request_id = request_id or str(uuid.uuid4())
        self.bytes_per_s = bytes_per_s  # pacing of ``realtime`` (PCM16 16 kHz: 32000)
        self.max_reconnects = max_reconnects
        self.stub = live_pb2_grpc.LiveServiceStub(client.channel)
        self.session = ""  # live/{id}, once the server named it
        self.pending = bytearray()  # sent, not yet acknowledged: [acked, acked + len)
        self.acked = 0
        self.seen = -1  # the last final segment id delivered
        self.opened = False  # this connection's session event arrived
        self.reconnects = 0

    def run(self, chunks: Iterable[bytes], on_event: Callable[[lpb.StreamLiveResponse], None] | None = None,
            realtime: bool = False) -> lpb.LiveEnded:
        """Stream ``chunks`` to the end; returns the `ended` event (media and transcription names)."""
        source = iter(chunks)
        started = time.monotonic()
        while True:
            try:
                for event in self.stub.StreamLive(self._requests(source, realtime, started),
                                                  metadata=self.client._md()):
                    ended = self._handle(event, on_event)
                    if ended is not None:
                        return ended
                raise ConnectionError("the live stream ended without its `ended` event")
            except (grpc.RpcError, ConnectionError) as exc:
                code = exc.code() if isinstance(exc, grpc.RpcError) else grpc.StatusCode.UNAVAILABLE
                if code not in RESUMABLE or self.reconnects >= self.max_reconnects:
                    raise
                self.reconnects += 1
                time.sleep(min(2.0, 0.2 * self.reconnects))

    def _handle(self, event: lpb.StreamLiveResponse, on_event: Callable | None) -> lpb.LiveEnded | None:
        which = event.WhichOneof("event")
        if which == "session":
            self.session = event.session.name
            self._acked(event.session.committed_size)
            self.opened = True
            for seg in event.session.segments:  # stored before a break but never received: delivered now
                if seg.id > self.seen:
                    self.seen = seg.id
                    if on_event is not None:
                        on_event(lpb.StreamLiveResponse(segment=seg))
        elif which == "ack":
            self._acked(event.ack.committed_size)
        elif which == "segment":
            if event.segment.id <= self.seen:
                return None  # sent before a break: delivered already
            self.seen = event.segment.id
        if on_event is not None:
            on_event(event)
        return event.ended if which == "ended" else None

    def _acked(self, committed: int) -> None:
        if committed > self.acked:
            del self.pending[:committed - self.acked]
            self.acked = committed

    def _requests(self, source: Iterator[bytes], realtime: bool, started: float) -> Iterator[lpb.StreamLiveRequest]:
        self.opened = False
        if self.session:
            yield lpb.StreamLiveRequest(resume=lpb.ResumeLive(session=self.session, write_offset=self.acked))
        else:
            yield lpb.StreamLiveRequest(start=lpb.StartLive(config=self.config, request_id=self.request_id))
        # The server's session event sets ``acked`` to what it stored; what follows is sent again.
        # Nothing is sent before it (a resumed Ogg session may take a while to answer).
        waited = time.monotonic() + 300.0
        while not self.opened:
            if time.monotonic() > waited:
                return  # the call is gone: run() reconnects
            time.sleep(0.005)
        resend = bytes(self.pending)
        for i in range(0, len(resend), 65536):
            yield lpb.StreamLiveRequest(audio=resend[i:i + 65536])
        for chunk in source:
            self.pending += chunk
            if realtime:  # as a recorder delivers it: no sooner than the audio exists
                due = started + (self.acked + len(self.pending)) / self.bytes_per_s
                time.sleep(max(0.0, due - time.monotonic()))
            yield lpb.StreamLiveRequest(audio=chunk)
        yield lpb.StreamLiveRequest(finish=lpb.FinishLive())
