"""Garbage collection of a storage root: files no committed record references.

Where things live comes from ``pipeline.store.layout`` (the same functions the runner writes
through), so a changed layout cannot make gc delete live data.
Kept: everything a stage record (``_stage.json``) lists, the shards each committed
dataset manifest lists, committed checkpoint datasets (for resume), the checkpoints of a
training run whose stage has not finished (a rerun resumes from them), run manifests and
``latest`` pointers (gc looks only under ``cache/``).
Garbage: attempt folders of failed or killed attempts, shards no manifest lists,
and (on S3) multipart uploads that were never completed. Only what is older than
``older_than`` seconds is touched, so work in flight is safe.
"""
from __future__ import annotations

import datetime as dt
import time

from pipeline.store import layout
from pipeline.store.storage import MANIFEST, STAGE_RECORD, Storage


def _mtime(info: dict) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(key)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, dt.datetime):
            return v.timestamp()
    return None


def _referenced(st: Storage) -> set[str]:
    """Folders holding committed artifacts (dataset or file tree)."""
    keep: set[str] = set()
    for rec_path in st.fs.glob(layout.stage_record_glob(st)):
        rec = st.read_json(rec_path)
        keep.update(o["path"] for o in rec["outputs"].values())
    for m in st.fs.glob(layout.checkpoint_manifest_glob(st)):
        keep.add(m.rsplit("/", 1)[0])
    for snap in st.fs.glob(layout.train_run_glob(st)):
        run, record = layout.train_run_of(snap)
        if not st.exists(record):
            keep.add(run)  # training not finished: its checkpoints are what a rerun resumes from
    return {k.rstrip("/") for k in keep}


def collect(st: Storage, older_than: float) -> dict:
    """What ``gc`` would delete: files (path, bytes) and stale multipart uploads."""
    now = time.time()
    keep = _referenced(st)
    listed: dict[str, set[str]] = {}
    for folder in keep:
        try:
            m = st.read_json(f"{folder}/{MANIFEST}")
        except FileNotFoundError:
            continue
        if "shards" in m:
            listed[folder] = {s["path"] for s in m["shards"]} | {MANIFEST}
    files = []
    for path, info in st.fs.find(layout.cache_root(st), detail=True).items():
        if info.get("type") == "directory" or path.endswith(STAGE_RECORD):
            continue
        owner = next((k for k in keep if path.startswith(k + "/")), None)
        if owner is not None:
            rel = path[len(owner) + 1 :]
            if owner not in listed or rel in listed[owner] or "/" in rel:
                continue  # a file tree, a listed shard, or nested in a model folder
        mtime = _mtime(info)
        if mtime is not None and now - mtime < older_than:
            continue
        files.append({"path": st.uri(path), "bytes": int(info.get("size") or 0)})
    uploads = []
    if not st.is_local:
        bucket, _, prefix = st.root.partition("/")
        resp = st.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
        for u in resp.get("Uploads", []):
            started = u.get("Initiated")
            age = now - started.timestamp() if isinstance(started, dt.datetime) else older_than
            if age >= older_than:
                uploads.append({"key": u["Key"], "upload_id": u["UploadId"], "bucket": bucket})
    return {"files": sorted(files, key=lambda f: f["path"]), "bytes": sum(f["bytes"] for f in files),
            "multipart_uploads": uploads}


def run_gc(st: Storage, older_than: float = 24 * 3600, dry_run: bool = True) -> dict:
    found = collect(st, older_than)
    if not dry_run:
        for f in found["files"]:
            st.fs.rm_file(st.strip(f["path"]))
        for u in found["multipart_uploads"]:
            st.fs.call_s3("abort_multipart_upload", Bucket=u["bucket"], Key=u["key"], UploadId=u["upload_id"])
    return {**found, "dry_run": dry_run}
