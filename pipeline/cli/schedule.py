"""``distill schedule add|ls|rm|run-now|history`` and ``distill scheduler``."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Optional

import typer
from rich.table import Table

from pipeline.cli.common import RootOpt, console, fail, load, out, storage
from pipeline.ops.schedule import (Schedule, ScheduleError, Scheduler, add_schedule, get_schedule, list_schedules,
                                   remove_schedule, run_due, run_slot, runs_of)
from pipeline.store.history import iso, read_history
from pipeline.store.storage import Storage

schedule_app = typer.Typer(no_args_is_help=True, help="Cron schedules of pipeline runs, kept in the storage root.")

def _fail(e: Exception, code: int = 2):
    fail(e, code)


def _stop_on_signals() -> threading.Event:
    """SIGTERM/SIGINT (a pod being stopped, Ctrl-C) stop the running job and record it as interrupted."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


@schedule_app.command("add")
def add(name: str = typer.Argument(..., help="schedule name"),
        cron: str = typer.Option(..., "--cron", help="cron expression: 5 fields, or 6 with seconds last"),
        config: str = typer.Option(..., "--config", help="pipeline YAML the schedule runs"),
        address: Optional[str] = typer.Option(None, "--address", help="Ray address: submit each run as a Ray job"),
        tz: str = typer.Option("UTC", "--tz", help="time zone of the cron expression, e.g. Europe/Paris"),
        misfire_grace: float = typer.Option(3600.0, "--misfire-grace", help="seconds a late slot may still run"),
        lease_ttl: float = typer.Option(300.0, "--lease-ttl", help="seconds the run lease lives between renewals"),
        replace: bool = typer.Option(False, "--replace", help="overwrite a schedule of this name"),
        max_run: Optional[float] = typer.Option(None, "--max-run", help="seconds a run may last; longer ones are "
                                                "stopped (status timeout)"),
        workdir: Optional[str] = typer.Option(None, "--workdir", help="where runs start (default: the current "
                                              "folder; the config's relative paths are relative to it)"),
        root: Optional[str] = typer.Option(None, "--root", help="storage root (default: the config's)")):
    """Add a schedule (to the config's storage root unless --root is given)."""
    cfg = load(config)
    st = Storage(root or cfg.storage.root)
    try:
        wd = os.path.abspath(workdir or os.getcwd())
        cfg_path = os.path.abspath(config)
        # relative to the working directory when inside it, so a pod or node with the same tree
        # under another path (a CronJob's image) finds it
        rel = os.path.relpath(cfg_path, wd)
        s = add_schedule(st, Schedule(name, cron, cfg_path if rel.startswith("..") else rel, address, tz,
                                      misfire_grace, lease_ttl, workdir=wd, max_run_s=max_run), replace=replace)
    except ScheduleError as e:
        _fail(e)
    out.print(f"schedule {s.name}: {s.cron} ({s.tz}) runs {s.config}"
              f"{' on ' + s.address if s.address else ' locally'}; next {iso(s.next_fire(time.time()))}",
              highlight=False)


def _last(st: Storage, name: str) -> dict:
    runs = runs_of(read_history(st, name))
    return runs[-1] if runs else {}


@schedule_app.command("ls")
def ls(root: Optional[str] = RootOpt, json_: bool = typer.Option(False, "--json")):
    """Schedules with their next run, last run, last status and last datasets."""
    st = storage(root)
    rows = []
    now = time.time()
    for s in list_schedules(st):
        last = _last(st, s.name)
        rows.append({"name": s.name, "cron": s.cron, "tz": s.tz, "config": s.config, "address": s.address,
                     "next_run": iso(s.next_fire(now)), "last_run": last.get("started"),
                     "last_status": last.get("status"), "last_summary": last.get("summary"),
                     "last_datasets": last.get("datasets") or {}})
    if json_:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table()
    for col in ("name", "cron", "next run", "last run", "last status", "last datasets"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], f"{r['cron']} ({r['tz']})", r["next_run"], r["last_run"] or "-",
                      r["last_status"] or "-", "\n".join(f"{k}: {v}" for k, v in r["last_datasets"].items()) or "-")
    out.print(table)


@schedule_app.command("rm")
def rm(name: str = typer.Argument(...), root: Optional[str] = RootOpt):
    """Remove a schedule (its history stays readable)."""
    try:
        remove_schedule(storage(root), name)
    except ScheduleError as e:
        _fail(e, 1)
    out.print(f"removed schedule {name}")


@schedule_app.command("run-now")
def run_now(name: str = typer.Argument(...), root: Optional[str] = RootOpt,
            due: bool = typer.Option(False, "--due", help="run the latest cron slot, only if no run took it yet "
                                     "(what a Kubernetes CronJob should call: a second start of a slot is a skip)"),
            json_: bool = typer.Option(False, "--json")):
    """Run a schedule now, under its lease: skipped (exit 0, recorded) while another run holds it."""
    st = storage(root)
    try:
        s = get_schedule(st, name)
    except ScheduleError as e:
        _fail(e, 1)
    stop = _stop_on_signals()
    event = run_due(st, s, stop=stop) if due else run_slot(st, s, None, "run-now", stop=stop)
    if json_:
        sys.stdout.write(json.dumps(event, indent=2) + "\n")
    elif event["event"] == "skip":
        out.print(f"skipped {name}: {event['detail']}", highlight=False)
    else:
        out.print(f"run {event['run_id']}: {event['status']} in {event['seconds']:.1f}s; {event.get('summary', '')}",
                  highlight=False)
        for k, v in (event.get("datasets") or {}).items():
            out.print(f"  {k}: {v}", highlight=False)
    if event["event"] == "end" and event["status"] != "done":
        if event.get("error_tail"):
            console.print(event["error_tail"], highlight=False, markup=False)
        raise typer.Exit(1)


@schedule_app.command("history")
def history(name: str = typer.Argument(...), root: Optional[str] = RootOpt, json_: bool = typer.Option(False, "--json")):
    """Every run (start, end, status, what was new) and every skipped slot, oldest first."""
    events = read_history(storage(root), name)
    if json_:
        sys.stdout.write(json.dumps(events, indent=2) + "\n")
        return
    if not events:
        _fail(ScheduleError(f"no history for schedule {name!r}"), 1)
    table = Table(title=f"schedule {name}")
    for col in ("event", "slot", "run", "started", "finished", "status", "detail"):
        table.add_column(col, overflow="fold")
    for r in runs_of(events):
        extra = f"{r.get('coalesced', 1)} slot(s) coalesced; " if (r.get("coalesced") or 1) > 1 else ""
        table.add_row("run", r.get("slot") or "-", r["run_id"], r.get("started") or "-", r.get("finished") or "-",
                      r.get("status") or "-", extra + (r.get("summary") or ""))
    for e in events:
        if e["event"] == "skip":
            table.add_row("skip", e.get("slot") or "-", e.get("holder_run_id") or "-", e["at"], "-", e["reason"],
                          e.get("detail") or "")
    out.print(table)


def scheduler(root: Optional[str] = RootOpt,
              once: bool = typer.Option(False, "--once", help="start what is due, wait for it, exit"),
              tick: float = typer.Option(10.0, "--tick", help="seconds between looks at the schedules"),
              verbose: bool = typer.Option(False, "-v", "--verbose")):
    """Run the schedules under a storage root; any number of schedulers may watch one root."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(message)s")
    from pipeline.ops.doctor import StoreUnsafe, require_safe_store

    st = storage(root)
    try:
        require_safe_store(st)  # leases are only as safe as the store's conditional writes
    except StoreUnsafe as e:
        _fail(e)
    s = Scheduler(st, tick=tick)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: s.stop.set())
    s.serve(once=once)


def register(app: typer.Typer) -> None:
    app.add_typer(schedule_app, name="schedule")
    app.command("scheduler")(scheduler)
