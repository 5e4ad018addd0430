"""Resumable upload for the client library: CreateUploadSession, then WriteUpload streams that
continue from the committed size after a broken stream, a restarted server or another replica.

The server commits whole parts (``part_size_bytes``); after a break the client asks
GetUploadSession for the committed size and sends from there, so stored parts are never sent
again and at most one part's worth of bytes is sent twice.
"""
from __future__ import annotations

import dataclasses
import os
import time
import uuid
from typing import Any, Callable, Iterator

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mp4totext.v1 import media_pb2

CHUNK = 1024 * 1024  # the server's per-message limit
# Stream failures worth resuming after: the connection broke, the replica died or restarted, a
# proxy reset the stream, the server was busy or a newer stream of ours took over.
RESUMABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                   grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                   grpc.StatusCode.DEADLINE_EXCEEDED)
MAX_FAILURES = 20  # in a row without progress


@dataclasses.dataclass
class UploadStats:
    """What the last resumable upload did: bytes sent over the wire (re-sent ones included),
    streams opened and resumptions after failures."""

    bytes_sent: int = 0
    streams: int = 0
    resumed: int = 0
    session: str = ""


class FileChanged(OSError):
    """The file changed while it was uploaded (it is shorter than when the upload started, or
    streams keep ending before its end): the upload cannot finish."""


def _details(exc: grpc.RpcError) -> list[Any]:
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except (AttributeError, ValueError):
        return []
    return list(status.details) if status is not None else []


def over_quota(exc: grpc.RpcError) -> bool:
    """RESOURCE_EXHAUSTED for a quota (a QuotaFailure detail), not a busy server: no retry helps."""
    return exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and any(
        d.Is(error_details_pb2.QuotaFailure.DESCRIPTOR) for d in _details(exc))


def committed_size_of(exc: grpc.RpcError) -> int | None:
    """The committed size a WRONG_WRITE_OFFSET refusal carries (google.rpc.ErrorInfo), if any."""
    for detail in _details(exc):
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info) and info.reason == "WRONG_WRITE_OFFSET":
            return int(info.metadata.get("committed_size", "0"))
    return None


def _requests(path: str, session: str, offset: int, size: int, stats: UploadStats,
              on_progress: Callable[[int, int], None] | None) -> Iterator[media_pb2.WriteUploadRequest]:
    with open(path, "rb") as fh:
        fh.seek(offset)
        first = True
        while first or offset < size:
            data = fh.read(CHUNK)
            yield media_pb2.WriteUploadRequest(upload_session=session if first else "", write_offset=offset,
                                               data=data)
            first = False
            if not data:
                return
            offset += len(data)
            stats.bytes_sent += len(data)
            if on_progress:
                on_progress(offset, size)


def upload(client: Any, path: str, sha256: str, delay: Callable[[grpc.RpcError, int], float],
           content_type: str = "", request_id: str | None = None,
           on_progress: Callable[[int, int], None] | None = None, timeout: float = 3600.0,
           stats: UploadStats | None = None) -> media_pb2.Media:
    """Upload ``path`` through an upload session with ``client`` (a mp4totext.client.Client),
    resuming after failures (waiting ``delay(error, attempt)``) until ``timeout``."""
    stats = stats if stats is not None else UploadStats()
    size = os.path.getsize(path)
    deadline = time.monotonic() + timeout
    session = client.call(client.media.CreateUploadSession, media_pb2.CreateUploadSessionRequest(
        metadata=media_pb2.UploadMetadata(filename=os.path.basename(path), content_type=content_type,
                                          size_bytes=size, sha256=sha256,
                                          request_id=request_id or str(uuid.uuid4()))))
    stats.session, offset, failures = session.name, session.committed_size, 0
    while True:
        if session.state == media_pb2.UPLOAD_SESSION_STATE_COMPLETED:
            return client.get_media(session.media)
        stats.streams += 1
        try:
            resp = client.media.WriteUpload(_requests(path, session.name, offset, size, stats, on_progress),
                                            metadata=client._md(), timeout=max(1.0, deadline - time.monotonic()))
            if resp.HasField("media"):
                return resp.media
            # The stream reached the end of the file before the declared size: it shrank, or is
            # being rewritten. Resume from what the server committed; no progress is a failure.
            session, before, offset = resp.upload_session, offset, resp.committed_size
            failures = 0 if offset > before else failures + 1
            now = os.path.getsize(path)
            if now != size:
                why = f"{path} has {now} bytes now, {size} when the upload started"
            elif failures > MAX_FAILURES or time.monotonic() > deadline:
                why = f"{failures} streams in a row ended before the end of {path} without progress"
            else:
                continue
            raise FileChanged(f"the file changed during upload: {why}; {offset} bytes are committed in "
                              f"{session.name}; upload it again")
        except grpc.RpcError as exc:
            committed = committed_size_of(exc)
            if committed is None and (exc.code() not in RESUMABLE_CODES or over_quota(exc)):
                raise
            failures += 1
            if failures > MAX_FAILURES or time.monotonic() > deadline:
                raise
            wait = 0.0 if committed is not None else delay(exc, failures)
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
        stats.resumed += 1
        before = offset
        session = client.call(client.media.GetUploadSession,
                              media_pb2.GetUploadSessionRequest(name=session.name))
        offset = session.committed_size
        if offset > before:
            failures = 0  # progress: the failure budget is for a session that gets nowhere

