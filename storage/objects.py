"""Object storage: a small interface with an S3 (minio client) and a local-disk backend.

Writers never leave half objects: S3 multipart uploads are aborted when the
source raises, local files are written under ``.incoming/`` and renamed into
place only when complete.

Resumable uploads (core.upload_sessions) write an object in numbered parts that
outlive the process: S3 multipart parts, or files under ``.parts/<upload id>/``
on the local store. ``complete_parts`` assembles them under the key, ``abort_parts``
discards them; ``abort_stale_uploads`` leaves the upload ids it is told to keep.
"""
from __future__ import annotations

import abc
import dataclasses
import datetime as dt
import functools
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Collection, Protocol

import urllib3
from minio import Minio
from minio.error import S3Error, ServerError

from storage.parts import LocalParts, S3Parts


class Reader(Protocol):
    def read(self, n: int = -1) -> bytes: ...


class StorageError(Exception):
    """The object store failed. ``transient``: it is unreachable or overloaded right now (wait and
    retry, core.failures); otherwise it refused this request. ``code`` names a refusal in S3's
    words, whichever backend raised it ("NoSuchUpload", "InvalidPart", "NoSuchKey")."""

    def __init__(self, message: str, transient: bool = True, code: str = "") -> None:
        super().__init__(message)
        self.transient = transient
        self.code = code


# S3 answers that mean "the service is struggling", not "your request is wrong".
_S3_TRANSIENT = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "ServerBusy"}


def _as_storage_error(exc: BaseException, what: str) -> StorageError | None:
    """The StorageError a backend error means (None: not the store's error, let it through)."""
    if isinstance(exc, S3Error):
        return StorageError(f"object storage refused {what}: {exc.code}: {exc.message}",
                            transient=exc.code in _S3_TRANSIENT, code=exc.code or "")
    if isinstance(exc, ServerError):
        return StorageError(f"object storage failed {what} (HTTP {exc.status_code}): {exc}")
    if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return StorageError(f"object storage unreachable during {what}: {exc}")
    return None


def is_outage(exc: BaseException) -> bool:
    """The object store is unreachable or overloaded (core.failures asks this): a StorageError that
    says so, or a backend error that has not been through ``_mapped`` yet."""
    if isinstance(exc, StorageError):
        return exc.transient
    mapped = _as_storage_error(exc, "a call")
    return mapped is not None and mapped.transient


def _mapped(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except StorageError:
            raise
        except Exception as exc:
            mapped = _as_storage_error(exc, method.__name__)
            if mapped is None:
                raise
            raise mapped from exc

    return wrapper


class ObjectStore(abc.ABC):
    min_part_size: int  # the smallest part of a resumable upload (but the last)
    max_parts: int  # the most parts one upload may have

    @abc.abstractmethod
    def put_stream(self, key: str, reader: Reader, content_type: str = "application/octet-stream") -> int:
        """Store everything ``reader`` yields under ``key``; return the byte count.

        If ``reader.read`` raises, nothing is left under ``key`` and the error propagates.
        """

    @abc.abstractmethod
    def put_file(self, key: str, path: str, content_type: str = "application/octet-stream") -> None: ...

    @abc.abstractmethod
    def get_file(self, key: str, path: str) -> None:
        """Download ``key`` to ``path`` (written completely or not at all)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise StorageError unless the store is usable."""

    def abort_stale_uploads(self, older_than: dt.timedelta, keep: Collection[str] = ()) -> int:
        """Abort/remove incomplete uploads older than ``older_than`` (except the upload ids in
        ``keep``: live resumable sessions); return how many."""
        return 0

    # -- parts of a resumable upload (they persist across processes until completed or aborted)
    @abc.abstractmethod
    def start_parts(self, key: str, content_type: str = "application/octet-stream") -> str:
        """Begin a multipart write of ``key``; return its upload id."""

    @abc.abstractmethod
    def put_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        """Store part ``number`` (1-based; all but the last at least ``min_part_size``); return its etag."""

    @abc.abstractmethod
    def complete_parts(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> None:
        """Assemble ``parts`` ((number, etag), in order) into ``key``. Completing an upload that
        was already completed (the object exists, the upload is gone) is not an error."""

    @abc.abstractmethod
    def abort_parts(self, key: str, upload_id: str) -> None:
        """Discard the parts of an unfinished upload (idempotent)."""

    @abc.abstractmethod
    def sha256_of(self, key: str) -> tuple[int, str]:
        """(size, lower-case hex sha256) of the stored object, read back from the store."""

    @abc.abstractmethod
    def size_of(self, key: str) -> int:
        """Size in bytes of the stored object."""

    def list_objects(self, prefix: str, start_after: str = "", limit: int = 1000) -> list[StoredObject]:
        """Up to ``limit`` objects under ``prefix`` in key order, after ``start_after`` (the
        retention sweep's scan for objects no row refers to)."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its objects")


class LocalStore(LocalParts, ObjectStore):
    def __init__(self, root: str) -> None:
        self.root = pathlib.Path(root).resolve()
        self.incoming = self.root / ".incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> pathlib.Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"object key escapes the store: {key!r}")
        return path

    def _commit(self, tmp: str, key: str) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)

    def put_stream(self, key: str, reader: Reader, content_type: str = "application/octet-stream") -> int:
        fd, tmp = tempfile.mkstemp(dir=self.incoming)
        total = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                while True:
                    chunk = reader.read(1024 * 1024)
                    if not chunk:
                        break
                    fh.write(chunk)
                    total += len(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            self._commit(tmp, key)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise
        return total

    def put_file(self, key: str, path: str, content_type: str = "application/octet-stream") -> None:
        fd, tmp = tempfile.mkstemp(dir=self.incoming)
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            self._commit(tmp, key)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise

    def get_file(self, key: str, path: str) -> None:
        src = self._path(key)
        if not src.exists():
            raise FileNotFoundError(f"object {key!r} not found")
        tmp = f"{path}.part"
        shutil.copyfile(src, tmp)
        os.replace(tmp, path)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list_objects(self, prefix: str, start_after: str = "", limit: int = 1000) -> list[StoredObject]:
        # Keys are paths under the root; dot-directories (.incoming, upload parts) hold no objects.
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                key = pathlib.Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix) and key > start_after:
                    keys.append(key)
        out = []
        for key in sorted(keys)[:limit]:
            try:
                mtime = (self.root / key).stat().st_mtime
            except FileNotFoundError:  # deleted while listing
                continue
            out.append(StoredObject(key, dt.datetime.fromtimestamp(mtime, dt.timezone.utc).replace(tzinfo=None)))
        return out

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"storage directory {self.root} is not writable")

    def abort_stale_uploads(self, older_than: dt.timedelta, keep: Collection[str] = ()) -> int:
        cutoff = dt.datetime.now().timestamp() - older_than.total_seconds()
        n = 0
        for p in self.incoming.iterdir():
            if p.stat().st_mtime < cutoff:
                p.unlink(missing_ok=True)
                n += 1
        for d in self.parts.iterdir() if self.parts.is_dir() else ():
            if d.name not in keep and d.stat().st_mtime < cutoff:
                shutil.rmtree(d, ignore_errors=True)
                n += 1
        return n


class S3Store(S3Parts, ObjectStore):
    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = False,
        region: str = "",
        part_size: int = 16 * 1024 * 1024,
        parallel_uploads: int = 3,
    ) -> None:
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=120),
            maxsize=32,
            retries=urllib3.Retry(total=3, backoff_factor=0.3, status_forcelist=[500, 502, 503, 504]),
        )
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure,
                            region=region or None, http_client=http)
        self.bucket = bucket
        self.part_size = max(part_size, 5 * 1024 * 1024)
        self.parallel_uploads = parallel_uploads
        self._bucket_ready = False

    def ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        try:
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)
        except Exception as exc:  # minio raises S3Error or urllib3 errors
            if "BucketAlreadyOwnedByYou" not in str(exc) and "BucketAlreadyExists" not in str(exc):
                raise StorageError(f"cannot use bucket {self.bucket!r}: {exc}") from exc
        self._bucket_ready = True

    def put_stream(self, key: str, reader: Reader, content_type: str = "application/octet-stream") -> int:
        self.ensure_bucket()
        counted = _CountingReader(reader)
        # length=-1: minio streams fixed-size parts (multipart for > part_size) and
        # aborts the multipart upload if reader.read raises.
        self.client.put_object(
            self.bucket,
            key,
            counted,  # type: ignore[arg-type]
            length=-1,
            part_size=self.part_size,
            content_type=content_type,
            num_parallel_uploads=self.parallel_uploads,
        )
        return counted.total

    def put_file(self, key: str, path: str, content_type: str = "application/octet-stream") -> None:
        self.ensure_bucket()
        self.client.fput_object(self.bucket, key, path, content_type=content_type, part_size=self.part_size)

    def get_file(self, key: str, path: str) -> None:
        try:
            # fget_object writes to a temporary file and renames it on success.
            self.client.fget_object(self.bucket, key, path)
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                raise FileNotFoundError(f"object {key!r} not found") from exc
            raise

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, key)

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, key)
            return True
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise

    def ping(self) -> None:
        try:
            self.ensure_bucket()
            self.client.bucket_exists(self.bucket)
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"object storage at {self.client._base_url.host} unusable: {exc}") from exc

    def abort_stale_uploads(self, older_than: dt.timedelta, keep: Collection[str] = ()) -> int:
        # minio-py keeps ListMultipartUploads private; this uses its documented-in-source helper.
        cutoff = dt.datetime.now(dt.timezone.utc) - older_than
        n = 0
        result = self.client._list_multipart_uploads(self.bucket)  # noqa: SLF001
        for upload in result.uploads:
            if upload.upload_id in keep:
                continue
            if upload.initiated_time and upload.initiated_time < cutoff:
                self.client._abort_multipart_upload(self.bucket, upload.object_name, upload.upload_id)  # noqa: SLF001
                n += 1
        return n

    def list_objects(self, prefix: str, start_after: str = "", limit: int = 1000) -> list[StoredObject]:
        self.ensure_bucket()
        out = []
        for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True,
                                            start_after=start_after or None):
            if obj.is_dir or obj.object_name is None or obj.last_modified is None:
                continue
            modified = obj.last_modified.astimezone(dt.timezone.utc).replace(tzinfo=None)
            out.append(StoredObject(obj.object_name, modified))
            if len(out) >= limit:
                break
        return out


# Every call of the S3 backend raises StorageError for the store's own failures (minio's S3Error,
# ServerError, urllib3's errors): nothing above storage/ knows minio.
for _name in ("put_stream", "put_file", "get_file", "delete", "exists", "abort_stale_uploads", "start_parts",
              "put_part", "complete_parts", "abort_parts", "sha256_of", "size_of", "list_objects"):
    setattr(S3Store, _name, _mapped(getattr(S3Store, _name)))


@dataclasses.dataclass(frozen=True)
class StoredObject:
    key: str
    modified: dt.datetime  # UTC, naive (as the database stores times)


class _CountingReader:
    def __init__(self, inner: Reader) -> None:
        self.inner = inner
        self.total = 0

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self.total += len(data)
        return data


def original_key(tenant: str, media_id: str) -> str:
    return f"media/{tenant}/{media_id}/original"


def audio_key(tenant: str, media_id: str) -> str:
    """Where media preparation writes the 16 kHz WAV (DeleteMedia removes it even before it exists)."""
    return f"media/{tenant}/{media_id}/audio.wav"


def make_store(settings) -> ObjectStore:  # type: ignore[no-untyped-def]
    if settings.storage_backend == "s3":
        return S3Store(**dataclasses.asdict(settings.s3))  # its section: MP4T_S3_*
    if settings.storage_backend == "local":
        return LocalStore(settings.resolved_storage_dir)
    raise SystemExit(
        f"configuration error: MP4T_STORAGE_BACKEND={settings.storage_backend!r}; use 'local' or 's3'"
    )


