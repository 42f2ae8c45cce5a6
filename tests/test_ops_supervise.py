"""A scheduled local job dies with its lease.

The holder (`distill schedule run-now`) is SIGKILLed while its job runs, Ray included: the job's
whole process tree goes (the supervisor's parent-death signal), a second holder then takes the
lease once it expired, records the first run as abandoned and runs exactly one job. A real job
whose lease is taken over is stopped (status lease_lost) with its tree. Deadlines here are hang
guards, not timings.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, process_tree, still_running

from pipeline.ops.schedule import read_history, runs_of
from pipeline.store.lease import read_lease
from pipeline.store.storage import Storage

# scheduled jobs that start and lose Ray clusters of their own: Ray bounds a node's start at a fixed 30 s, and a
# second shard's load beside it can pass that; tools/run_tests.py runs this file alone
pytestmark = pytest.mark.alone

TTL = 8.0
HANG_GUARD_S = 180


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "RAY_AUTH_MODE": "disabled",
            "DISTILL_KEEP_ENGINES": "0"}


def _config(path, root, seconds: float) -> None:
    path.write_text(f"""
name: slow-nightly
storage: {{root: {root}}}
ray: {{address: local, num_cpus: 1}}
stages:
  clock: {{uses: "slow_clock_stage:SlowClock", params: {{seconds: {seconds}}}}}
""")


def _names(pids: set[int]) -> set[str]:
    out = set()
    for p in pids:
        try:
            with open(f"/proc/{p}/comm") as f:
                out.add(f.read().strip())
        except OSError:
            continue
    return out


def _wait_for_ray(holder: subprocess.Popen) -> set[int]:
    """The holder's tree once the job's Ray (GCS and raylet) is up in it."""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        tree = process_tree(holder.pid)
        if {"gcs_server", "raylet"} <= _names(tree):
            return tree - {holder.pid}
        assert holder.poll() is None, "the holder ended before its job's Ray was up"
        assert time.monotonic() < deadline, "hang guard: the job's Ray never came up"
        time.sleep(0.3)


def _cli(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _add_schedule(cfg) -> None:
    """``distill schedule add`` in this process (typer's test runner): it starts no job, so a
    child Python start-up (~1-2 s here) buys nothing."""
    from typer.testing import CliRunner

    from pipeline.cli.main import app

    r = CliRunner().invoke(app, ["schedule", "add", "n", "--cron", "0 3 * * *", "--config", str(cfg),
                                 "--lease-ttl", str(TTL)])
    assert r.exit_code == 0, r.output + repr(r.exception)


def _event(out: str) -> dict:
    return json.JSONDecoder().raw_decode(out[out.index("{"):])[0]


def test_a_killed_holders_job_goes_too_and_the_next_runs_once(tmp_path):
    root = str(tmp_path / "root")
    cfg = tmp_path / "slow.yaml"
    _config(cfg, root, seconds=600)
    _add_schedule(cfg)
    holder = _cli("schedule", "run-now", "n", "--root", root, start_new_session=True)
    try:
        job = _wait_for_ray(holder)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    # the job's whole tree, Ray included, is gone; TTL + 60 s is a hang guard, not a timing
    assert still_running(job, wait=TTL + 60) == set(), _names(still_running(job, wait=0))

    st = Storage(root)
    _config(cfg, root, seconds=0.5)  # the next run is short
    deadline = time.monotonic() + HANG_GUARD_S
    while True:  # a second holder: skipped while the dead one's lease lives, then it runs
        second = _cli("schedule", "run-now", "n", "--root", root, "--json")
        out, _ = second.communicate(timeout=300)
        event = _event(out)
        if event["event"] == "end":
            break
        assert event["reason"] == "lease_held" and time.monotonic() < deadline, event
        time.sleep(1)
    assert event["status"] == "done", event
    runs = runs_of(read_history(st, "n"))
    assert [r["status"] for r in runs] == ["abandoned", "done"], runs
    assert "took it over" in runs[0]["error_tail"]
    ticks = st.read_dataset(st.strip(event["datasets"]["clock.ticks"])).to_pylist()
    assert [t["run_id"] for t in ticks] == [event["run_id"]]  # exactly one job ran, the second's
    assert read_lease(st, "n")[0]["epoch"] == 2


def test_a_real_job_is_stopped_when_its_lease_is_taken_over(tmp_path):
    """The lease_lost path with a real job (not a fake executor): the holder's renewal fails, it
    stops the job, and the job's tree, Ray included, is gone."""
    from pipeline.store import layout
    from pipeline.store.conditional import conditional_store
    from pipeline.store.lease import _encode

    root = str(tmp_path / "root")
    cfg = tmp_path / "slow.yaml"
    _config(cfg, root, seconds=600)
    _add_schedule(cfg)
    holder = _cli("schedule", "run-now", "n", "--root", root, "--json", start_new_session=True)
    try:
        job = _wait_for_ray(holder)
        st = Storage(root)
        state, etag = read_lease(st, "n")
        conditional_store(st).replace(layout.lease(st, "n"), _encode({**state, "run_id": "thief"}), etag)
        out, _ = holder.communicate(timeout=HANG_GUARD_S)  # hang guard
    finally:
        if holder.poll() is None:
            holder.kill()
    event = _event(out)
    assert event["status"] == "lease_lost" and "thief" in event["error_tail"], event
    assert still_running(job, wait=60) == set()
    assert read_lease(st, "n")[0]["run_id"] == "thief"


# -- the holder's own decisions, with a fake job (no process needed) ------------------------------

def _fake_job(calls: list):
    def execute(sched, run_id, stop):
        calls.append(run_id)
        stop.wait(HANG_GUARD_S)  # runs until stopped; the guard only bounds a broken test
        return (130 if stop.is_set() else 0), ""
    return execute


def test_a_holder_that_cannot_renew_fences_itself(tmp_path, monkeypatch):
    """Renewals fail (the store is unreachable, the lease not lost): the holder stops its job
    before ttl - margin, records self_fenced, and its lease is never taken while the job runs."""
    from pipeline.ops.schedule import Schedule, add_schedule, run_slot
    from pipeline.store.lease import Lease

    st = Storage(str(tmp_path / "root"))
    sched = add_schedule(st, Schedule("s", "0 3 * * *", "cfg.yaml", lease_ttl_s=1.5))

    def unreachable(self, ttl=None):
        raise OSError("store unreachable")

    monkeypatch.setattr(Lease, "renew", unreachable)
    calls: list = []
    event = run_slot(st, sched, None, "run-now", execute=_fake_job(calls))
    assert event["status"] == "self_fenced" and "self-fenced" in event["error_tail"], event
    assert len(calls) == 1
    state = read_lease(st, "s")[0]
    assert state["run_id"] == event["run_id"]  # nobody took it while the job ran...
    assert state["released"] and state["status"] == "self_fenced"  # ...and it was given back once stopped


def test_a_run_past_its_maximum_time_is_stopped(tmp_path):
    from pipeline.ops.schedule import Schedule, add_schedule, run_slot

    st = Storage(str(tmp_path / "root"))
    sched = add_schedule(st, Schedule("s", "0 3 * * *", "cfg.yaml", max_run_s=1.0))
    event = run_slot(st, sched, None, "run-now", execute=_fake_job([]))
    assert event["status"] == "timeout" and "maximum run time of 1s" in event["error_tail"], event
