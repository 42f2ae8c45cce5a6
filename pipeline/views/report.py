"""The run report: one self-contained HTML page (``report.html``) with its figures beside it.

Built only from what a run left committed, re-running nothing: the run manifest
(``layout.run_manifest``), the manifests of the datasets and models its stages wrote or read,
and a few columns of some datasets (the ``reason`` of rejected rows, for a few examples per
reason, and ``completion_tokens``, for the length histograms). Sections:

- **Summary**: pipeline, run id, config hash, start and end, total time, storage root, git commit.
- **DAG**: every stage with its status, seconds, rows in and out, fingerprint, drawn as a graph.
- **Funnel**: the chain of datasets that ends in the training data (prompts -> samples ->
  verdicts -> kept), each step's rows and its counts per reason (the drop protocol,
  ``dropped = {kind: {reason: n}}``), with a few examples per reason read from the datasets.
- **Lengths**: token-length histograms of kept and rejected traces, overlaid.
- **Evaluation**: pass@k and maj@k curves per role with error bars, the role table with
  standard errors, paired comparisons, accuracy against tokens (budget sweep) and the
  promotion decision, when the run has them. Both metric shapes are read: ``roles.<role>``
  and the older flat ``teacher`` / ``student``.
- **Training**: per training stage (``sft``, ``dpo``, ``grpo``), its loss curve and the
  trainer's other curves: GRPO's mean reward, each verification reason's share, completion
  length and truncation rate; DPO's reward margins and accuracies.
- **Performance**: stage timings and throughput (generated tokens/s, training tokens/s).
- **Lineage**: every dataset and model the run read and wrote, with URIs and versions.

Figures are drawn by matplotlib (Agg, PNG files in ``figures/``); the page loads nothing else,
from anywhere: no scripts, no fonts, no CDN. A section whose data the run lacks is left out;
a missing or corrupt manifest is a :class:`ReportError` naming the file.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from pipeline.store import layout
from pipeline.store.storage import Storage
from pipeline.views import inspect_datasets as inspect
from pipeline.views.inspect_datasets import read_dropped
from pipeline.views.runs import ReadError, RunArtifacts, load_run

REPORT_FILE = "report.html"
DATA_FILE = "report.json"
FIGURES = "figures"
EXAMPLES_PER_REASON = 3
EXAMPLE_CHARS = 400
MARKED = ("rejected", "errored")  # kinds of dropped rows a stage passes on, marked (not taken out)
TEXT_COLUMNS = ("prompt", "completion", "detail", "extracted", "raw", "eval_text", "ngram", "field", "eval_source",
                "row_number", "source")


ReportError = ReadError  # a run that cannot be reported: the read side's error


# -- sections --------------------------------------------------------------------------------

def _summary(run: RunArtifacts) -> dict:
    m = run.m
    return {k: m.get(k) for k in ("pipeline", "run_id", "status", "config_file", "config_hash", "started", "finished",
                                  "seconds", "storage_root", "git_commit")} | {"manifest": run.uri}


def _stage_rows_in(run: RunArtifacts, s: dict) -> int | None:
    total, any_ds = 0, False
    for ref in (s.get("inputs") or {}).values():
        ds = run.dataset(ref)
        if ds is not None:
            total += ds["manifest"]["rows"]
            any_ds = True
    return total if any_ds else None


def _dag(run: RunArtifacts) -> list[dict]:
    out = []
    for name in run.order:
        s = run.stages[name]
        out.append({"name": name, "kind": s.get("kind"), "status": s.get("status"), "seconds": s.get("seconds"),
                    "rows_in": _stage_rows_in(run, s), "rows_out": dict(s.get("rows") or {}),
                    "fingerprint": s.get("fingerprint"), "inputs": dict(s.get("inputs") or {}),
                    "produced_by_run": s.get("produced_by_run"), "error": s.get("error")})
    return out


def _evaluation_stage(s: dict) -> bool:
    metrics = s.get("metrics") or {}
    return s.get("kind") == "evaluate" or isinstance(metrics.get("roles"), dict)


def _funnel_target(run: RunArtifacts) -> str | None:
    """The dataset the run's last training stage trains on (the student's, in a run that also
    trains its teacher: an sft stage's ``data``), else the main output of the last stage that
    writes datasets and is not an evaluation."""
    for name in reversed(run.order):
        s = run.stages[name]
        ref = (s.get("inputs") or {}).get("data")
        if s.get("kind") == "sft" and ref and run.dataset(ref):
            return ref
    for name in reversed(run.order):
        s = run.stages[name]
        if _evaluation_stage(s):
            continue
        for out in s.get("output") or {}:
            if run.dataset(f"{name}.{out}"):
                return f"{name}.{out}"
    return None


def _chain(run: RunArtifacts, target: str) -> tuple[list[tuple[str, dict]], list[dict]]:
    """The funnel of ``target`` (:func:`inspect_datasets.funnel`, read from lineage) and its main
    line (:func:`inspect_datasets.main_line`) as (dataset ref, funnel step) pairs, oldest first,
    from the oldest dataset this run names."""
    a = run.artifacts[target]
    steps = inspect.funnel(a["storage"], a["path"], a["manifest"])
    refs = {art["storage"].uri(art["path"]): ref for ref, art in run.artifacts.items() if art["type"] == "dataset"}
    chain = []
    for step in reversed(inspect.main_line(steps, a["storage"].uri(a["path"]))):
        if step["uri"] not in refs:
            break
        chain.append((refs[step["uri"]], step))
    return chain[::-1], steps


def _traces(run: RunArtifacts, chain: list[tuple[str, dict]], steps: list[dict]) -> str | None:
    """The chain's dataset of traces: the last whose stage declares ``completion_tokens``,
    preferring one that also declares ``verdict`` (its manifest's schema, for a stage whose
    kind is not registered)."""
    found = None
    for ref, step in chain:
        cols = inspect.declared_columns(step, steps)
        if cols is None:
            cols = set(run.dataset(ref)["manifest"].get("schema") or {})
        if "completion_tokens" in cols and (found is None or "verdict" in cols):
            found = ref
    return found


def _examples(run: RunArtifacts, stage: str, texts: dict) -> dict[str, list[dict]]:
    """Up to EXAMPLES_PER_REASON rows per reason from the datasets the stage wrote: rows of a
    ``reason`` column (not ``ok``, not verdict ``correct``), else, in an output holding only
    dropped rows (e.g. decontaminate's ``contaminated``), rows with a value that names one of the
    stage's reasons (``contaminated:<eval_source>``)."""
    out: dict[str, list[dict]] = {}
    s = run.stages[stage]
    dropped = read_dropped(None, s) or {}
    known = {r for reasons in dropped.values() for r in reasons}
    for o in s.get("output") or {}:
        ref = f"{stage}.{o}"
        ds = run.dataset(ref)
        if ds is None or not ds["manifest"]["rows"]:
            continue
        schema = ds["manifest"].get("schema") or {}
        picks: dict[str, list[int]] = {}
        if "reason" in schema:
            reasons = run.read(ref, ["reason", "verdict"])
            rs = reasons.column("reason").to_pylist()
            vs = reasons.column("verdict").to_pylist() if "verdict" in schema else [None] * len(rs)
        elif known and ds["manifest"]["rows"] <= sum(sum(v.values()) for v in dropped.values()):
            cols = [c for c, t in schema.items() if t in ("string", "large_string") and c not in TEXT_COLUMNS[:3]]
            table = run.read(ref, cols)
            values = [table.column(c).to_pylist() for c in cols]
            rs = []
            for row in zip(*values):
                hit = [r for r in known for v in row if isinstance(v, str) and (r == v or r.endswith(":" + v))]
                rs.append(hit[0] if hit else None)
            vs = [None] * len(rs)
        else:
            continue
        for i, (r, v) in enumerate(zip(rs, vs)):
            if r in (None, "ok") or v == "correct":
                continue
            lst = picks.setdefault(r, [])
            if len(lst) < EXAMPLES_PER_REASON:
                lst.append(i)
        if not picks:
            continue
        table = run.read(ref, ["prompt_id", "sample_index", *TEXT_COLUMNS])
        idx = sorted(i for lst in picks.values() for i in lst)
        rows = dict(zip(idx, table.take(idx).to_pylist()))
        for reason, lst in picks.items():
            for i in lst:
                row = {k: v for k, v in rows[i].items() if v is not None}
                key = (row.get("prompt_id"), row.get("sample_index"))
                if "completion" not in row and key in texts:  # e.g. dedupe's dropped rows: keys only
                    row["completion"] = texts[key]
                row = {k: (v[:EXAMPLE_CHARS] + "…" if isinstance(v, str) and len(v) > EXAMPLE_CHARS else v)
                       for k, v in row.items()}
                out.setdefault(reason, []).append({"dataset": ref, "reason": reason, **row})
    return out


def _funnel_step(run: RunArtifacts, ref: str, rows_in: int | None, texts: dict) -> dict:
    """One step of the report's funnel: the dataset's rows, what its stage passed on, marked and
    dropped (by reason), and a few examples per reason."""
    stage, output = ref.rsplit(".", 1)
    s = run.stages[stage]
    ds = run.dataset(ref)
    dropped = read_dropped((ds["manifest"].get("stats") or {}), s) or {}
    rows = ds["manifest"]["rows"]
    marked = sum(n for kind in MARKED for n in (dropped.get(kind) or {}).values())
    return {
        "dataset": ref, "stage": stage, "kind": s.get("kind"), "status": s.get("status"), "rows": rows,
        "rows_in": _stage_rows_in(run, s) if rows_in is None else rows_in,  # the chain's dataset before it
        "passed": rows - marked if marked <= rows else rows,
        "marked": marked,
        "outputs": {k: v for k, v in (s.get("rows") or {}).items() if k != output},
        "dropped": dropped,
        "examples": _examples(run, stage, texts),
    }


def _length_series(run: RunArtifacts, traces, traces_ref: str, target: str) -> dict:
    """Token lengths of the traces, by what became of each: kept (in ``target``), rejected,
    errored, correct but not kept."""
    tokens = traces.column("completion_tokens").to_pylist()
    verdicts = traces.column("verdict").to_pylist() if "verdict" in traces.column_names else [None] * len(tokens)
    tgt = run.read(target, ["prompt_id", "sample_index"]) if target != traces_ref else None
    key = ("prompt_id", "sample_index")
    kept_keys = keys = None
    if tgt is not None and set(key) <= set(tgt.column_names) and set(key) <= set(traces.column_names):
        kept_keys = set(zip(tgt.column("prompt_id").to_pylist(), tgt.column("sample_index").to_pylist()))
        keys = list(zip(traces.column("prompt_id").to_pylist(), traces.column("sample_index").to_pylist()))
    series: dict[str, list[int]] = defaultdict(list)
    for i, (t, v) in enumerate(zip(tokens, verdicts)):
        if t is None:
            continue
        if kept_keys is not None and keys[i] in kept_keys:  # in the training data, whatever its verdict
            series["kept"].append(t)
        elif v is not None and v != "correct":
            series["rejected" if v != "error" else "errored"].append(t)
        elif kept_keys is not None:
            series["correct, not kept"].append(t)
        else:
            series["kept" if v == "correct" else "all"].append(t)
    return {"dataset": traces_ref, "kept_from": target if kept_keys is not None else None,
            "series": {k: _describe(v) for k, v in series.items()}, "values": dict(series)}


def _funnel_and_lengths(run: RunArtifacts) -> tuple[dict | None, dict | None]:
    target = _funnel_target(run)
    if target is None:
        return None, None
    chain, all_steps = _chain(run, target)
    traces_ref = _traces(run, chain, all_steps)
    texts: dict = {}
    traces = None
    if traces_ref is not None:
        traces = run.read(traces_ref, ["prompt_id", "sample_index", "completion_tokens", "verdict", "reason",
                                       "completion"])
        if {"prompt_id", "sample_index", "completion"} <= set(traces.column_names):
            texts = dict(zip(zip(traces.column("prompt_id").to_pylist(), traces.column("sample_index").to_pylist()),
                             traces.column("completion").to_pylist()))
    steps: list[dict] = []
    for ref, _ in chain:
        steps.append(_funnel_step(run, ref, steps[-1]["rows"] if steps else None, texts))
    lengths = None
    if traces is not None and "completion_tokens" in traces.column_names:
        lengths = _length_series(run, traces, traces_ref, target)
    return {"target": target, "steps": steps}, lengths


def _describe(values: list[float]) -> dict:
    vals = sorted(values)
    if not vals:
        return {"count": 0}
    return {"count": len(vals), "mean": sum(vals) / len(vals), "median": vals[len(vals) // 2], "max": vals[-1]}


def _roles(metrics: dict) -> dict[str, dict]:
    """Per role metrics: ``roles.<role>`` (current shape), else top-level groups holding pass@1
    (``teacher`` / ``student``, the older shape)."""
    if isinstance(metrics.get("roles"), dict):
        return {k: v for k, v in metrics["roles"].items() if isinstance(v, dict)}
    return {k: v for k, v in metrics.items() if isinstance(v, dict) and "pass@1" in v}


def _curve(role: dict, kind: str) -> list[list[float]]:
    """[[k, mean, se], ...] for ``pass`` or ``maj``: the role's ``curves``, else its ``<kind>@k`` keys."""
    curves = role.get("curves") or {}
    pts = curves.get(f"{kind}@k")
    if isinstance(pts, list) and pts:
        return [[p[0], p[1], p[2] if len(p) > 2 else None] for p in pts if isinstance(p, (list, tuple)) and len(p) >= 2]
    out = []
    for key, v in role.items():
        if key.startswith(f"{kind}@") and key[len(kind) + 1:].isdigit() and isinstance(v, (int, float)):
            out.append([int(key[len(kind) + 1:]), v, role.get(f"{key}_se")])
    return sorted(out)


def _evaluation(run: RunArtifacts) -> list[dict]:
    out = []
    for name in run.order:
        s = run.stages[name]
        if not _evaluation_stage(s):
            continue
        metrics = s.get("metrics") or {}
        roles = _roles(metrics)
        if not roles:
            continue
        out.append({
            "stage": name, "status": s.get("status"), "roles": roles,
            "curves": {r: {"pass": _curve(v, "pass"), "maj": _curve(v, "maj")} for r, v in roles.items()},
            "sampling": metrics.get("sampling") if isinstance(metrics.get("sampling"), dict) else None,
            "temperature": metrics.get("temperature"),
            "comparisons": [c for c in metrics.get("comparisons") or [] if isinstance(c, dict)],
            "budget_sweep": {r: [p for p in pts if isinstance(p, dict)]
                             for r, pts in (metrics.get("budget_sweep") or {}).items() if isinstance(pts, list)},
            "promotion": metrics.get("promotion") if isinstance(metrics.get("promotion"), dict) else None,
        })
    return out


# the trainer curves the report draws, by group (a stage record's ``curves``)
REWARD_CURVES = ("reward", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
LENGTH_CURVES = ("completions/mean_length", "completions/clipped_ratio")


def _points(c: Any) -> list[list[float]]:
    return [[p[0], p[1]] for p in c or [] if isinstance(p, (list, tuple)) and len(p) == 2
            and all(isinstance(x, (int, float)) for x in p)] if isinstance(c, list) else []


def _training(run: RunArtifacts) -> list[dict]:
    out = []
    for name in run.order:
        s = run.stages[name]
        m = s.get("metrics") or {}
        loss = _points(m.get("loss_curve"))
        if not loss:
            continue
        curves = m.get("curves") if isinstance(m.get("curves"), dict) else {}
        rewards = {k: _points(curves.get(k)) for k in REWARD_CURVES if _points(curves.get(k))}
        reasons = {k.split("/", 1)[1]: _points(v) for k, v in sorted(curves.items())
                   if k.startswith("verify/") and _points(v)}
        lengths = {k: _points(curves.get(k)) for k in LENGTH_CURVES if _points(curves.get(k))}
        out.append({"stage": name, "kind": s.get("kind"), "status": s.get("status"), "steps": m.get("steps"),
                    "loss": loss, "rewards": rewards, "reasons": reasons, "lengths": lengths,
                    "worker_starts": [w for w in m.get("worker_starts") or [] if isinstance(w, dict)]})
    return out


def _performance(run: RunArtifacts) -> dict:
    timings = [{"stage": n, "status": run.stages[n].get("status"), "seconds": run.stages[n].get("seconds") or 0.0}
               for n in run.order]
    throughput = []
    for n in run.order:
        s = run.stages[n]
        m = s.get("metrics") or {}
        secs = s.get("seconds") or 0.0
        if s.get("kind") == "generate" and isinstance(m.get("completion_tokens"), (int, float)):
            gen = m.get("generated_tokens_this_attempt", m["completion_tokens"])
            busy = max(1e-9, secs - (m.get("engine_startup_seconds") or 0.0))
            throughput.append({"stage": n, "what": "generation", "tokens": gen, "seconds": secs,
                               "tokens_per_second": gen / secs if secs else None,
                               "tokens_per_second_after_startup": gen / busy if secs else None})
        if isinstance(m.get("tokens_per_second"), (int, float)):
            throughput.append({"stage": n, "what": "training", "tokens": m.get("train_tokens"),
                               "seconds": m.get("train_seconds", secs), "tokens_per_second": m["tokens_per_second"]})
    return {"timings": timings, "throughput": throughput, "total_seconds": run.m.get("seconds")}


def _lineage(run: RunArtifacts) -> dict:
    written, read = [], []
    produced_here = {n for n in run.order if run.stages[n].get("status") == "done"}
    for n in run.order:
        s = run.stages[n]
        for out in s.get("output") or {}:
            ref = f"{n}.{out}"
            a = run.artifacts[ref]
            man = a["manifest"]
            lin = man.get("lineage") or {}
            entry = {"ref": ref, "type": a["type"], "uri": a["uri"], "version": s.get("fingerprint"),
                     "rows": man.get("rows"), "bytes": man.get("bytes") if a["type"] == "dataset"
                     else sum(f.get("bytes", 0) for f in man.get("files") or []),
                     "created": man.get("created"), "produced_by_run": s.get("produced_by_run") or lin.get("run_id"),
                     "previous": (lin.get("previous") or {}).get("uri")}
            (written if n in produced_here else read).append(entry)
    consumed = sorted({r for n in run.order for r in (run.stages[n].get("inputs") or {}).values()})
    return {"written": written, "reused": read, "consumed": consumed}


def collect(run: RunArtifacts) -> dict:
    funnel, lengths = _funnel_and_lengths(run)
    data: dict[str, Any] = {"summary": _summary(run), "dag": _dag(run)}
    if funnel:
        data["funnel"] = funnel
    if lengths and lengths["series"]:
        data["lengths"] = lengths
    evaluation = _evaluation(run)
    if evaluation:
        data["evaluation"] = evaluation
    training = _training(run)
    if training:
        data["training"] = training
    data["performance"] = _performance(run)
    data["lineage"] = _lineage(run)
    return data


# -- figures (matplotlib, Agg) ----------------------------------------------------------------

STATUS_COLOR = {"done": "#2e7d32", "cached": "#1565c0", "failed": "#c62828", "skipped": "#9e9e9e"}
PALETTE = ["#1565c0", "#c62828", "#2e7d32", "#ef6c00", "#6a1b9a", "#00838f", "#5d4037", "#ad1457"]


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    return fig


def _save(fig, folder: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(folder / name, dpi=100, format="png")
    return f"{FIGURES}/{name}"


def _fig_dag(dag: list[dict], folder: Path) -> str:
    names = [s["name"] for s in dag]
    ups = {s["name"]: [r.rsplit(".", 1)[0] for r in s["inputs"].values() if r.rsplit(".", 1)[0] in names] for s in dag}
    depth: dict[str, int] = {}
    for n in names:  # stages are in dependency order
        depth[n] = 1 + max((depth[u] for u in ups[n]), default=-1)
    cols: dict[int, list[str]] = defaultdict(list)
    for n in names:
        cols[depth[n]].append(n)
    pos = {n: (d, -i + (len(c) - 1) / 2) for d, c in cols.items() for i, n in enumerate(c)}
    height = max(len(c) for c in cols.values())
    fig = _figure(min(11.0, max(6.0, 1.45 * len(cols) + 0.5)), max(2.0, 1.0 * height + 0.6))
    ax = fig.add_subplot()
    for n in names:
        for u in dict.fromkeys(ups[n]):
            ax.annotate("", xy=pos[n], xytext=pos[u],
                        arrowprops={"arrowstyle": "-|>", "color": "#757575", "shrinkA": 30, "shrinkB": 30, "lw": 1.2})
    for s in dag:
        x, y = pos[s["name"]]
        rows = sum((s["rows_out"] or {}).values())
        label = f"{s['name']}\n{s['status']} {s['seconds'] or 0:.1f}s" + (f"\n{rows:,} rows" if s["rows_out"] else "")
        ax.text(x, y, label, ha="center", va="center", fontsize=8, color="white",
                bbox={"boxstyle": "round,pad=0.4", "fc": STATUS_COLOR.get(s["status"], "#616161"), "ec": "none"})
    ax.set_xlim(-0.6, max(cols) + 0.6)
    ax.set_ylim(-height / 2 - 0.3, height / 2 + 0.3)
    ax.axis("off")
    return _save(fig, folder, "dag.png")


def _fig_funnel(steps: list[dict], folder: Path) -> str:
    fig = _figure(8.5, 0.55 * len(steps) + 1.4)
    ax = fig.add_subplot()
    labels = [s["dataset"] for s in steps][::-1]
    passed = [s["passed"] for s in steps][::-1]
    marked = [s["marked"] for s in steps][::-1]
    ax.barh(labels, passed, color="#2e7d32", label="passed on")
    ax.barh(labels, marked, left=passed, color="#ef9a9a", label="marked rejected / errored")
    for i, (p, m) in enumerate(zip(passed, marked)):
        ax.text(p + m, i, f" {p:,}" + (f" + {m:,}" if m else ""), va="center", fontsize=8)
    ax.set_xlabel("rows")
    ax.margins(x=0.15)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, folder, "funnel.png")


def _fig_reasons(steps: list[dict], folder: Path) -> str | None:
    bars = [(f"{s['dataset'].rsplit('.', 1)[0]}: {kind}/{reason}", n, kind)
            for s in steps for kind, reasons in s["dropped"].items() for reason, n in reasons.items() if n]
    if not bars:
        return None
    bars = bars[:40]
    fig = _figure(8.5, 0.32 * len(bars) + 1.2)
    ax = fig.add_subplot()
    kinds = sorted({b[2] for b in bars})
    colors = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(kinds)}
    ax.barh([b[0] for b in bars][::-1], [b[1] for b in bars][::-1], color=[colors[b[2]] for b in bars][::-1])
    for i, b in enumerate(bars[::-1]):
        ax.text(b[1], i, f" {b[1]:,}", va="center", fontsize=8)
    ax.set_xlabel("rows")
    ax.margins(x=0.12)
    ax.tick_params(axis="y", labelsize=8)
    return _save(fig, folder, "reasons.png")


def _fig_lengths(lengths: dict, folder: Path) -> str:
    values = {k: v for k, v in lengths["values"].items() if v}
    lo = min(min(v) for v in values.values())
    hi = max(max(v) for v in values.values())
    nb = max(1, min(40, hi - lo + 1))
    fig = _figure(8.5, 3.6)
    ax = fig.add_subplot()
    order = [k for k in ("kept", "correct, not kept", "rejected", "errored", "all") if k in values]
    color = {"kept": "#2e7d32", "correct, not kept": "#1565c0", "rejected": "#c62828", "errored": "#757575",
             "all": "#1565c0"}
    for k in order:
        ax.hist(values[k], bins=nb, range=(lo, hi + 1), histtype="stepfilled", alpha=0.35, color=color[k])
        ax.hist(values[k], bins=nb, range=(lo, hi + 1), histtype="step", lw=1.4, color=color[k],
                label=f"{k} ({len(values[k]):,})")
    ax.set_xlabel("completion tokens")
    ax.set_ylabel("traces")
    ax.legend(fontsize=8)
    return _save(fig, folder, "lengths.png")


def _fig_curves(ev: dict, folder: Path, i: int) -> str | None:
    if not any(c["pass"] or c["maj"] for c in ev["curves"].values()):
        return None
    fig = _figure(8.5, 3.8)
    ax = fig.add_subplot()
    for j, (role, c) in enumerate(ev["curves"].items()):
        color = PALETTE[j % len(PALETTE)]
        for kind, style in (("pass", "-"), ("maj", "--")):
            pts = c[kind]
            if not pts:
                continue
            ks, means = [p[0] for p in pts], [p[1] for p in pts]
            errs = [1.96 * (p[2] or 0.0) for p in pts]
            ax.errorbar(ks, means, yerr=errs, fmt="o" + style, color=color, capsize=3, ms=4, lw=1.3,
                        label=f"{role} {kind}@k")
    ax.set_xlabel("k (samples per prompt)")
    ax.set_ylabel("score (±95% CI)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, folder, f"curves-{i}.png")


def _fig_roles(ev: dict, folder: Path, i: int) -> str | None:
    roles = [(r, v) for r, v in ev["roles"].items() if isinstance(v.get("pass@1"), (int, float))]
    if not roles:
        return None
    fig = _figure(6.0, 0.5 * len(roles) + 1.3)
    ax = fig.add_subplot()
    ys = list(range(len(roles)))[::-1]
    ax.errorbar([v["pass@1"] for _, v in roles], ys, xerr=[1.96 * (v.get("pass@1_se") or 0.0) for _, v in roles],
                fmt="o", color="#1565c0", capsize=4)
    ax.set_yticks(ys, [r for r, _ in roles])
    ax.set_xlabel("pass@1 (±95% CI)")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.7, len(roles) - 0.3)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, folder, f"pass1-{i}.png")


def _fig_budget(ev: dict, folder: Path, i: int) -> str | None:
    if not any(ev["budget_sweep"].values()):
        return None
    fig = _figure(8.5, 3.6)
    ax = fig.add_subplot()
    for j, (role, pts) in enumerate(ev["budget_sweep"].items()):
        pts = [p for p in pts if isinstance(p.get("pass@1"), (int, float)) and isinstance(p.get("mean_tokens"), (int, float))]
        if not pts:
            continue
        ax.errorbar([p["mean_tokens"] for p in pts], [p["pass@1"] for p in pts],
                    yerr=[1.96 * (p.get("pass@1_se") or 0.0) for p in pts], fmt="o-", capsize=3,
                    color=PALETTE[j % len(PALETTE)], label=role)
        for p in pts:
            ax.annotate(str(p.get("max_thinking_tokens")), (p["mean_tokens"], p["pass@1"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("mean tokens per sample (labels: max thinking tokens)")
    ax.set_ylabel("pass@1 (±95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, folder, f"budget-{i}.png")


def _fig_training(tr: dict, folder: Path, i: int) -> str:
    groups = [("loss", {"loss": tr["loss"]})]
    if tr["rewards"]:
        groups.append(("reward", tr["rewards"]))
    if tr["reasons"]:
        groups.append(("share of completions", tr["reasons"]))
    if tr["lengths"].get("completions/mean_length"):
        groups.append(("mean completion tokens", {"mean length": tr["lengths"]["completions/mean_length"]}))
    fig = _figure(3.2 * len(groups) + 1, 3.0)
    for j, (label, series) in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), j + 1)
        for k, (key, pts) in enumerate(series.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", marker="." if len(pts) < 40 else None,
                    color=PALETTE[k % len(PALETTE)], label=key)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    return _save(fig, folder, f"training-{i}.png")


def _fig_timings(perf: dict, folder: Path) -> str:
    t = perf["timings"]
    fig = _figure(8.5, 0.4 * len(t) + 1.2)
    ax = fig.add_subplot()
    ax.barh([x["stage"] for x in t][::-1], [x["seconds"] for x in t][::-1],
            color=[STATUS_COLOR.get(x["status"], "#616161") for x in t][::-1])
    for i, x in enumerate(t[::-1]):
        ax.text(x["seconds"], i, f" {x['seconds']:.1f}s ({x['status']})", va="center", fontsize=8)
    ax.set_xlabel("seconds (a cached stage: the run that produced it)")
    ax.margins(x=0.2)
    return _save(fig, folder, "timings.png")


# -- HTML ---------------------------------------------------------------------------------------
# The page is templates/report.html.j2 (Jinja2, autoescaped) with templates/report.css inlined;
# below, what the tables show, as plain text.

def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:,.{digits}f}"
    if isinstance(x, (list, tuple)) and all(isinstance(v, (int, float)) for v in x):
        return "[" + ", ".join(_fmt(v, digits) for v in x) + "]"
    return str(x)


def _pairs(counts: dict) -> str:
    return ", ".join(f"{k}={v:,}" for k, v in counts.items()) or "–"


def _with_se(x: Any, se: Any) -> str:
    return _fmt(x) + (f" ± {_fmt(se)}" if se is not None and x is not None else "")


def _evaluation_view(ev: dict, figs: dict) -> dict:
    """One evaluate stage's tables: roles (pass@1 ± SE, CI, pass/maj@k, tokens), comparisons, promotion."""
    ks = sorted({int(k.split("@")[1]) for v in ev["roles"].values() for k in v
                 if k.split("@")[0] in ("pass", "maj") and k.count("@") == 1 and k.split("@")[1].isdigit()} - {1})
    cols = ["role", "prompts", "samples", "pass@1 ± SE", "95% CI"]
    cols += [f"{kind}@{k}" for k in ks for kind in ("pass", "maj")]
    cols += ["mean tokens", "tokens/correct", "truncated"]
    rows = []
    for role, v in ev["roles"].items():
        row = [role, _fmt(v.get("prompts")), _fmt(v.get("samples")), _with_se(v.get("pass@1"), v.get("pass@1_se")),
               _fmt(v.get("pass@1_ci95"))]
        row += [_with_se(v.get(f"{kind}@{k}"), v.get(f"{kind}@{k}_se")) for k in ks for kind in ("pass", "maj")]
        rows.append(row + [_fmt(v.get("mean_tokens"), 1), _fmt(v.get("tokens_per_correct"), 1),
                           _fmt(v.get("truncated_rate"))])
    comparisons = [[_fmt(c.get("a")), _fmt(c.get("b")), _fmt(c.get("metric")), _fmt(c.get("diff")), _fmt(c.get("se")),
                    _fmt(c.get("ci95")), _fmt(c.get("prompts"))] for c in ev["comparisons"]]
    pr = ev["promotion"] or {}
    promotion = [[k, _fmt(v)] for k, v in pr.items() if not isinstance(v, (dict, list)) or k == "ci95"]
    return {**{k: ev[k] for k in ("stage", "status", "sampling", "temperature")}, "cols": cols, "rows": rows,
            "numeric": set(range(1, len(cols))), "comparisons": comparisons, "promotion": promotion,
            "promoted": bool(pr.get("promoted")), "figs": figs}


def _training_view(tr: dict, fig: str) -> dict:
    rows = [[key, _fmt(pts[0][0]), _fmt(pts[0][1]), _fmt(pts[-1][0]), _fmt(pts[-1][1]), _fmt(max(p[1] for p in pts)),
             _fmt(len(pts))]
            for key, pts in [("loss", tr["loss"]), *tr["rewards"].items(),
                             *((f"verify/{k}", v) for k, v in tr["reasons"].items()), *tr["lengths"].items()]]
    resumed = [w["resumed_from_step"] for w in tr["worker_starts"] if w.get("resumed_from_step") is not None]
    return {**{k: tr[k] for k in ("stage", "kind", "status", "steps")}, "fig": fig, "rows": rows, "resumed": resumed}


def _performance_rows(perf: dict) -> list[list[str]]:
    return [[t["stage"], t["what"], _fmt(t.get("tokens")), _fmt(t.get("seconds"), 1), _fmt(t.get("tokens_per_second"), 1),
             _fmt(t.get("tokens_per_second_after_startup"), 1)] for t in perf["throughput"]]


def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline.views", "templates"), autoescape=True,
                             finalize=lambda x: "" if x is None else x, undefined=jinja2.ChainableUndefined)
    env.filters.update(fmt=_fmt, pairs=_pairs)
    return env.get_template("report.html.j2")


def render(data: dict, folder: Path) -> str:
    """Draw the figures into ``folder/figures`` and return the page."""
    figdir = folder / FIGURES
    figdir.mkdir(parents=True, exist_ok=True)
    for old in figdir.glob("*.png"):  # a report rebuilt in place references only its own figures
        old.unlink()
    figs: dict[str, str | None] = {"dag": _fig_dag(data["dag"], figdir) if data["dag"] else None,
                                   "timings": _fig_timings(data["performance"], figdir) if data["dag"] else None}
    nav = ["summary", "dag"]
    examples = []
    if "funnel" in data:
        steps = data["funnel"]["steps"]
        figs.update(funnel=_fig_funnel(steps, figdir), reasons=_fig_reasons(steps, figdir))
        examples = [(reason, rows) for s in steps for reason, rows in s["examples"].items()]
        nav.append("funnel")
    if "lengths" in data:
        figs["lengths"] = _fig_lengths(data["lengths"], figdir)
        nav.append("lengths")
    evaluations = [_evaluation_view(ev, {"curves": _fig_curves(ev, figdir, i), "pass1": _fig_roles(ev, figdir, i),
                                         "budget": _fig_budget(ev, figdir, i)})
                   for i, ev in enumerate(data.get("evaluation", []))]
    trainings = [_training_view(tr, _fig_training(tr, figdir, i)) for i, tr in enumerate(data.get("training", []))]
    if evaluations:
        nav.append("evaluation")
    if trainings:
        nav.append("training")
    nav += ["performance", "lineage"]
    s = data["summary"]
    return _template().render(data=data, figs=figs, nav=nav, examples=examples, evaluations=evaluations,
                              trainings=trainings, performance=_performance_rows(data["performance"]),
                              title=f"{s['pipeline']} · {s['run_id']}",
                              built=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))


def default_out(st: Storage, run_id: str) -> Path:
    """Where a report goes without ``--out``: beside the run manifest on a local root
    (``runs/<run_id>/report/``); for a remote root, ``./distill-reports/<run_id>/``."""
    if st.is_local:
        return Path(layout.run_dir(st, run_id)) / "report"
    return Path("distill-reports") / run_id


def build(run: str, root: str | None = None, out: str | Path | None = None) -> Path:
    """Write ``report.html``, ``report.json`` and ``figures/`` for a run; returns the page's path."""
    st, manifest, uri = load_run(run, root)
    data = collect(RunArtifacts(st, manifest, uri))
    folder = Path(out) if out else default_out(st, manifest["run_id"])
    folder.mkdir(parents=True, exist_ok=True)
    page = render(data, folder)
    if "lengths" in data:
        data["lengths"] = {k: v for k, v in data["lengths"].items() if k != "values"}
    (folder / DATA_FILE).write_text(json.dumps(data, indent=1, default=str))
    tmp = folder / f".{REPORT_FILE}.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, folder / REPORT_FILE)
    return (folder / REPORT_FILE).resolve()
