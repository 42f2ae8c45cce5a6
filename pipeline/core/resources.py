"""External resources a stage reads (source files, model folders): existence checks,
cheap fingerprints for the cache, and local copies for engines that need a path.

A model reference is a local folder, a URI of a committed model artifact on any
fsspec filesystem (e.g. ``s3://bucket/runs/.../model``), or a Hugging Face Hub model
``hf://ORG/NAME@REVISION`` (``pipeline.sizing.hub``: pinned to its commit sha when checked).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fsspec

from pipeline.core.ids import fingerprint
from pipeline.sizing import hub
from pipeline.store.storage import MANIFEST, Storage

_SMALL = 4 * 2**20  # files up to this size are content-hashed


def _fs(uri: str):
    return fsspec.core.url_to_fs(uri)


def exists(uri: str) -> bool:
    try:
        fs, path = _fs(uri)
        return fs.exists(path)
    except Exception:  # a bad URI or missing credentials read as "not there"
        return False


def expand(uri: str) -> list[str]:
    """Files behind a path, a folder or a glob, as full URIs, sorted."""
    fs, path = _fs(uri)
    if fs.isdir(path):
        found = [p for p in fs.find(path) if not p.rsplit("/", 1)[-1].startswith((".", "_"))]
    elif any(c in path for c in "*?["):
        found = fs.glob(path)
    else:
        found = [path] if fs.exists(path) else []
    return sorted(fs.unstrip_protocol(p) if not _is_local(fs) else p for p in found)


def _is_local(fs) -> bool:
    protos = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protos or "local" in protos


def file_fingerprint(uri: str) -> str:
    """Content hash for small files, otherwise size + modification stamp (or ETag)."""
    fs, path = _fs(uri)
    info = fs.info(path)
    size = info.get("size") or 0
    if size <= _SMALL:
        with fs.open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:20]
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return fingerprint({"size": size, "stamp": str(stamp)})


def model_fingerprint(uri: str) -> str:
    """A committed artifact's manifest, or names + sizes + small-file contents of a plain folder
    (a hub model: its repo and commit sha)."""
    if hub.is_hub(uri):
        return hub.fingerprint(uri)
    fs, path = _fs(uri)
    mpath = f"{path.rstrip('/')}/{MANIFEST}"
    if fs.exists(mpath):
        with fs.open(mpath, "rb") as f:
            return fingerprint(json.loads(f.read())["files"])
    items = []
    for p in sorted(fs.find(path)):
        info = fs.info(p)
        rel = p[len(path.rstrip("/")) + 1 :]
        digest = None
        if (info.get("size") or 0) <= _SMALL:
            with fs.open(p, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        items.append((rel, info.get("size"), digest))
    return fingerprint(items)


def check_model(uri: str) -> str | None:
    """None if ``uri`` looks like a loadable model folder, else a message."""
    if hub.is_hub(uri):
        try:
            hub.resolve(uri)
        except hub.HubError as e:
            return str(e)
        return None
    if not exists(uri):
        return f"model path not found: {uri}"
    fs, path = _fs(uri)
    if not fs.exists(f"{path.rstrip('/')}/config.json"):
        return f"not a model folder (no config.json): {uri}"
    return None


def model_params_problems(params, fields: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(field, message)`` for each model path param that is set but not a loadable model.
    A hub reference that resolves is pinned in place to ``hf://ORG/NAME@<commit sha>``, so the
    fingerprint is the sha and the run loads the snapshot the plan saw."""
    out = []
    for f in fields:
        uri = getattr(params, f)
        if hub.is_hub(uri):
            try:
                setattr(params, f, hub.pin(uri))
            except hub.HubError as e:
                out.append((f, str(e)))
        elif uri is not None and (msg := check_model(uri)):
            out.append((f, msg))
    return out


def model_params_fingerprint(params, fields: tuple[str, ...]) -> dict:
    return {f: model_fingerprint(getattr(params, f)) for f in fields if getattr(params, f)}


def localize_model(uri: str) -> str:
    """A local folder with the model's files (downloaded once for remote URIs and hub models)."""
    if hub.is_hub(uri):
        return hub.local_snapshot(uri)
    fs, path = _fs(uri)
    if _is_local(fs):
        return str(Path(path))
    st = Storage(uri)
    return st.localize_tree(st.root)
