"""Inspecting committed datasets from their manifests and Parquet metadata.

Nothing here downloads a dataset whole: listings come from manifests, schemas and
row counts from manifests, column statistics from the few columns asked for.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow.parquet as pq

from .storage import DATASET_FORMAT, MANIFEST, Storage, StorageError


def find_datasets(storage: Storage, path: str) -> list[dict]:
    """Every committed dataset under ``path``: one summary per manifest."""
    out = []
    for mpath in sorted(storage.fs.glob(f"{path.rstrip('/')}/**/{MANIFEST}")):
        try:
            m = storage.read_json(mpath)
        except (FileNotFoundError, ValueError):
            continue
        if m.get("format") != DATASET_FORMAT:
            continue
        ds_path = mpath.rsplit("/", 1)[0]
        out.append(summary(storage, ds_path, m))
    out.sort(key=lambda d: (d["created"] or "", d["name"]))
    return out


def summary(storage: Storage, path: str, m: dict) -> dict:
    lin = m.get("lineage") or {}
    name = f"{lin['stage']}.{lin['output']}" if lin.get("stage") and lin.get("output") else path.rsplit("/", 1)[-1]
    return {
        "name": name,
        "version": (lin.get("fingerprint") or "")[:12] or None,
        "rows": m["rows"],
        "bytes": m["bytes"],
        "shards": len(m["shards"]),
        "created": m.get("created"),
        "run": lin.get("run_id"),
        "uri": storage.uri(path),
    }


def _columns(storage: Storage, path: str, m: dict, wanted: tuple[str, ...]) -> dict[str, list]:
    """The wanted columns that exist, read in one pass over the manifest's shards."""
    names = [c for c in wanted if c in m["schema"]]
    if not names:
        return {}
    table = storage.read_dataset(path, columns=names)
    return {c: table.column(c).to_pylist() for c in names}


def histogram(values: list[int], bins: int = 10) -> list[dict]:
    values = [v for v in values if v is not None]
    if not values:
        return []
    lo, hi = min(values), max(values)
    width = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((v - lo) // width for v in values)
    return [{"from": lo + i * width, "to": lo + (i + 1) * width - 1, "count": counts.get(i, 0)}
            for i in range(-(-(hi - lo + 1) // width))]


def show(storage: Storage, path: str) -> dict:
    m = storage.dataset_manifest(path)
    info: dict[str, Any] = {
        **summary(storage, path, m),
        "schema": m["schema"],
        "lineage": m.get("lineage") or {},
        "shards": m["shards"],
    }
    cols = _columns(storage, path, m, ("reason", "verdict", "source", "completion_tokens", "prompt_id"))
    for col, key in (("verdict", "verdicts"), ("reason", "reasons"), ("source", "sources")):
        if col in cols:
            info[key] = dict(Counter(cols[col]).most_common())
    if "completion_tokens" in cols:
        info["completion_tokens_histogram"] = histogram(cols["completion_tokens"])
    if "prompt_id" in cols:
        info["prompts"] = len(set(cols["prompt_id"]))
    return info


def _stats(values: list) -> dict:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return {"count": 0}
    pick = lambda q: vals[min(len(vals) - 1, int(q * len(vals)))]  # noqa: E731
    return {"count": len(vals), "mean": sum(vals) / len(vals), "p50": pick(0.5), "p90": pick(0.9), "max": vals[-1]}


def _profile(storage: Storage, path: str) -> dict:
    m = storage.dataset_manifest(path)
    prof: dict[str, Any] = {"rows": m["rows"], "version": (m.get("lineage") or {}).get("fingerprint")}
    cols = _columns(storage, path, m, ("prompt_id", "completion_tokens", "verdict")
                    + (() if "completion_tokens" in m["schema"] else ("messages",)))
    ids = cols.get("prompt_id", [])
    prof["prompt_ids"] = set(ids)
    if "completion_tokens" in cols:
        prof["lengths"] = cols["completion_tokens"]
    elif "messages" in cols:
        prof["lengths"] = [len(msgs[-1]["content"]) if msgs else 0 for msgs in cols["messages"]]
    if "verdict" in cols and ids:
        per: dict[str, list[int]] = {}
        for pid, v in zip(ids, cols["verdict"]):
            c = per.setdefault(pid, [0, 0])
            c[0] += v == "correct"
            c[1] += 1
        prof["pass_rates"] = [c / n for c, n in per.values()]
    return prof


def diff(a: tuple[Storage, str], b: tuple[Storage, str]) -> dict:
    """What changed from dataset A to dataset B: rows, prompt ids, length and pass-rate distributions."""
    pa_, pb = _profile(*a), _profile(*b)
    out: dict[str, Any] = {
        "rows": {"a": pa_["rows"], "b": pb["rows"], "delta": pb["rows"] - pa_["rows"]},
        "versions": {"a": pa_["version"], "b": pb["version"]},
        "prompts": {"a": len(pa_["prompt_ids"]), "b": len(pb["prompt_ids"]),
                    "added": sorted(pb["prompt_ids"] - pa_["prompt_ids"]),
                    "removed": sorted(pa_["prompt_ids"] - pb["prompt_ids"])},
    }
    for key, label in (("lengths", "length"), ("pass_rates", "pass_rate")):
        if key in pa_ or key in pb:
            sa, sb = _stats(pa_.get(key, [])), _stats(pb.get(key, []))
            out[label] = {"a": sa, "b": sb}
            if sa.get("count") and sb.get("count"):
                out[label]["mean_shift"] = sb["mean"] - sa["mean"]
    return out


def head(storage: Storage, path: str, n: int = 5) -> list[dict]:
    m = storage.dataset_manifest(path)
    rows: list[dict] = []
    for shard in m["shards"]:
        if len(rows) >= n:
            break
        with storage.fs.open(f"{path}/{shard['path']}", "rb") as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=max(1, n - len(rows))):
                rows.extend(batch.to_pylist()[: n - len(rows)])
                if len(rows) >= n:
                    break
    return rows


def resolve(uri: str) -> tuple[Storage, str]:
    """A Storage rooted at ``uri`` and the dataset path inside it. A ``latest/...`` pointer
    file resolves to the version it names."""
    st = Storage(uri)
    if not st.exists(st.root):
        raise StorageError(f"nothing at {uri}")
    if st.fs.isfile(st.root):
        try:
            target = st.read_json(st.root)["uri"]
        except (ValueError, KeyError, TypeError) as e:
            raise StorageError(f"{uri} is neither a dataset folder nor a latest pointer") from e
        st = Storage(target)
    return st, st.root
