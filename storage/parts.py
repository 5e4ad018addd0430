"""The parts of resumable uploads, for both object stores (mixed into storage.objects' classes).

S3: the multipart calls minio-py keeps private (its put_object drives them itself); parts
persist in the bucket until completed or aborted. Local: one file per part under
``<root>/.parts/<upload id>/``, written atomically, concatenated into the object at completion,
where each part's MD5 must be its recorded etag (as S3 refuses an InvalidPart).
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import tempfile
import uuid
from typing import Any

from minio.datatypes import Part
from minio.error import S3Error

_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")


class PartMismatch(ValueError):
    """A part file is not the part recorded for it (a stale stream overwrote it): S3's InvalidPart."""

    code = "InvalidPart"


class LocalParts:
    # No limit of its own: it keeps S3's, so embedded mode hands clients the part sizes production does.
    min_part_size = 5 * 1024 * 1024
    max_parts = 10_000
    root: pathlib.Path
    incoming: pathlib.Path
    _path: Any
    _commit: Any
    exists: Any

    @property
    def parts(self) -> pathlib.Path:
        return self.root / ".parts"

    def _parts_dir(self, upload_id: str) -> pathlib.Path:
        if not _UPLOAD_ID.match(upload_id):
            raise ValueError(f"not an upload id of this store: {upload_id!r}")
        return self.parts / upload_id

    def start_parts(self, key: str, content_type: str = "application/octet-stream") -> str:
        self._path(key)  # checked now, not at completion
        upload_id = uuid.uuid4().hex
        self._parts_dir(upload_id).mkdir(parents=True)
        return upload_id

    def put_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        folder = self._parts_dir(upload_id)
        if not folder.is_dir():
            raise FileNotFoundError(f"upload {upload_id} of {key!r} does not exist (aborted or completed)")
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, folder / f"{number:05d}")
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise
        return hashlib.md5(data, usedforsecurity=False).hexdigest()

    def complete_parts(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> None:
        folder = self._parts_dir(upload_id)
        if not folder.is_dir() and self.exists(key):
            return  # completed before
        fd, tmp = tempfile.mkstemp(dir=self.incoming)
        try:
            with os.fdopen(fd, "wb") as out:
                for number, etag in parts:  # like S3: each part must be the one whose etag was recorded
                    md5 = hashlib.md5(usedforsecurity=False)
                    with open(folder / f"{number:05d}", "rb") as part:
                        while chunk := part.read(4 * 1024 * 1024):
                            md5.update(chunk)
                            out.write(chunk)
                    if md5.hexdigest() != etag.strip('"'):
                        raise PartMismatch(f"part {number} has MD5 {md5.hexdigest()}, not the recorded etag {etag}")
                out.flush()
                os.fsync(out.fileno())
            self._commit(tmp, key)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise
        shutil.rmtree(folder, ignore_errors=True)

    def abort_parts(self, key: str, upload_id: str) -> None:
        shutil.rmtree(self._parts_dir(upload_id), ignore_errors=True)

    def sha256_of(self, key: str) -> tuple[int, str]:
        h, size = hashlib.sha256(), 0
        with open(self._path(key), "rb") as fh:
            while chunk := fh.read(4 * 1024 * 1024):
                h.update(chunk)
                size += len(chunk)
        return size, h.hexdigest()


    def size_of(self, key: str) -> int:
        return self._path(key).stat().st_size


class S3Parts:
    min_part_size = 5 * 1024 * 1024  # S3's smallest part (but the last)
    max_parts = 10_000  # S3's most parts of one upload
    client: Any
    bucket: str
    ensure_bucket: Any
    exists: Any

    # The multipart calls minio-py keeps private (put_object drives them itself).
    def start_parts(self, key: str, content_type: str = "application/octet-stream") -> str:
        self.ensure_bucket()
        return self.client._create_multipart_upload(self.bucket, key, {"Content-Type": content_type})  # noqa: SLF001

    def put_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        return self.client._upload_part(self.bucket, key, data, None, upload_id, number)  # noqa: SLF001

    def complete_parts(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> None:
        try:
            self.client._complete_multipart_upload(  # noqa: SLF001
                self.bucket, key, upload_id, [Part(number, etag) for number, etag in parts])
        except S3Error as exc:
            if exc.code == "NoSuchUpload" and self.exists(key):
                return  # completed before (by a process that died before recording it)
            raise

    def abort_parts(self, key: str, upload_id: str) -> None:
        try:
            self.client._abort_multipart_upload(self.bucket, key, upload_id)  # noqa: SLF001
        except S3Error as exc:
            if exc.code not in ("NoSuchUpload", "NoSuchKey"):
                raise

    def sha256_of(self, key: str) -> tuple[int, str]:
        h, size = hashlib.sha256(), 0
        resp = self.client.get_object(self.bucket, key)
        try:
            for chunk in resp.stream(4 * 1024 * 1024):
                h.update(chunk)
                size += len(chunk)
        finally:
            resp.close()
            resp.release_conn()
        return size, h.hexdigest()

    def size_of(self, key: str) -> int:
        return int(self.client.stat_object(self.bucket, key).size)
