"""Stable content hashes used as row ids and fingerprints."""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Whitespace-collapsed, stripped text: the form ids and dedupe keys hash."""
    return _WS.sub(" ", text).strip()


def sha256_hex(data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def prompt_id(prompt: str) -> str:
    """A stable id for a prompt: the hash of its normalised text (16 hex chars)."""
    return sha256_hex(normalize_text(prompt))[:16]


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(obj: Any) -> str:
    return sha256_hex(canonical_json(obj))[:20]


# -- content digests: what downstream stages are keyed by -------------------------------------

_MOD = 1 << 256


def _row_bytes(row: dict) -> bytes:
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=repr).encode("utf-8", "surrogatepass")


def row_hash_sum(table) -> str:
    """The sum (mod 2**256) of the sha256 of each row of a ``pyarrow.Table`` (its canonical
    JSON), as 64 hex digits. Order-independent and additive: a dataset's shards combine into
    one digest however its rows were cut into shards or ordered (``dataset_digest``)."""
    total = 0
    for batch in table.to_batches(max_chunksize=8192):
        for row in batch.to_pylist():
            total += int.from_bytes(hashlib.sha256(_row_bytes(row)).digest(), "big")
    return f"{total % _MOD:064x}"


def dataset_digest(manifest: dict) -> str:
    """A committed dataset's content digest, from its manifest alone (no data is read): its
    schema, row count and the shards' row-hash sums, so the same rows give the same digest
    whatever the shard boundaries, row order or Parquet encoding. A manifest written before
    shards carried row sums (``content``) is digested from its shard sha256s instead."""
    schema = list((manifest.get("schema") or {}).items())
    shards = manifest.get("shards") or []
    if all(s.get("content") for s in shards):
        total = sum(int(s["content"], 16) for s in shards) % _MOD
        return "d" + fingerprint({"schema": schema, "rows": manifest.get("rows"), "sum": f"{total:064x}"})[1:]
    return "s" + fingerprint({"schema": schema, "shards": [s.get("sha256") for s in shards]})[1:]


def model_digest(manifest: dict) -> str:
    """A committed model's digest: its files' paths and sha256s (from the manifest)."""
    files = sorted((f["path"], f["sha256"]) for f in manifest.get("files") or [])
    return "m" + fingerprint(files)[1:]
