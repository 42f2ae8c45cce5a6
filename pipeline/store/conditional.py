"""Conditional writes: the one primitive under manifest commits, run leases and the pointers a
run publishes (``runs/_latest``, the promotion gate's ``best``).

Two operations, on a local folder or S3:

- **create-if-absent** (:meth:`create`): on S3 ``If-None-Match: *`` (s3fs
  ``pipe_file(mode="create")``); locally the bytes go to a temporary file, are fsynced, and are
  ``link()``-ed to the name, which fails if it exists. Either way a reader sees the whole object
  or nothing.
- **compare-and-swap** (:meth:`replace`): the write succeeds only if the object is still the
  version read before. On S3 ``If-Match: <ETag>`` (HTTP 412 when it changed). Locally the ETag
  is the SHA-256 of the bytes, and the swap is: take an exclusive ``flock`` on ``<path>.lock``,
  re-read and compare the digest, write a temporary file, fsync, ``os.replace`` it, unlock.
  ``flock`` is released by the kernel when a holder dies, so a crash never leaves it held.
  (Local storage is one machine's filesystem, or a network filesystem whose ``flock`` is
  coherent, as NFSv4's is.)

On S3 a 409 concurrent-write conflict is retried. A refused write raises
:class:`ConditionFailed`; :func:`swap` is the read-decide-write loop built on both.
"""
from __future__ import annotations

import email.utils
import errno
import fcntl
import hashlib
import os
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Callable


class ConditionFailed(Exception):
    """The conditional write failed: the object exists, or is not the version expected."""


class ConditionalWriteError(RuntimeError):
    """The store cannot do a conditional write, or kept refusing one; the message says which."""


def s3_error_code(e: BaseException) -> tuple[str | None, int | None]:
    """(S3 error code, HTTP status) of a botocore ``ClientError`` in ``e`` or what it wraps (s3fs
    re-raises them as ``OSError``), read from the client's fields, never from the message text."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        resp = getattr(e, "response", None)
        if isinstance(resp, dict) and "Error" in resp:
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return resp["Error"].get("Code"), int(status) if status else None
        e = e.__cause__ or e.__context__
    return None, None


def _fsynced_temp(folder: str, data: bytes) -> str:
    """A temporary file in ``folder`` holding ``data``, flushed to disk."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


class _Backend:
    def read(self, path: str) -> tuple[bytes, str] | None:
        """(bytes, ETag) of the object, or None when there is none."""
        got = self.read_aged(path)
        return None if got is None else got[:2]

    def read_aged(self, path: str) -> tuple[bytes, str, float, float] | None:
        """(bytes, ETag, seconds since it was written by the store's clock, that clock's resolution)."""
    def create(self, path: str, data: bytes) -> str: ...
    def replace(self, path: str, data: bytes, etag: str) -> str: ...


class _LocalBackend(_Backend):
    """``link()`` create and a ``flock``-guarded compare-and-swap (see the module docstring)."""

    @staticmethod
    def _etag(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    @contextmanager
    def _locked(self, path: str, mode: int):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, mode)
            yield fd
        finally:
            os.close(fd)  # releases the flock

    @staticmethod
    def _read_file(path: str) -> bytes | None:
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read_aged(self, path: str) -> tuple[bytes, str, float, float] | None:
        with self._locked(path, fcntl.LOCK_SH) as fd:
            try:
                with open(path, "rb") as f:
                    data = f.read()
                    written = os.fstat(f.fileno()).st_mtime
            except FileNotFoundError:
                return None
            try:
                os.utime(fd)  # the filesystem's own "now" (a network filesystem's server sets it)
            except OSError:  # not the owner of the lock file: read its clock through a scratch file
                with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), prefix=".clock-") as t:
                    store_now = os.fstat(t.fileno()).st_mtime
            else:
                store_now = os.fstat(fd).st_mtime
        return data, self._etag(data), max(0.0, store_now - written), 0.0

    def create(self, path: str, data: bytes) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = _fsynced_temp(os.path.dirname(path), data)
        try:
            os.link(tmp, path)
        except FileExistsError as e:
            raise ConditionFailed(f"{path} exists") from e
        finally:
            os.unlink(tmp)
        return self._etag(data)

    def replace(self, path: str, data: bytes, etag: str) -> str:
        with self._locked(path, fcntl.LOCK_EX):
            current = self._read_file(path)
            if current is None or self._etag(current) != etag:
                raise ConditionFailed(f"{path} changed")
            tmp = _fsynced_temp(os.path.dirname(path), data)
            try:
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return self._etag(data)


class _S3Backend(_Backend):
    """``If-None-Match: *`` and ``If-Match: <ETag>`` on S3 (or any S3 API that honours them)."""

    def __init__(self, fs, part_size: int | None = None):
        self.fs = fs
        self.part_size = part_size

    def read_aged(self, path: str) -> tuple[bytes, str, float, float] | None:
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(path)

        async def get():  # body, ETag and age from one GET, so they belong to the same version
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                body = await resp["Body"].read()
            finally:
                resp["Body"].close()
            headers = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            server_now = email.utils.parsedate_to_datetime(headers["date"]) if headers.get("date") else None
            if server_now is None or resp.get("LastModified") is None:
                raise ConditionalWriteError(f"{path}: the store sent no Date or Last-Modified; "
                                            "an object's age cannot be measured")
            age = (server_now - resp["LastModified"]).total_seconds()
            return body, resp["ETag"], max(0.0, age), 1.0  # both to the second

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def _put(self, path: str, data: bytes, **kwargs) -> str:
        if self.part_size:
            kwargs["chunksize"] = self.part_size
        for attempt in range(20):
            try:
                out = self.fs.pipe_file(path, data, **kwargs)
                return (out or {}).get("ETag", "")
            except FileExistsError as e:
                raise ConditionFailed(f"{path} exists") from e
            except Exception as e:  # s3fs's OSError, or botocore's ClientError: read by its code, not its text
                code, status = s3_error_code(e)
                if code == "PreconditionFailed" or status == 412:
                    raise ConditionFailed(f"{path}: precondition failed") from e
                if getattr(e, "errno", None) == errno.EBUSY or code in ("ConditionalRequestConflict", "OperationAborted") or status == 409:
                    time.sleep(0.05 * (attempt + 1))  # a concurrent write to the key: retry
                    continue
                raise
        raise ConditionalWriteError(f"{path}: S3 kept answering 409 (concurrent writes)")

    def create(self, path: str, data: bytes) -> str:
        return self._put(path, data, mode="create")

    def replace(self, path: str, data: bytes, etag: str) -> str:
        return self._put(path, data, IfMatch=etag)


class _OtherBackend(_Backend):
    """Another fsspec filesystem: create-if-absent as its ``pipe_file(mode="create")`` gives it;
    no compare-and-swap."""

    def __init__(self, fs, root_uri: str):
        self.fs, self.root_uri = fs, root_uri

    def create(self, path: str, data: bytes) -> str:
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError as e:
            raise ConditionFailed(f"{path} exists") from e
        return hashlib.sha256(data).hexdigest()

    def _unsupported(self):
        return ConditionalWriteError(f"compare-and-swap needs local or s3:// storage, not {self.root_uri}")

    def read_aged(self, path: str):
        raise self._unsupported()

    def replace(self, path: str, data: bytes, etag: str) -> str:
        raise self._unsupported()


def conditional_store(storage: Any) -> _Backend:
    """Conditional reads and writes (create-if-absent, replace-if-unchanged) on ``storage`` (a
    :class:`pipeline.store.storage.Storage`, which builds on this module)."""
    if storage.is_local:
        return _LocalBackend()
    if storage.is_s3:
        return _S3Backend(storage.fs, storage.part_size)
    return _OtherBackend(storage.fs, storage.root_uri)


def swap(storage: Any, path: str, update: Callable[[bytes | None], bytes | None], tries: int = 20) -> bool:
    """Read the object at ``path`` (None when absent), ask ``update`` for its new bytes, and write
    them conditionally on what was read; when another writer got in between, read and ask again.
    ``update`` returning None writes nothing. Returns whether it wrote."""
    backend = conditional_store(storage)
    for _ in range(tries):
        got = backend.read(path)
        new = update(None if got is None else got[0])
        if new is None:
            return False
        try:
            backend.create(path, new) if got is None else backend.replace(path, new, got[1])
            return True
        except ConditionFailed:
            continue  # someone wrote in between: look again
    raise ConditionalWriteError(f"{storage.uri(path)}: could not write after {tries} tries (concurrent writers)")
