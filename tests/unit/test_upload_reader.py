"""server/upload_reader.py's UploadReader: a client stream of chunks as a file-like reader that
validates while bytes arrive (size, declared size, sha256, offsets, chunk limit, cancellation)."""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterator

import pytest

from mp4totext.v1 import media_pb2
from server.upload_reader import MAX_CHUNK, ClientGone, UploadReader, UploadRejected

MiB = 1024 * 1024


def chunk(data: bytes, write_offset: int = 0) -> media_pb2.UploadMediaRequest:
    return media_pb2.UploadMediaRequest(chunk=media_pb2.UploadChunk(data=data, write_offset=write_offset))


def chunks(data: bytes, size: int, offsets: bool = True) -> list[media_pb2.UploadMediaRequest]:
    """``data`` cut into messages of ``size`` bytes, with write_offset set (or left 0)."""
    return [chunk(data[off:off + size], off if offsets else 0) for off in range(0, len(data), size)]


class Counted:
    """An iterator over request messages that counts how many were pulled."""

    def __init__(self, requests: list[media_pb2.UploadMediaRequest]) -> None:
        self.requests = requests
        self.pulled = 0

    def __iter__(self) -> Iterator[media_pb2.UploadMediaRequest]:
        for req in self.requests:
            self.pulled += 1
            yield req


def reader(requests: list[Any], max_bytes: int = 10 * MiB, declared_size: int = 0, declared_sha256: str = "",
           is_active: Callable[[], bool] | None = None) -> UploadReader:
    return UploadReader(iter(requests), max_bytes, declared_size, declared_sha256, is_active)


def drain(r: UploadReader, n: int = 64 * 1024) -> bytes:
    """Read like the object store does: fixed-size reads until EOF (b"")."""
    out = []
    while True:
        piece = r.read(n)
        if not piece:
            return b"".join(out)
        out.append(piece)


DATA = bytes(range(256)) * 1000  # 256000 bytes
SHA = hashlib.sha256(DATA).hexdigest()


# ---------------------------------------------------------------- accepted uploads


def test_happy_path_with_declared_size_and_sha256() -> None:
    r = reader(chunks(DATA, 64 * 1024), declared_size=len(DATA), declared_sha256=SHA, is_active=lambda: True)
    assert drain(r, 10_000) == DATA
    assert r.received == len(DATA) and r.sha256 == SHA
    assert r.read(100) == b"" and r.read() == b""  # EOF stays EOF


def test_nothing_declared_reads_everything_at_once() -> None:
    r = reader(chunks(DATA, 4096))
    assert r.read() == DATA
    assert r.read() == b"" and r.received == len(DATA) and r.sha256 == SHA


def test_read_none_and_negative_mean_everything() -> None:
    assert reader(chunks(DATA, 1000)).read(None) == DATA  # type: ignore[arg-type]
    assert reader(chunks(DATA, 1000)).read(-5) == DATA


def test_write_offset_zero_is_accepted_on_every_chunk() -> None:
    r = reader(chunks(DATA, 10_000, offsets=False), declared_size=len(DATA), declared_sha256=SHA)
    assert drain(r) == DATA


def test_empty_chunks_are_skipped() -> None:
    reqs = [chunk(b""), chunk(b"abc"), chunk(b"", 3), chunk(b"def", 3), chunk(b"")]
    r = reader(reqs, declared_size=6, declared_sha256=hashlib.sha256(b"abcdef").hexdigest())
    assert r.read() == b"abcdef"


def test_exactly_max_bytes_and_exactly_one_mib_chunk_are_accepted() -> None:
    data = b"x" * MAX_CHUNK
    assert MAX_CHUNK == MiB
    r = reader([chunk(data)], max_bytes=MAX_CHUNK, declared_size=MAX_CHUNK)
    assert r.read() == data and r.received == MAX_CHUNK


# ---------------------------------------------------------------- read(n) boundaries


def test_reads_across_chunk_boundaries() -> None:
    r = reader([chunk(b"abc"), chunk(b"defg", 3), chunk(b"h", 7), chunk(b"ijklmnop", 8)], declared_size=16)
    assert r.read(2) == b"ab"  # inside the first chunk
    assert r.read(2) == b"cd"  # the rest of one chunk and the start of the next
    assert r.read(5) == b"efghi"  # across three chunks
    assert r.read(0) == b""  # nothing asked, nothing read, not EOF
    assert r.read(7) == b"jklmnop"  # exactly the rest of the last chunk
    assert r.read(1) == b""  # then EOF
    assert r.received == 16


def test_whole_chunk_reads_and_sizes() -> None:
    parts = [b"a" * 100, b"b" * 100, b"c" * 50]
    r = reader([chunk(p) for p in parts])
    got = [r.read(100), r.read(100), r.read(100), r.read(100)]
    assert got == [b"a" * 100, b"b" * 100, b"c" * 50, b""]
    assert all(isinstance(g, bytes) for g in got)


def test_one_byte_reads() -> None:
    data = b"0123456789"
    r = reader([chunk(data[:3]), chunk(data[3:4], 3), chunk(data[4:], 4)], declared_size=10)
    assert [r.read(1) for _ in range(11)] == [bytes([b]) for b in data] + [b""]


def test_requests_are_pulled_lazily() -> None:
    """One message at a time, only when its bytes are needed (gRPC flow control then
    throttles the client)."""
    reqs = Counted(chunks(DATA, 1000))
    r = UploadReader(iter(reqs), 10 * MiB)
    assert reqs.pulled == 0
    assert r.read(10) == DATA[:10] and reqs.pulled == 1
    assert r.read(990) == DATA[10:1000] and reqs.pulled == 1
    assert r.read(1500) == DATA[1000:2500] and reqs.pulled == 3


# ---------------------------------------------------------------- rejected uploads


def test_over_the_upload_limit_is_rejected_at_once() -> None:
    reqs = Counted(chunks(b"y" * 5000, 1000))
    r = UploadReader(iter(reqs), 2500)
    with pytest.raises(UploadRejected, match="larger than the 2500 byte upload limit"):
        drain(r, 100)
    assert reqs.pulled == 3  # the first violation stops the upload: the rest is never pulled
    assert r.received == 3000


def test_more_data_than_declared_is_rejected_at_once() -> None:
    reqs = Counted(chunks(DATA, 1000))
    r = UploadReader(iter(reqs), 10 * MiB, declared_size=1500)
    with pytest.raises(UploadRejected, match="more data than the declared size_bytes=1500"):
        drain(r)
    assert reqs.pulled == 2


def test_short_stream_is_rejected_before_eof() -> None:
    r = reader(chunks(DATA, 1000), declared_size=len(DATA) + 1, declared_sha256=SHA)
    assert r.read(len(DATA)) == DATA  # the bytes come through...
    with pytest.raises(UploadRejected, match=f"stream ended after {len(DATA)} bytes but size_bytes declared "
                                             f"{len(DATA) + 1}"):
        r.read(1)  # ...but the end of the stream is an error, never EOF


def test_sha256_mismatch_is_rejected_before_eof() -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()
    r = reader(chunks(DATA, 1000), declared_size=len(DATA), declared_sha256=wrong)
    assert r.read(len(DATA)) == DATA
    with pytest.raises(UploadRejected, match=f"sha256 mismatch: received data hashes to {SHA}, declared {wrong}"):
        r.read(1)


def test_sha256_mismatch_when_reading_all_at_once() -> None:
    with pytest.raises(UploadRejected, match="sha256 mismatch"):
        reader(chunks(DATA, 1000), declared_sha256="0" * 64).read()


@pytest.mark.parametrize("offsets, bad, received", [
    ((5,), 5, 0),  # the first chunk claims to start later than 0
    ((0, 2), 2, 3),  # a gap
    ((0, 3, 3), 3, 6),  # a repeat (the offset of the chunk before)
    ((0, 3, 9), 9, 6),  # past the end
])
def test_bad_write_offset_is_rejected(offsets: tuple[int, ...], bad: int, received: int) -> None:
    reqs = [chunk(b"abc", off) for off in offsets]
    with pytest.raises(UploadRejected, match=f"write_offset {bad} does not match the {received} bytes received"):
        drain(reader(reqs))


def test_metadata_after_the_first_message_is_rejected() -> None:
    meta = media_pb2.UploadMediaRequest(metadata=media_pb2.UploadMetadata(filename="again.mp4", size_bytes=3))
    r = reader([chunk(b"abc"), meta, chunk(b"def", 3)])
    assert r.read(3) == b"abc"
    with pytest.raises(UploadRejected, match="only the first message may carry metadata"):
        r.read(3)


def test_metadata_as_the_readers_first_message_is_rejected() -> None:
    # The server consumes the metadata message itself: the reader sees chunks only.
    meta = media_pb2.UploadMediaRequest(metadata=media_pb2.UploadMetadata(filename="a.mp4"))
    with pytest.raises(UploadRejected, match="only the first message may carry metadata"):
        reader([meta, chunk(b"abc")]).read()


def test_a_message_with_no_payload_is_rejected() -> None:
    with pytest.raises(UploadRejected):
        reader([chunk(b"abc"), media_pb2.UploadMediaRequest()]).read()


def test_chunk_over_one_mib_is_rejected() -> None:
    big = b"z" * (MAX_CHUNK + 1)
    with pytest.raises(UploadRejected, match=f"chunk of {MAX_CHUNK + 1} bytes is over the 1 MiB"):
        reader([chunk(b"abc"), chunk(big, 3)], max_bytes=100 * MiB).read()


@pytest.mark.parametrize("requests", [[], [chunk(b"")], [chunk(b""), chunk(b"")]])
def test_empty_file_is_rejected(requests: list[Any]) -> None:
    r = reader(requests)
    with pytest.raises(UploadRejected, match="the file is empty"):
        r.read(10)
    assert r.received == 0


# ---------------------------------------------------------------- cancelled stream


def test_cancelled_stream_is_client_gone_not_eof() -> None:
    """gRPC may end the request iterator quietly when the client cancels: a call that is no
    longer active means the bytes so far are not the whole file."""
    r = reader(chunks(DATA, 1000), is_active=lambda: False)
    assert r.read(len(DATA)) == DATA
    with pytest.raises(ClientGone, match=f"cancelled after {len(DATA)} bytes"):
        r.read(1)


def test_cancellation_wins_over_size_and_sha_checks() -> None:
    r = reader(chunks(DATA[:5000], 1000), declared_size=len(DATA), declared_sha256=SHA, is_active=lambda: False)
    with pytest.raises(ClientGone):
        r.read()


def test_cancelled_before_any_byte_is_client_gone_not_empty() -> None:
    with pytest.raises(ClientGone, match="cancelled after 0 bytes"):
        reader([], is_active=lambda: False).read()
