"""Storage on fsspec: a local folder or ``s3://bucket/prefix`` (through s3fs).

This module reads and writes objects; where they go under the root (cache, attempts,
checkpoints, runs, ``latest`` pointers, models) is ``pipeline.store.layout``'s business.

Artifacts are committed by a manifest written last with an exclusive create
(``If-None-Match: *`` on S3, ``link()`` locally). Readers trust only what a
committed manifest lists. A writer killed part-way leaves nothing a reader sees:
locally a ``.tmp-*`` file, on S3 at most an uncompleted multipart upload (objects
of ``2 * part_size`` bytes or more go up in parts), both removed by ``gc``. Credentials and endpoints come from the standard AWS
environment/config and are never written anywhere by this module.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.ids import row_hash_sum
from pipeline.store.conditional import ConditionFailed, conditional_store, s3_error_code  # noqa: F401

MANIFEST = "_manifest.json"
STAGE_RECORD = "_stage.json"  # a stage attempt's record, written last by the runner
DATASET_FORMAT = "distill.dataset/1"
MODEL_FORMAT = "distill.model/1"
DEFAULT_PART_SIZE = 50 * 2**20  # s3fs's default; S3 wants at least 5 MiB per part but the last


class StorageError(RuntimeError):
    pass


class AlreadyCommitted(StorageError, FileExistsError, ConditionFailed):
    """Another writer committed this artifact first."""


def redact_uri(uri: str) -> str:
    """Drop any user:password@ part of a URI so it can be logged or stored."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return uri


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Storage:
    """A root folder on any fsspec filesystem."""

    def __init__(self, root: str, storage_options: dict | None = None, part_size: int | None = None):
        self.root_uri = root.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.root_uri, **(storage_options or {}))
        self.is_local = self.fs.protocol in ("file", "local") or "file" in getattr(self.fs, "protocol", ())
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.is_s3 = "s3" in protocols
        # objects of 2 * part_size bytes or more are uploaded as multipart uploads of this part size
        self.part_size = int(part_size or os.environ.get("DISTILL_S3_PART_SIZE") or DEFAULT_PART_SIZE)

    def __reduce__(self):  # ship to Ray workers as a plain root; credentials stay in the environment
        return (Storage, (self.root_uri, None, self.part_size))

    # -- paths -------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def uri(self, path: str) -> str:
        """A full URI for a path of this filesystem (what users and readers see)."""
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def strip(self, uri: str) -> str:
        return self.fs._strip_protocol(uri)

    def locate(self, uri: str) -> tuple["Storage", str]:
        """Where an artifact's URI lives, as (storage, path): on this storage's filesystem when the
        protocol matches, else on a storage of its own."""
        protocol = fsspec.utils.get_protocol(uri)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        if protocol in protocols:
            return self, self.strip(uri)
        other = Storage(uri)
        return other, other.root

    # -- small files -------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def read_json(self, path: str) -> Any:
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))

    def write_json(self, path: str, obj: Any, exclusive: bool = False) -> None:
        data = json.dumps(obj, indent=2, default=str).encode()
        self.put_bytes(path, data, exclusive=exclusive)

    def put_bytes(self, path: str, data: bytes, exclusive: bool = False) -> None:
        """Write a whole object at once. ``exclusive`` makes it a conditional create
        (:mod:`pipeline.store.conditional`), which raises :class:`AlreadyCommitted` if it exists."""
        if exclusive:
            try:
                conditional_store(self).create(path, data)
            except ConditionFailed as e:
                raise AlreadyCommitted(f"{self.uri(path)} was already committed") from e
            return
        if self.is_local:
            parent = path.rsplit("/", 1)[0]
            os.makedirs(parent, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return
        self.fs.pipe_file(path, data, **({"chunksize": self.part_size} if self.is_s3 else {}))

    def ls(self, path: str) -> list[str]:
        try:
            return sorted(self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    # -- datasets ----------------------------------------------------------
    def dataset_writer(self, path: str, lineage: dict | None = None, rows_per_shard: int = 50_000) -> DatasetWriter:
        return DatasetWriter(self, path, lineage or {}, rows_per_shard)

    def dataset_manifest(self, path: str) -> dict:
        mpath = f"{path.rstrip('/')}/{MANIFEST}"
        try:
            manifest = self.read_json(mpath)
        except FileNotFoundError as e:
            raise StorageError(f"no committed dataset at {self.uri(path)} (missing {MANIFEST})") from e
        if manifest.get("format") != DATASET_FORMAT:
            raise StorageError(f"{self.uri(mpath)} is not a distill dataset manifest")
        return manifest

    def dataset_files(self, path: str) -> list[str]:
        """Full URIs of the shards a committed manifest lists, in order: what to hand to
        ``pyarrow.dataset``, ``datasets.load_dataset("parquet", data_files=...)`` or
        ``polars.scan_parquet`` so they read exactly the committed rows (never a folder glob,
        which would also pick up shards of failed writers)."""
        manifest = self.dataset_manifest(path)
        return [self.uri(f"{path.rstrip('/')}/{s['path']}") for s in manifest["shards"]]

    def read_dataset(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """The whole committed dataset as one table: for small inputs (eval sets, prompt lists).
        Stages read large inputs as a stream (``iter_dataset``) or in pieces on workers
        (``pipeline.core.streaming``)."""
        manifest = self.dataset_manifest(path)
        schema = manifest_schema(manifest)
        tables = []
        for shard in manifest["shards"]:
            with self.fs.open(f"{path.rstrip('/')}/{shard['path']}", "rb") as f:
                tables.append(pq.read_table(f, columns=columns))
        if not tables:
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        return pa.concat_tables(tables)

    def iter_dataset(self, path: str, columns: list[str] | None = None,
                     batch_rows: int = 8192) -> Iterable[pa.Table]:
        """The committed rows in order, ``batch_rows`` at a time, one row group in memory at once."""
        manifest = self.dataset_manifest(path)
        for shard in manifest["shards"]:
            with self.fs.open(f"{path.rstrip('/')}/{shard['path']}", "rb") as f:
                pf = pq.ParquetFile(f)
                for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                    yield pa.Table.from_batches([batch])

    def commit_shards(self, path: str, shards: list[dict], schema: pa.Schema, lineage: dict | None = None,
                      stats: dict | None = None) -> dict:
        """Publish shards that workers wrote under ``path`` (each ``{path, rows, bytes, sha256}``,
        in dataset order): the manifest, written last with an exclusive create."""
        manifest = {
            "format": DATASET_FORMAT,
            "rows": sum(s["rows"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "shards": list(shards),
            "schema": {f.name: str(f.type) for f in schema},
            "arrow_schema": schema.serialize().to_pybytes().hex(),
            "lineage": lineage or {},
            "created": now_iso(),
        }
        if stats:
            manifest["stats"] = stats
        self.write_json(f"{path.rstrip('/')}/{MANIFEST}", manifest, exclusive=True)
        return manifest

    # -- model / file-tree artifacts --------------------------------------
    def put_tree(self, local_dir: str | Path, path: str, lineage: dict | None = None) -> dict:
        """Upload a local folder as an artifact; the manifest listing its files is written last."""
        local_dir = Path(local_dir)
        files = []
        for p in sorted(local_dir.rglob("*")):
            if p.is_file():
                rel = p.relative_to(local_dir).as_posix()
                data = p.read_bytes()
                self.put_bytes(f"{path}/{rel}", data)
                files.append({"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        manifest = {"format": MODEL_FORMAT, "files": files, "lineage": lineage or {}, "created": now_iso()}
        self.write_json(f"{path}/{MANIFEST}", manifest, exclusive=True)
        return manifest

    def tree_manifest(self, path: str) -> dict:
        try:
            manifest = self.read_json(f"{path.rstrip('/')}/{MANIFEST}")
        except FileNotFoundError as e:
            raise StorageError(f"no committed model at {self.uri(path)} (missing {MANIFEST})") from e
        return manifest

    def localize_tree(self, path: str, cache_dir: str | None = None) -> str:
        """A local folder holding the artifact: the folder itself when storage is local."""
        manifest = self.tree_manifest(path)
        if self.is_local:
            return path
        digest = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()[:20]
        base = Path(cache_dir or os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill")) / "models"
        target = base / digest
        if (target / MANIFEST).exists():
            return str(target)
        tmp = base / f".{digest}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True, exist_ok=True)
        for f in manifest["files"]:
            dest = tmp / f["path"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open(f"{path}/{f['path']}", "rb") as src:
                dest.write_bytes(src.read())
        (tmp / MANIFEST).write_text(json.dumps(manifest))
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; theirs is identical
            pass
        return str(target)


@dataclass
class ShardInfo:
    path: str
    rows: int
    bytes: int
    sha256: str
    # sum of the rows' sha256 (``ids.row_hash_sum``): shards combine into the dataset's content digest
    content: str = ""


def manifest_schema(manifest: dict) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(manifest["arrow_schema"])))


# A shard is cut at ``rows_per_shard`` rows or about this many bytes of Arrow data, whichever
# comes first, and written in row groups of about ROW_GROUP_BYTES: the unit a streaming reader
# holds in memory and ``pipeline.core.streaming`` hands to one task.
SHARD_BYTES = 128 * 2**20
ROW_GROUP_BYTES = 16 * 2**20


class DatasetWriter:
    """Writes uniquely named Parquet shards, then the manifest (exclusive create) last.

    ``prefix`` names the shards (``<prefix>-NNNNN-<token>.parquet``): workers writing pieces of
    one dataset use distinct prefixes and hand their shard list (``finish``) to the driver,
    which commits them all (``Storage.commit_shards``)."""

    def __init__(self, storage: Storage, path: str, lineage: dict, rows_per_shard: int, prefix: str = "part",
                 shard_bytes: int = SHARD_BYTES):
        self.storage, self.path, self.lineage = storage, path.rstrip("/"), lineage
        self.rows_per_shard = rows_per_shard
        self.shard_bytes = shard_bytes
        self.prefix = prefix
        self.schema: pa.Schema | None = None
        self.shards: list[ShardInfo] = []
        self._uploads: list = []  # futures of ShardInfo, in shard order
        self._pool: ThreadPoolExecutor | None = None  # uploads, in shard order
        self._hasher: ThreadPoolExecutor | None = None  # row-hash sums, beside the encoding
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._pending_bytes = 0
        self._token = uuid.uuid4().hex[:8]
        self.committed = False

    def write(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = table.schema
        elif table.schema != self.schema:
            try:
                table = table.cast(self.schema)
            except (pa.ArrowInvalid, ValueError) as e:
                raise StorageError(f"schema mismatch writing {self.path}: {e}") from e
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self._pending_bytes += table.nbytes
        while self._pending_rows >= self.rows_per_shard or self._pending_bytes >= self.shard_bytes:
            merged = pa.concat_tables(self._pending)
            per_row = max(1, merged.nbytes // max(1, merged.num_rows))
            cut = max(1, min(self.rows_per_shard, self.shard_bytes // per_row, merged.num_rows))
            self._flush(merged.slice(0, cut))
            rest = merged.slice(cut)
            self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
            self._pending_bytes = rest.nbytes if rest.num_rows else 0

    def write_many(self, tables: Iterable[pa.Table]) -> None:
        for t in tables:
            self.write(t)

    def _flush(self, table: pa.Table) -> None:
        """Encode a shard here and upload it (and checksum it) on a background thread, so the
        next shard is encoded while this one is written; at most two shards wait in memory."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-upload")
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="shard-hash")
        # the rows' content sum, on its own thread beside this shard's encoding (both release the GIL)
        content = self._hasher.submit(row_hash_sum, table)
        sink = pa.BufferOutputStream()
        per_row = max(1, table.nbytes // max(1, table.num_rows))
        pq.write_table(table, sink, compression="zstd", row_group_size=max(1, min(table.num_rows or 1,
                                                                                 ROW_GROUP_BYTES // per_row)))
        data = sink.getvalue()
        name = f"{self.prefix}-{len(self._uploads):05d}-{self._token}.parquet"
        while sum(not f.done() for f in self._uploads) >= 2:
            next(f for f in self._uploads if not f.done()).result()
        self._uploads.append(self._pool.submit(self._upload, name, table.num_rows, data, content))

    def _upload(self, name: str, rows: int, data: pa.Buffer, content) -> ShardInfo:
        view = memoryview(data)
        self.storage.put_bytes(f"{self.path}/{name}", view if self.storage.is_local else data.to_pybytes())
        return ShardInfo(name, rows, len(view), hashlib.sha256(view).hexdigest(), content.result())

    def finish(self, schema: pa.Schema | None = None) -> list[dict]:
        """Write what is pending and wait for every upload, publishing nothing: the shard list
        (``{path, rows, bytes, sha256}``, in order) for whoever commits the dataset. With no
        rows written, ``schema`` (if given) makes one empty shard that carries it for readers."""
        if schema is not None and not self._uploads and not self._pending:
            self._flush(schema.empty_table())
        if self._pending:
            self._flush(pa.concat_tables(self._pending))
            self._pending, self._pending_rows, self._pending_bytes = [], 0, 0
        self._finish_uploads()
        return [dict(s.__dict__) for s in self.shards]

    def close(self) -> None:
        """Wait for the shards already handed to the upload thread, publishing nothing (a
        writer given up before ``commit``); upload errors are raised."""
        self._finish_uploads()

    def _finish_uploads(self) -> None:
        try:
            self.shards = [f.result() for f in self._uploads]  # the first upload error is raised here
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._hasher.shutdown(wait=True)
                self._pool = self._hasher = None

    def commit(self, schema: pa.Schema | None = None, stats: dict | None = None) -> dict:
        """Publish the dataset: the manifest, written last with an exclusive create. ``stats``
        (e.g. rows removed per reason) is stored in the manifest as it is."""
        if self.committed:
            raise StorageError(f"{self.path} already committed by this writer")
        if self.schema is None:
            self.schema = schema
        if self.schema is None:
            raise StorageError(f"cannot commit {self.path}: no rows and no schema given")
        shards = self.finish(self.schema)  # an empty dataset still carries its schema for readers
        manifest = self.storage.commit_shards(self.path, shards, self.schema, self.lineage, stats)
        self.committed = True
        return manifest
