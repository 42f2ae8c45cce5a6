"""``distill submit`` and ``distill jobs ls|status|logs|stop``: pipelines as Ray jobs."""
from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.table import Table

from pipeline.cli.common import SetOpt, console, fail, out
from pipeline.ops.jobs import (MAX_FILE_BYTES, TERMINAL, ConfigProblem, JobsClient, JobsError, job_record, prepare,
                               resolve_address, submit)

jobs_app = typer.Typer(no_args_is_help=True, help="Distill jobs on a Ray cluster (Ray Jobs API).")

AddressOpt = typer.Option(None, "--address", help="the head's Jobs API URL, http://HEAD:8265 (RAY_ADDRESS is not used)")
ConfigAddrOpt = typer.Option(None, "--config", help="take the address from this config's ray.address")
JsonOpt = typer.Option(False, "--json", help="machine-readable output")


def _fail(e: Exception) -> None:
    fail(e, getattr(e, "code", 1), "config error" if isinstance(e, ConfigProblem) else "error")


def _detached(job: str, address: str) -> None:
    console.print(f"\nstopped watching {job}; the job goes on (`distill jobs stop {job} --address {address}` "
                  "ends it)", highlight=False, soft_wrap=True)
    raise typer.Exit(130)


def _signals_interrupt() -> None:
    """SIGTERM and SIGHUP (a supervisor or pod stopping this command) interrupt like Ctrl-C."""
    import signal

    def interrupt(*_):
        raise KeyboardInterrupt()

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def _stop_job(client: JobsClient, job: str, why: str) -> None:
    """Stop the Ray job (``--stop-on-exit``), retrying for a while: the Jobs API may be what failed."""
    import time

    deadline = time.monotonic() + 60
    while True:
        try:
            client.stop(job)
            status = client.wait(job, timeout=60, poll=0.5)
            console.print(f"stopped job {job} ({status}): {why}", highlight=False, soft_wrap=True)
            return
        except (JobsError, KeyboardInterrupt) as e:
            if time.monotonic() > deadline:
                console.print(f"could not stop job {job} ({why}): {e}", highlight=False, soft_wrap=True)
                return
            time.sleep(2)


def _target(address: Optional[str], config: Optional[str]):
    """The Jobs API address (``--address``, else the config's ``ray.address``), said on stderr with
    a warning for plain http to another host."""
    _quiet_ray()
    target = resolve_address(address, config)
    console.print(f"using {target.describe()}", highlight=False, soft_wrap=True)
    if target.plain_http_warning():
        console.print(target.plain_http_warning(), highlight=False, soft_wrap=True, markup=False)
    return target


def _client(address: Optional[str], config: Optional[str]) -> JobsClient:
    try:
        return JobsClient(_target(address, config))
    except JobsError as e:
        _fail(e)
        raise  # unreachable


def _quiet_ray() -> None:
    """Ray's SDK logs each upload step at INFO; keep its warnings only."""
    import logging

    logging.getLogger("ray").setLevel(logging.WARNING)


def _json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def submit_cmd(
    config: str = typer.Argument(..., help="pipeline YAML, inside the working directory"),
    address: Optional[str] = AddressOpt,
    set_: Optional[list[str]] = SetOpt,
    run_id: Optional[str] = typer.Option(None, "--run-id", help="run id (default: time-pipeline-random); "
                                         "the job's submission id is distill-PIPELINE-RUN_ID"),
    rerun: bool = typer.Option(False, "--rerun", help="if a job with this id exists, submit it again as RUN_ID-r2, -r3, ..."),
    wait: bool = typer.Option(False, "--wait", help="wait for the job to end; exit 1 unless it SUCCEEDED"),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="with --wait: give up after this many seconds"),
    working_dir: Optional[str] = typer.Option(None, "--working-dir", help="folder shipped as the job's working_dir "
                                              "(default: the current one)"),
    python: str = typer.Option("python", "--python", help="python on the cluster that has distill installed"),
    max_file_mb: float = typer.Option(MAX_FILE_BYTES / 2**20, "--max-file-mb", help="leave out larger files"),
    stop_on_exit: bool = typer.Option(False, "--stop-on-exit", help="with --wait: stop the Ray job when this "
                                      "command is stopped (SIGTERM, SIGINT, SIGHUP), times out or loses the Jobs API "
                                      "(what a schedule's holder runs, so the job dies with its lease)"),
    json_: bool = JsonOpt,
):
    """Submit a pipeline as a Ray job: `distill run` on the cluster, writing to the config's storage root."""
    try:
        target = _target(address, None if address else config)
        sub = prepare(config, target, set_, run_id, working_dir, python, int(max_file_mb * 2**20))
        client = JobsClient(target)
        sub = submit(client, sub, rerun=rerun)
    except JobsError as e:
        _fail(e)
        return
    for path, size in sub.excluded_large:
        console.print(f"left out {path} ({size / 2**20:.1f} MiB > {max_file_mb:g} MiB)", highlight=False, soft_wrap=True)
    result = sub.to_json()
    if not json_:
        if sub.replaces:
            out.print(f"rerun of {sub.replaces['submission_id']} ({sub.replaces['status']})", highlight=False, soft_wrap=True)
        out.print(f"submitted job {sub.submission_id}", highlight=False, soft_wrap=True)
        out.print(f"dashboard: {sub.dashboard_url}", highlight=False, soft_wrap=True)
        out.print(f"run manifest (when done): {sub.manifest_uri()}", highlight=False, soft_wrap=True)
    if wait:
        if stop_on_exit:
            _signals_interrupt()
        try:
            status = client.wait(sub.submission_id, timeout=timeout,
                                 on_status=lambda s: console.print(f"{sub.submission_id}: {s}", highlight=False))
        except JobsError as e:
            if stop_on_exit:
                _stop_job(client, sub.submission_id, f"{e}")
            _fail(e)
            return
        except KeyboardInterrupt:
            if stop_on_exit:
                _stop_job(client, sub.submission_id, "this command was stopped")
                raise typer.Exit(143)
            _detached(sub.submission_id, client.address.url)
        result["status"] = status
        if not json_:
            out.print(f"job {sub.submission_id} {status}", highlight=False, soft_wrap=True)
    if json_:
        _json(result)
    if wait and result["status"] != "SUCCEEDED":
        raise typer.Exit(1)


@jobs_app.command("ls")
def jobs_ls(address: Optional[str] = AddressOpt, config: Optional[str] = ConfigAddrOpt, json_: bool = JsonOpt):
    """Distill jobs on the cluster (jobs tagged distill in their metadata), oldest first."""
    client = _client(address, config)
    try:
        jobs = [job_record(j) for j in client.list()]
    except JobsError as e:
        _fail(e)
        return
    if json_:
        _json(jobs)
        return
    table = Table()
    for col in ("job", "status", "pipeline", "run", "start", "end"):
        table.add_column(col, overflow="fold")
    for j in jobs:
        color = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow"}.get(j["status"], "cyan")
        table.add_row(j["submission_id"], f"[{color}]{j['status']}[/]", j["pipeline"] or "-", j["run_id"] or "-",
                      j["start"] or "-", j["end"] or "-")
    out.print(table)


@jobs_app.command("status")
def jobs_status(job: str = typer.Argument(..., help="submission id"), address: Optional[str] = AddressOpt,
                config: Optional[str] = ConfigAddrOpt, json_: bool = JsonOpt):
    """A job's status, message, times and where its run manifest goes."""
    client = _client(address, config)
    try:
        rec = job_record(client.info(job))
    except JobsError as e:
        _fail(e)
        return
    if rec["storage_root"] and rec["run_id"]:
        rec["run_manifest"] = f"{rec['storage_root'].rstrip('/')}/runs/{rec['run_id']}/manifest.json"
    rec["dashboard_url"] = f"{client.address.url}/#/jobs/{job}"
    if json_:
        _json(rec)
        return
    for key in ("submission_id", "status", "message", "pipeline", "run_id", "start", "end", "run_manifest",
                "dashboard_url"):
        if rec.get(key):
            out.print(f"{key}: {rec[key]}", highlight=False, soft_wrap=True)


@jobs_app.command("logs")
def jobs_logs(job: str = typer.Argument(..., help="submission id"), address: Optional[str] = AddressOpt,
              config: Optional[str] = ConfigAddrOpt,
              follow: bool = typer.Option(False, "--follow", "-f", help="stream until the job ends"),
              json_: bool = JsonOpt):
    """The job's driver output (the `distill run` on the cluster)."""
    client = _client(address, config)
    try:
        if follow and not json_:
            def write(chunk: str) -> None:
                sys.stdout.write(chunk)
                sys.stdout.flush()

            try:
                status = client.follow(job, write)
            except KeyboardInterrupt:
                _detached(job, client.address.url)
            console.print(f"job {job} {status}", highlight=False, soft_wrap=True)
            return
        if follow:
            chunks: list[str] = []
            status = client.follow(job, chunks.append)
            _json({"submission_id": job, "status": status, "logs": "".join(chunks)})
            return
        logs = client.logs(job)
    except JobsError as e:
        _fail(e)
        return
    if json_:
        _json({"submission_id": job, "status": job_record(client.info(job))["status"], "logs": logs})
    else:
        sys.stdout.write(logs)


@jobs_app.command("stop")
def jobs_stop(job: str = typer.Argument(..., help="submission id"), address: Optional[str] = AddressOpt,
              config: Optional[str] = ConfigAddrOpt,
              wait: bool = typer.Option(True, "--wait/--no-wait", help="wait until the job has ended"),
              json_: bool = JsonOpt):
    """Stop a running job (its `distill run` is interrupted; finished stages stay committed)."""
    client = _client(address, config)
    try:
        was_running = client.stop(job)
        status = client.wait(job, timeout=60, poll=0.5) if wait and was_running else job_record(client.info(job))["status"]
    except JobsError as e:
        _fail(e)
        return
    if json_:
        _json({"submission_id": job, "stopped": was_running, "status": status})
    elif was_running:
        out.print(f"stopped job {job} ({status})", highlight=False, soft_wrap=True)
    else:
        out.print(f"job {job} was not running ({status})", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("submit")(submit_cmd)
    app.add_typer(jobs_app, name="jobs")


__all__ = ["register", "jobs_app", "TERMINAL"]
