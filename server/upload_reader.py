"""Turn a client-streaming upload into a file-like reader, validating as bytes arrive.

The reader pulls request messages lazily (gRPC flow control then throttles the client),
hashes on the fly and raises ``UploadRejected`` at the first violation. It checks size and
checksum when the stream ends, before it returns EOF, so the object store never commits a
bad file (multipart uploads are aborted when the reader raises).
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterator

MAX_CHUNK = 1024 * 1024


class UploadRejected(Exception):
    """Bad upload: the message is for the client (INVALID_ARGUMENT)."""


class ClientGone(Exception):
    """The client cancelled or the connection broke: the stream's end is not the file's end."""


class UploadReader:
    def __init__(self, requests: Iterator[Any], max_bytes: int, declared_size: int = 0,
                 declared_sha256: str = "", is_active: Callable[[], bool] | None = None) -> None:
        self._requests = requests
        self._is_active = is_active
        self.max_bytes = max_bytes
        self.declared_size = declared_size
        self.declared_sha256 = declared_sha256
        self.hasher = hashlib.sha256()
        self.received = 0
        self._buf = memoryview(b"")
        self._eof = False

    @property
    def sha256(self) -> str:
        return self.hasher.hexdigest()

    def _next_chunk(self) -> bytes | None:
        for req in self._requests:
            kind = req.WhichOneof("payload")
            if kind != "chunk":
                raise UploadRejected("only the first message may carry metadata; later messages carry chunks")
            data = req.chunk.data
            if len(data) > MAX_CHUNK:
                raise UploadRejected(f"chunk of {len(data)} bytes is over the 1 MiB ({MAX_CHUNK} bytes) limit")
            if req.chunk.write_offset and req.chunk.write_offset != self.received:
                raise UploadRejected(
                    f"write_offset {req.chunk.write_offset} does not match the {self.received} bytes received"
                )
            if not data:
                continue
            self.received += len(data)
            if self.received > self.max_bytes:
                raise UploadRejected(f"file is larger than the {self.max_bytes} byte upload limit")
            if self.declared_size and self.received > self.declared_size:
                raise UploadRejected(f"more data than the declared size_bytes={self.declared_size}")
            self.hasher.update(data)
            return data
        return None

    def _finish(self) -> None:
        # gRPC may end the request iterator quietly when the client cancels: only a live
        # call's end of stream is the end of the file.
        if self._is_active is not None and not self._is_active():
            raise ClientGone(f"the upload stream was cancelled after {self.received} bytes")
        if self.received == 0:
            raise UploadRejected("the file is empty: send at least one non-empty chunk")
        if self.declared_size and self.received != self.declared_size:
            raise UploadRejected(
                f"stream ended after {self.received} bytes but size_bytes declared {self.declared_size}"
            )
        if self.declared_sha256 and self.sha256 != self.declared_sha256:
            raise UploadRejected(
                f"sha256 mismatch: received data hashes to {self.sha256}, declared {self.declared_sha256}"
            )
        self._eof = True

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes; one copy at most (pieces are joined once), none for whole chunks."""
        if n is None or n < 0:
            n = 1 << 62
        pieces: list[bytes | memoryview] = []
        got = 0
        while got < n and not self._eof:
            if not self._buf:
                chunk = self._next_chunk()
                if chunk is None:
                    self._finish()
                    break
                self._buf = memoryview(chunk)
            take = self._buf[: n - got]
            pieces.append(take)
            got += len(take)
            self._buf = self._buf[len(take):]
        if len(pieces) == 1 and isinstance(pieces[0], memoryview) and len(pieces[0].obj) == got:
            return pieces[0].obj  # a whole chunk: no copy
        return b"".join(pieces)
