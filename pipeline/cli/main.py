"""The ``distill`` command line."""
from __future__ import annotations

import json
import logging
import re
import sys
from typing import Optional

import typer
from rich.markup import escape  # stage names of matrix variants, e.g. student[data=a,seed=0], are not markup
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.cli.common import ConfigOpt, RootOpt, SetOpt, console, load, out, storage
from pipeline.core.stage import Progress as StageProgress
from pipeline.store.layout import default_root

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Distillation pipelines for reasoning models, on Ray.")
runs_app = typer.Typer(no_args_is_help=True, help="Read run manifests.")
app.add_typer(runs_app, name="runs")


@app.callback()
def _redact_every_output() -> None:
    """Every line a command prints (tables, --json, errors, logs) goes through one redactor."""
    from pipeline.store.secrets import install_redacting_streams

    install_redacting_streams()


datasets_app = typer.Typer(no_args_is_help=True, help="Inspect committed datasets (local or s3://).")
app.add_typer(datasets_app, name="datasets")

class _Bar(StageProgress):
    def __init__(self, progress: Progress, description: str, total: int | None):
        self.progress, self.task = progress, progress.add_task(escape(description), total=total)

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def update(self, completed: int, total: int | None = None, info: str = "") -> None:
        t = self.progress.tasks[self.task]
        base = t.fields.setdefault("base", t.description)
        self.progress.update(self.task, completed=completed, total=total if total else t.total,
                             description=f"{base}  {info}" if info else base)

    def close(self) -> None:
        t = self.progress.tasks[self.task]
        if t.total is None:
            self.progress.update(self.task, total=1, completed=1)


@app.command()
def plan(config: str = typer.Argument(..., help="pipeline YAML"), set_: Optional[list[str]] = SetOpt,
         json_: bool = typer.Option(False, "--json"),
         estimate_: bool = typer.Option(False, "--estimate", help="GPU-hours per stage (decode roofline, 6·N·D "
                                        "training) instead of the DAG"),
         price: Optional[float] = typer.Option(None, "--price-per-gpu-hour", min=0, help="with --estimate: money")):
    """Print the DAG with each stage's fingerprint and whether it would run or come from cache,
    and for each stage that would run the first reason: its code, a param, an external file, an
    input digest. Downstream of a stage that runs, keys are provisional (marked ``~``): such a
    stage is cached after all if that stage writes the same rows. Loads no model."""
    from pipeline.core.runner import Runner

    cfg = load(config, set_)
    if estimate_:  # pipeline/sizing/estimate.py
        _print_estimate(cfg, price, json_)
        return
    entries = Runner(cfg).plan(explain=True)
    if json_:
        out.print_json(json.dumps([{"name": e.name, "kind": e.kind, "fingerprint": e.fingerprint, "inputs": e.inputs,
                                    "action": "cached" if e.cached else "run", "provisional": e.provisional,
                                    **({"reason": e.reason} if e.reason else {})} for e in entries]))
        return
    table = Table(title=f"{cfg.name}  ({cfg.path})")
    for col in ("stage", "kind", "inputs", "fingerprint", "action"):
        table.add_column(col)
    for e in entries:
        table.add_row(escape(e.name), e.kind, escape(", ".join(f"{k}<-{v}" for k, v in e.inputs.items())) or "-",
                      ("~" if e.provisional else "") + e.fingerprint, "[green]cached[/]" if e.cached else "[yellow]run[/]")
    out.print(table)
    for e in entries:  # one line each, never wrapped: the reason is what a user greps for
        if not e.cached:
            out.print(f"{escape(e.name)}: would run ({escape(e.reason or '')})", soft_wrap=True, highlight=False)
    if any(e.provisional for e in entries):
        out.print("~ provisional: an input is not written yet; the stage is cached after all if the stage "
                  "writing it writes the same rows", soft_wrap=True, highlight=False)


def _print_estimate(cfg, price: float | None, json_: bool) -> None:
    from pipeline.sizing.estimate import estimate

    est = estimate(cfg, price)
    if json_:
        out.print_json(json.dumps(est))
    else:
        table = Table(title=f"{cfg.name}: estimate  ({cfg.path})")
        for col in ("stage", "cost", "gpu", "gpus", "samples", "tokens/sample", "tokens", "hours", "GPU-hours",
                    "calibration", *(["USD"] if price is not None else [])):
            table.add_column(col)
        for r in est["stages"]:
            tokens = r["completion_tokens"] if r["cost"] == "decode" else r["train_tokens"]
            table.add_row(escape(r["stage"]), r["cost"], r["gpu"], str(r["gpus"]), f"{r['samples'] or 0:,.0f}",
                          f"{r['completion_tokens_per_sample']:,.0f}" if r["completion_tokens_per_sample"] else "-",
                          f"{tokens or 0:,.0f}", f"{r['seconds'] / 3600:,.2f}", f"{r['gpu_hours']:,.1f}",
                          f"{r['calibration']:.3g} ({escape(r['calibrated_from'])})",
                          *([f"{r['cost_usd']:,.0f}"] if price is not None else []))
        t = est["total"]
        table.add_row("total", "", "", "", "", "", f"{t['completion_tokens']:,.0f}", f"{t['seconds'] / 3600:,.2f}",
                      f"{t['gpu_hours']:,.1f}", "", *([f"{t['cost_usd']:,.0f}"] if price is not None else []))
        out.print(table)
    for p in est["problems"]:
        console.print(f"[bold red]error[/] {escape(p)}", highlight=False)
    if est["problems"]:
        raise typer.Exit(1)


@app.command()
def run(config: str = typer.Argument(..., help="pipeline YAML"), set_: Optional[list[str]] = SetOpt,
        address: Optional[str] = typer.Option(None, "--address", help="Ray address (default: start a local Ray)"),
        verbose: bool = typer.Option(False, "-v", "--verbose"),
        run_id: Optional[str] = typer.Option(None, "--run-id", help="id of this run (default: time-pipeline-random)")):
    """Run the pipeline; stages whose outputs are committed come from cache."""
    if run_id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}", run_id):
        console.print(f"[bold red]error[/] --run-id {run_id!r}: use letters, digits, '_', '.', '-'", highlight=False)
        raise typer.Exit(2)
    from pipeline.core.runner import Runner

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s")
    cfg = load(config, set_)
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=False)

    def on_stage(name: str, event: str, info: dict) -> None:
        if event == "cached":
            progress.console.print(f"[green]cached[/] {escape(name)} ({info['fingerprint']})")
        elif event == "start":
            progress.console.print(f"[cyan]run[/]    {escape(name)} ({info['fingerprint']})")
        elif event == "done":
            progress.console.print(f"[green]done[/]   {escape(name)} in {info['seconds']:.1f}s  rows={info['rows']}")
        elif event == "failed":
            progress.console.print(f"[red]failed[/] {escape(name)}: {escape(str(info.get('error')))}", highlight=False)

    with progress:
        result = Runner(cfg, address=address, progress_factory=lambda d, t: _Bar(progress, d, t), on_stage=on_stage).run(run_id=run_id)
    _print_manifest(result.manifest)
    if result.ok and not any(s["status"] == "done" for s in result.manifest["stages"]):
        out.print("nothing new: every stage was cached (no Ray, no engine started)")
    out.print(f"run manifest: {result.manifest_uri}")
    if not result.ok:
        console.print(f"[bold red]run failed[/] {escape(str(result.error))}", highlight=False)
        raise typer.Exit(1)


def _print_manifest(m: dict) -> None:
    table = Table(title=f"run {m['run_id']}  [{m['status']}]")
    for col in ("stage", "status", "seconds", "rows", "fingerprint"):
        table.add_column(col)
    for s in m["stages"]:
        color = {"done": "green", "cached": "cyan", "failed": "red"}.get(s["status"], "yellow")
        rows = ", ".join(f"{k}={v}" for k, v in (s.get("rows") or {}).items())
        table.add_row(escape(s["name"]), f"[{color}]{s['status']}[/]", f"{s.get('seconds', 0):.1f}", rows, s["fingerprint"])
    out.print(table)
    for s in m["stages"]:
        _print_comparison(s["name"], s.get("metrics") or {})


def _num(x, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _print_evaluation(stage: str, metrics: dict) -> None:
    """Metrics of a stage that scored model roles (``roles``, ``sampling``, ``comparisons``,
    ``promotion``): one row per role, the sampling settings in the title."""
    s = metrics.get("sampling", {})
    n = s.get("n")
    title = (f"{stage}: temperature {s.get('temperature')}, top_p {s.get('top_p')}, {n} samples/prompt, "
             f"max_tokens {s.get('max_tokens')}, seed {s.get('seed')}")
    table = Table(title=escape(title))
    for col in ("role", "prompts", "pass@1 ± SE", f"pass@{n}", f"maj@{n}", "mean tokens", "tokens/correct", "errored"):
        table.add_column(col, justify="left" if col == "role" else "right")
    for role, m in metrics["roles"].items():
        table.add_row(role, str(m.get("prompts", 0)),
                      f"{_num(m.get('pass@1'))} ± {_num(m.get('pass@1_se'))}" if "pass@1" in m else "-",
                      _num(m.get(f"pass@{n}")), _num(m.get(f"maj@{n}")), _num(m.get("mean_tokens"), ".1f"),
                      _num(m.get("tokens_per_correct"), ".1f"), str(m.get("errored", 0)))
    out.print(table)
    for c in metrics.get("comparisons", []):
        out.print(f"  {c['a']} - {c['b']}: pass@1 {c['diff']:+.3f} ± {c['se']:.3f} (paired SE, {c['prompts']} prompts; "
                  f"95% CI {c['ci95'][0]:+.3f} .. {c['ci95'][1]:+.3f})", highlight=False)
    for role, points in metrics.get("budget_sweep", {}).items():
        curve = ", ".join(f"{pt['max_thinking_tokens']}: {_num(pt['pass@1'])} @ {_num(pt['mean_tokens'], '.0f')} tok"
                          for pt in points)
        out.print(f"  budget sweep {role}: {curve}", highlight=False)
    pr = metrics.get("promotion")
    if pr:
        verdict = "[green]promoted[/]" if pr["promoted"] else "[yellow]not promoted[/]"
        out.print(f"  {verdict} to best/{pr['pointer']}: {pr['reason']}")


def _print_comparison(stage: str, metrics: dict) -> None:
    """Metrics shaped {group: {metric: number}} (e.g. teacher/student) print as one table,
    a row per metric and a column per group."""
    if isinstance(metrics.get("roles"), dict):
        _print_evaluation(stage, metrics)
        return
    groups = {k: v for k, v in metrics.items() if isinstance(v, dict) and v and all(isinstance(x, (int, float)) for x in v.values())}
    if len(groups) < 2:
        return
    names: list[str] = []
    for v in groups.values():
        names += [c for c in v if c not in names]
    table = Table(title=escape(f"{stage} metrics"))
    table.add_column("metric")
    for g in groups:
        table.add_column(g, justify="right")
    for name in names:
        cells = []
        for v in groups.values():
            x = v.get(name)
            cells.append("-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x))
        table.add_row(name, *cells)
    out.print(table)


@runs_app.command("ls")
def runs_ls(root: Optional[str] = RootOpt, config: Optional[str] = ConfigOpt, json_: bool = typer.Option(False, "--json")):
    """List runs, oldest first."""
    from pipeline.views.runs import list_runs

    runs = list_runs(storage(root, config))
    if json_:
        out.print_json(json.dumps([{k: r.get(k) for k in ("run_id", "pipeline", "status", "started", "seconds")} for r in runs]))
        return
    table = Table()
    for col in ("run", "pipeline", "status", "started", "seconds", "stages"):
        table.add_column(col)
    for r in runs:
        counts: dict[str, int] = {}
        for s in r["stages"]:
            counts[s["status"]] = counts.get(s["status"], 0) + 1
        table.add_row(r["run_id"], r["pipeline"], r["status"], r["started"], f"{r.get('seconds', 0):.1f}",
                      ", ".join(f"{v} {k}" for k, v in counts.items()))
    out.print(table)


@runs_app.command("show")
def runs_show(run: str = typer.Argument("latest"), root: Optional[str] = RootOpt, config: Optional[str] = ConfigOpt,
              json_: bool = typer.Option(False, "--json")):
    """Show one run manifest (RUN: a run id, 'latest', or the URI of a run manifest or its folder)."""
    from pipeline.views.runs import ReadError, load_run

    try:
        _, m, _ = load_run(run, storage(root, config))
    except ReadError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(1)
    if json_:
        sys.stdout.write(json.dumps(m, indent=2) + "\n")
        return
    _print_manifest(m)


def _dataset_or_exit(uri: str):
    from pipeline.views.inspect_datasets import resolve

    return _call_or_exit(resolve, uri)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _age(created: str | None) -> str:
    """How long ago an ISO timestamp was: 45s, 12m, 3h, 5d."""
    from datetime import datetime, timezone

    try:
        then = datetime.fromisoformat(created)
    except (TypeError, ValueError):
        return "-"
    s = max(0, (datetime.now(timezone.utc) - (then if then.tzinfo else then.replace(tzinfo=timezone.utc))).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{int(s // size)}{unit}"
    return f"{int(s)}s"


def _short_run(run_id: str | None) -> str:
    """A run id without its leading timestamp (the age column says when): demo-1a2b3c."""
    if not run_id:
        return "-"
    m = re.fullmatch(r"\d{8}-\d{6}-(.+)", run_id)
    return m.group(1) if m else run_id


@datasets_app.command("ls")
def datasets_ls(uri: Optional[str] = typer.Argument(None, help="storage root or any folder under it (default: "
                                                           "$DISTILL_ROOT, else .distill)"),
                long: bool = typer.Option(False, "--long", "-l", help="also each dataset's path (and full version and run)"),
                json_: bool = typer.Option(False, "--json", help="everything, including paths and timestamps")):
    """Every committed dataset under URI, one line each: name, version, rows, size, age, run."""
    from pipeline.views.inspect_datasets import find_datasets

    st, path = _dataset_or_exit(uri or default_root())
    found = find_datasets(st, path)
    if json_:
        sys.stdout.write(json.dumps(found, indent=2) + "\n")
        return
    base = st.uri(path).rstrip("/")
    rows = []
    for d in found:
        rows.append([d["name"], (d["version"] or "-") if long else (d["version"] or "-")[:8], f"{d['rows']:,}",
                     _human(d["bytes"]), _age(d["created"]), (d["run"] or "-") if long else _short_run(d["run"])]
                    + ([uri.rstrip("/") + d["uri"][len(base):]] if long else []))
    table = Table(box=None, pad_edge=False, collapse_padding=True, header_style="bold")
    for i, col in enumerate(("name", "version", "rows", "size", "age", "run") + (("path",) if long else ())):
        if col == "path":  # only the paths wrap
            table.add_column(col, overflow="fold")
        else:
            table.add_column(col, justify="right" if col in ("rows", "size", "age") else "left", no_wrap=True,
                             overflow="ellipsis", min_width=max([len(col)] + [len(r[i]) for r in rows]) if long else None)
    for r in rows:
        table.add_row(*map(escape, r))
    out.print(table)


@datasets_app.command("show")
def datasets_show(uri: str = typer.Argument(..., help="a dataset folder (holding _manifest.json)"),
                  json_: bool = typer.Option(False, "--json")):
    """Schema, lineage, shards, (where the columns exist) verdicts, reasons, sources, a length
    histogram (tokens, else characters), and the funnel of rows from the ancestor datasets."""
    from pipeline.views.inspect_datasets import show

    st, path = _dataset_or_exit(uri)
    info = _call_or_exit(show, st, path)
    if json_:
        sys.stdout.write(json.dumps(info, indent=2, default=str) + "\n")
        return
    out.print(f"[bold]{info['name']}[/]  version {info['version']}  rows {info['rows']}  {_human(info['bytes'])}  "
              f"{len(info['shards'])} shard(s)  run {info['run']}")
    out.print(f"uri: {info['uri']}")
    schema = Table(title="schema")
    schema.add_column("column")
    schema.add_column("type")
    for k, v in info["schema"].items():
        schema.add_row(k, v)
    out.print(schema)
    lineage = {k: v for k, v in info["lineage"].items() if k != "parents"}
    out.print("lineage: " + ", ".join(f"{k}={v}" for k, v in lineage.items()))
    for parent, p in (info["lineage"].get("parents") or {}).items():
        out.print(f"  parent {parent}: {p['uri']} ({p['fingerprint']})")
    for key in ("verdicts", "reasons", "sources"):
        if key in info:
            t = Table(title=key)
            t.add_column(key[:-1])
            t.add_column("rows", justify="right")
            for k, v in info[key].items():
                t.add_row(str(k), str(v))
            out.print(t)
    hist = info.get("length_histogram") or {}
    if hist.get("bins"):
        top = max(b["count"] for b in hist["bins"]) or 1
        out.print(f"length of {hist['column']} ({hist['unit']}):", highlight=False)
        for b in hist["bins"]:
            out.print(f"  {b['from']:>6}-{b['to']:<6} {'#' * round(40 * b['count'] / top)} {b['count']}")
    _print_funnel(info.get("funnel") or [])


def _print_funnel(steps: list[dict]) -> None:
    """One row per dataset from the oldest ancestor down to the shown one: its rows, the other
    outputs of the stage that wrote it, and that stage's counts per reason."""
    if len(steps) < 2 and not any(s.get("dropped") for s in steps):
        return
    table = Table(title="funnel")
    for col in ("dataset", "rows", "stage outputs", "dropped"):
        table.add_column(col, overflow="fold")
    for s in steps:
        if s.get("missing"):
            table.add_row(s["uri"], "[red]missing[/]", "", "")
            continue
        others = ", ".join(f"{k}={v}" for k, v in (s.get("outputs") or {}).items() if k != s.get("output"))
        reasons = "; ".join(f"{k}: " + ", ".join(f"{r}={n}" for r, n in v.items())
                            for k, v in (s.get("dropped") or {}).items())
        table.add_row(escape(s["name"]), str(s["rows"]), others or "-", reasons or "-")
    out.print(table)


@datasets_app.command("head")
def datasets_head(uri: str = typer.Argument(..., help="a dataset folder"), n: int = typer.Option(5, "-n"),
                  json_: bool = typer.Option(False, "--json")):
    """The first N rows; chat rows print as turns."""
    from pipeline.views.inspect_datasets import head

    st, path = _dataset_or_exit(uri)
    rows = _call_or_exit(head, st, path, n)
    if json_:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
        return
    for i, r in enumerate(rows):
        out.rule(f"row {i}" + (f"  {r['prompt_id']}" if "prompt_id" in r else ""))
        msgs = r.get("messages")
        if isinstance(msgs, list):
            for m in msgs:
                out.print(f"[bold cyan]{m['role']}[/]: {m['content']}", highlight=False)
            rest = {k: v for k, v in r.items() if k != "messages"}
        else:
            rest = r
        for k, v in rest.items():
            text = str(v)
            out.print(f"[dim]{k}[/]: {text[:500]}{'…' if len(text) > 500 else ''}", highlight=False)


@datasets_app.command("diff")
def datasets_diff(a: str = typer.Argument(..., help="dataset folder or latest pointer (before)"),
                  b: str = typer.Argument(..., help="dataset folder or latest pointer (after)"),
                  json_: bool = typer.Option(False, "--json")):
    """Rows, added and removed prompt_ids, and the shift of length and pass-rate distributions."""
    from pipeline.views.inspect_datasets import diff

    d = _call_or_exit(diff, _dataset_or_exit(a), _dataset_or_exit(b))
    if json_:
        sys.stdout.write(json.dumps(d, indent=2) + "\n")
        return
    out.print(f"rows {d['rows']['a']} -> {d['rows']['b']} ({d['rows']['delta']:+d})")
    p = d["prompts"]
    out.print(f"prompts {p['a']} -> {p['b']}: {len(p['added'])} added, {len(p['removed'])} removed")
    for label in ("length", "pass_rate"):
        if label in d and d[label]["a"].get("count") and d[label]["b"].get("count"):
            a_, b_ = d[label]["a"], d[label]["b"]
            out.print(f"{label}: mean {a_['mean']:.3f} -> {b_['mean']:.3f}, p50 {a_['p50']} -> {b_['p50']}, "
                      f"p90 {a_['p90']} -> {b_['p90']}")


@datasets_app.command("gc")
def datasets_gc(uri: Optional[str] = typer.Argument(None, help="storage root (default: $DISTILL_ROOT, else .distill)"),
                dry_run: bool = typer.Option(False, "--dry-run", help="list what would go, delete nothing"),
                older_than_hours: float = typer.Option(24.0, "--older-than-hours", help="leave younger files alone"),
                json_: bool = typer.Option(False, "--json")):
    """Delete files no committed record references (failed attempts, unlisted shards) and abort
    stale multipart uploads."""
    from pipeline.store.gc import run_gc

    st, _ = _dataset_or_exit(uri or default_root())
    result = run_gc(st, older_than=older_than_hours * 3600, dry_run=dry_run)
    if json_:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    verb = "would delete" if dry_run else "deleted"
    for f in result["files"]:
        out.print(f"{verb} {f['path']} ({_human(f['bytes'])})", highlight=False)
    for u in result["multipart_uploads"]:
        out.print(f"{'would abort' if dry_run else 'aborted'} multipart upload {u['key']}", highlight=False)
    out.print(f"{verb} {len(result['files'])} file(s), {_human(result['bytes'])}; "
              f"{len(result['multipart_uploads'])} multipart upload(s)")


def _call_or_exit(fn, *args):
    from pipeline.store.storage import StorageError

    try:
        return fn(*args)
    except (StorageError, FileNotFoundError) as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(1)


from pipeline.cli.schedule import register as _register_schedules  # noqa: E402  (distill schedule ..., distill scheduler)

_register_schedules(app)

from pipeline.cli.jobs import register as _register_jobs  # noqa: E402  (distill submit, distill jobs ...)

_register_jobs(app)

from pipeline.cli.report import register as _register_report  # noqa: E402  (distill report)

_register_report(app)

from pipeline.ops.doctor import register as _register_doctor  # noqa: E402  (distill doctor)

_register_doctor(app)


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
