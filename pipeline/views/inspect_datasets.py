"""Inspecting committed datasets from their manifests and Parquet metadata.

Nothing here downloads a dataset whole: listings come from manifests, schemas and
row counts from manifests, column statistics from the few columns asked for, the
funnel from the manifests of the dataset's ancestors (lineage ``parents``) and the
stage records (``_stage.json``) of the stages that wrote them.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import registry
from pipeline.core.stage import Passthrough
from pipeline.store import layout
from pipeline.store.storage import DATASET_FORMAT, MANIFEST, Storage, StorageError

MAX_ANCESTORS = 64


# -- rows a stage did not pass on: stats.dropped = {kind: {reason: count}} ----------------------

# Before the one protocol, stages counted under their own names: manifest stats and record metrics.
_OLD_STATS = {"quarantined": "quarantined", "removed": "removed", "errored": "errored"}
_OLD_METRICS = {"quarantine_reasons": "quarantined", "dropped_reasons": "removed", "error_reasons": "errored"}


def _counts(v) -> bool:
    return isinstance(v, dict) and all(isinstance(x, int) and not isinstance(x, bool) for x in v.values())


def read_dropped(stats: dict | None = None, record: dict | None = None) -> dict[str, dict[str, int]] | None:
    """The ``{kind: {reason: count}}`` of rows a stage did not pass on: the stage record's
    ``dropped``, else the manifest's ``stats.dropped``, else (manifests and records written
    before that key) translated from the old names. None when nothing says."""
    for source in (record, stats):
        if source and isinstance(source.get("dropped"), dict):
            return source["dropped"]
    out: dict[str, dict[str, int]] = {}

    def add(kind: str, reasons: dict) -> None:
        for reason, n in reasons.items():
            if n:
                out.setdefault(kind, {})[reason] = out.get(kind, {}).get(reason, 0) + n

    metrics = (record or {}).get("metrics") or {}
    if metrics:
        for key, kind in _OLD_METRICS.items():
            if _counts(metrics.get(key)):
                add(kind, metrics[key])
        if _counts(metrics.get("removed_by_eval_set")):  # decontaminate
            add("removed", {f"contaminated:{k}": n for k, n in metrics["removed_by_eval_set"].items()})
        if _counts(metrics.get("reasons")):  # verify: every verdict's reason, "ok" the accepted ones
            add("rejected", {k: n for k, n in metrics["reasons"].items() if k != "ok"})
    elif stats:
        for key, kind in _OLD_STATS.items():
            if _counts(stats.get(key)):
                add(kind, stats[key])
        if _counts(stats.get("reasons")):
            add("rejected", {k: n for k, n in stats["reasons"].items() if k != "ok"})
    if out or (record and metrics) or (stats and any(k in stats for k in (*_OLD_STATS, "reasons"))):
        return out
    return None


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


def _length_column(m: dict) -> tuple[str, str] | None:
    """(column, unit) a length histogram is built from: token counts if recorded, else characters."""
    if "completion_tokens" in m["schema"]:
        return "completion_tokens", "tokens"
    for col in ("completion", "messages", "prompt"):
        if col in m["schema"]:
            return col, "chars"
    return None


def _lengths(values: list, column: str) -> list[int]:
    """Lengths from a column's values: token counts as they are, text in characters, chat rows
    by their last turn (the completion)."""
    if column == "messages":
        return [len(msgs[-1]["content"] or "") if msgs else 0 for msgs in values]
    return [len(v) if isinstance(v, str) else v for v in values]


def show(storage: Storage, path: str) -> dict:
    m = storage.dataset_manifest(path)
    info: dict[str, Any] = {
        **summary(storage, path, m),
        "schema": m["schema"],
        "lineage": m.get("lineage") or {},
        "shards": m["shards"],
    }
    length = _length_column(m)
    wanted = ("reason", "verdict", "source", "prompt_id") + ((length[0],) if length else ())
    cols = _columns(storage, path, m, wanted)
    for col, key in (("verdict", "verdicts"), ("reason", "reasons"), ("source", "sources")):
        if col in cols:
            info[key] = dict(Counter(cols[col]).most_common())
    if length:
        column, unit = length
        info["length_histogram"] = {"column": column, "unit": unit, "bins": histogram(_lengths(cols[column], column))}
        if column == "completion_tokens":
            info["completion_tokens_histogram"] = info["length_histogram"]["bins"]
    if "prompt_id" in cols:
        info["prompts"] = len(set(cols["prompt_id"]))
    dropped = read_dropped(m.get("stats"))
    if dropped is not None:
        info["dropped"] = dropped  # by the stage that wrote it
    info["funnel"] = funnel(storage, path, m)
    return info


# -- the funnel: a dataset and its ancestors ---------------------------------------------

def _stage_record(storage: Storage, path: str, lineage: dict) -> dict | None:
    """The record of the stage attempt that wrote the dataset at ``path``
    (``layout.output_path``), if it names this very dataset."""
    if path.rstrip("/").count("/") < 2 or not lineage.get("fingerprint"):
        return None
    try:
        rec = storage.read_json(layout.record_for_output(path))
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    out = (rec.get("outputs") or {}).get(lineage.get("output") or "") or {}
    if rec.get("fingerprint") != lineage["fingerprint"] or out.get("path", "").rstrip("/") != path.rstrip("/"):
        return None  # another attempt of the same stage was the one committed
    return rec


def _step(storage: Storage, path: str, m: dict) -> dict:
    lin = m.get("lineage") or {}
    brief = {k: v for k, v in summary(storage, path, m).items() if k not in ("bytes", "shards", "created")}
    step: dict[str, Any] = {**brief, "stage": lin.get("stage"), "kind": lin.get("kind"), "output": lin.get("output")}
    rec = _stage_record(storage, path, lin)
    if rec is not None:
        step["outputs"] = dict(rec.get("rows") or {})  # every dataset the stage wrote, with its rows
        metrics = rec.get("metrics") or {}
        step["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    dropped = read_dropped(m.get("stats"), rec)
    if dropped is not None:
        step["dropped"] = dropped
    return step


def funnel(storage: Storage, path: str, m: dict) -> list[dict]:
    """The dataset and its ancestor datasets, oldest first: per step its rows (from its
    manifest) and, where the stage record is there, the rows of every output of that stage
    and its per-reason counts (quarantined, rejected, dropped, removed). Model parents are
    not rows and are left out; a parent that is gone appears with ``missing``."""
    nodes: dict[str, dict] = {}
    todo = [(storage, path, m)]
    while todo and len(nodes) < MAX_ANCESTORS:
        st, p, man = todo.pop(0)
        key = st.uri(p)
        if key in nodes:
            continue
        step = nodes[key] = {**_step(st, p, man), "parents": {}}
        for inp, parent in ((man.get("lineage") or {}).get("parents") or {}).items():
            uri = parent.get("uri") if isinstance(parent, dict) else None
            if not uri:
                continue
            try:
                pst, ppath = st.locate(uri)
                pman = pst.read_json(f"{ppath.rstrip('/')}/{MANIFEST}")
            except (FileNotFoundError, NotADirectoryError, ValueError, StorageError):
                step["parents"][inp] = uri
                nodes.setdefault(uri, {"uri": uri, "missing": True, "parents": {}})
                continue
            if pman.get("format") != DATASET_FORMAT:
                continue  # a model or other artifact, not part of the row funnel
            step["parents"][inp] = pst.uri(ppath)
            todo.append((pst, ppath, pman))
    # oldest first: order by the longest path down to the shown dataset
    depth = dict.fromkeys(nodes, 0)
    for _ in range(len(nodes)):
        changed = False
        for key, step in nodes.items():
            for parent in step["parents"].values():
                if parent in depth and depth[parent] < depth[key] + 1:
                    depth[parent], changed = depth[key] + 1, True
        if not changed:
            break
    return [nodes[k] for k in sorted(nodes, key=lambda k: -depth[k])]


def _stage_class(kind: str | None):
    """The registered Stage class of ``kind``, or None (an unknown or unimportable stage)."""
    try:
        return registry.load(kind) if kind else None
    except (KeyError, ImportError, AttributeError):
        return None


def main_input(step: dict) -> str | None:
    """The parent a funnel step's rows flow from: its stage's first declared dataset input that
    the step has (e.g. decontaminate's ``samples``, not its ``eval``); for a stage whose kind is
    not registered, its first parent."""
    parents = step.get("parents") or {}
    cls = _stage_class(step.get("kind"))
    declared = [k for k, t in cls.inputs.items() if t == "dataset"] if cls else list(parents)
    return next((k for k in declared if k in parents), None)


def main_line(steps: list[dict], uri: str) -> list[dict]:
    """From a :func:`funnel`, the steps the rows of the dataset at ``uri`` flowed through along
    each stage's main input, oldest first."""
    by_uri = {s["uri"]: s for s in steps}
    line, step = [], by_uri.get(uri)
    while step is not None and not step.get("missing") and step not in line:
        line.append(step)
        parent = main_input(step)
        step = by_uri.get(step["parents"][parent]) if parent else None
    return line[::-1]


def declared_columns(step: dict, steps: list[dict]) -> set[str] | None:
    """The columns the stage that wrote a funnel step declares for it (a ``Passthrough`` is its
    input's declared columns and the ones it adds); None when the stage's kind is not registered
    or declares none."""
    cls = _stage_class(step.get("kind"))
    declared = cls.output_columns.get(step.get("output")) if cls else None
    if isinstance(declared, Passthrough):
        by_uri = {s["uri"]: s for s in steps}
        parent = by_uri.get((step.get("parents") or {}).get(declared.input))
        base = declared_columns(parent, steps) if parent else None
        return None if base is None else base | set(declared.added.names)
    if isinstance(declared, pa.Schema):
        return set(declared.names)
    return set(declared) if isinstance(declared, dict) else None


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
    for column in ("completion_tokens", "messages"):
        if column in cols:
            prof["lengths"] = _lengths(cols[column], column)
            break
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
