"""Schedules: two schedulers against one root never overlap a schedule's runs, coalesce missed
slots, record skips and leave a complete history; locally and on (moto) S3. Plus the CLI's
checks and the scheduler's decisions with a fake job (``fake_execute``)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest
from conftest import REPO

from pipeline.ops.schedule import Schedule, Scheduler, add_schedule, read_history, run_due, run_slot, runs_of
from pipeline.store.lease import acquire, read_lease
from pipeline.store.storage import Storage

# schedulers whose jobs start Ray clusters of their own: Ray bounds a node's start at a fixed 30 s, and a
# second shard's load beside it can pass that; tools/run_tests.py runs this file alone
pytestmark = pytest.mark.alone



def _env() -> dict:
    """Read at call time: the S3 fixture sets the AWS variables."""
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "RAY_AUTH_MODE": "disabled",
            "DISTILL_KEEP_ENGINES": "0"}


INTERVAL = 2  # seconds between slots


def _cli(*args, cwd=None, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, env=_env(),
                       cwd=cwd or REPO, timeout=300)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def _cli_here(*args, check=True) -> subprocess.CompletedProcess:
    """The CLI run in this process (typer's test runner), for commands that start no job: the same
    exit code, stdout and stderr as ``_cli``'s child, without a Python start-up each (~1-2 s here)."""
    from typer.testing import CliRunner

    from pipeline.cli.main import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    p = subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr + repr(r.exception)
    return p


def _t(s: str) -> float:
    return datetime.fromisoformat(s).timestamp()


def _slow_config(tmp_path, root: str, seconds: float = 2.0):
    cfg = tmp_path / "slow.yaml"
    cfg.write_text(f"""
name: slow-nightly
storage: {{root: {root}}}
ray: {{address: local, num_cpus: 1}}
stages:
  clock: {{uses: "slow_clock_stage:SlowClock", params: {{seconds: {seconds}}}}}
""")
    return cfg


# S3 only (conditional writes): the lease on a local root is raced in test_lease.py, and the
# scheduler's logic above the lease is the same on both
@pytest.fixture(params=["s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    request.getfixturevalue("moto_s3_bucket")
    return f"s3://distill-test/sched-{tmp_path.name}"


def test_two_schedulers_never_overlap(root, tmp_path):
    cfg = _slow_config(tmp_path, root)
    _cli_here("schedule", "add", "nightly", "--cron", f"* * * * * */{INTERVAL}", "--config", str(cfg),
              "--lease-ttl", "10", "--misfire-grace", "120")
    time.sleep(2.5 * INTERVAL)  # slots pass with no scheduler up: the first run coalesces them
    st = Storage(root)
    logs = [open(tmp_path / f"scheduler-{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "scheduler", "--root", root, "--tick", "0.5"],
                              env=_env(), cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
             for f in logs]
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if sum(e["event"] == "end" for e in read_history(st, "nightly")) >= 2:
                break
            assert all(p.poll() is None for p in procs), "a scheduler died"
            time.sleep(1)
        _cli_here("schedule", "rm", "nightly", "--root", root)  # no new runs; the one in progress finishes
        while time.time() < deadline:
            state = read_lease(st, "nightly")[0]
            if state.get("released") or state["expires"] < time.time():
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(60) for p in procs]
        for f in logs:
            f.close()
    assert codes == [0, 0], [open(f.name).read()[-3000:] for f in logs]

    events = read_history(st, "nightly")
    runs = runs_of(events)
    assert len(runs) >= 2, events
    # the history is complete: every run that started ended, and ended well
    assert [r["status"] for r in runs] == ["done"] * len(runs), runs
    assert all(r["pipeline_status"] == "done" and r["ran"] == ["clock"] for r in runs)
    # never two at once: each run starts after the previous one finished
    for a, b in zip(runs, runs[1:]):
        assert _t(b["started"]) >= _t(a["finished"]), (a, b)
    # each run lasted longer than the interval, and its pipeline run is the fencing id
    assert all(_t(r["finished"]) - _t(r["started"]) > INTERVAL for r in runs)
    for r in runs:
        ticks = st.read_dataset(st.strip(r["datasets"]["clock.ticks"])).to_pylist()
        assert [t["run_id"] for t in ticks] == [r["run_id"]]
    # missed slots coalesced: the first run took the slots that passed before any scheduler was up,
    # and each later run takes every slot since the previous run's, none lost and none run twice
    assert runs[0]["coalesced"] >= 2
    for a, b in zip(runs, runs[1:]):
        assert _t(b["first_slot"]) == _t(a["slot"]) + INTERVAL, (a, b)
        assert b["coalesced"] == round((_t(b["slot"]) - _t(b["first_slot"])) / INTERVAL) + 1
        assert b["coalesced"] >= 2  # a run outlasts the interval, so slots pile up behind it
    # skips recorded, by the scheduler that did not hold the lease
    skips = [e for e in events if e["event"] == "skip"]
    assert skips and {s["reason"] for s in skips} <= {"lease_held", "slot_taken"}
    run_ids = {r["run_id"] for r in runs}
    assert all(s["holder_run_id"] in run_ids for s in skips)
    pids = {str(p.pid) for p in procs}
    assert {e["by"].rsplit(":", 1)[1] for e in events if e["event"] in ("start", "skip")} == pids


# -- the scheduler's decisions, with a fake job ---------------------------------------------------

def fake_execute_factory(seconds: float, calls: list):
    def fake_execute(sched, run_id, stop):
        calls.append(run_id)
        stop.wait(seconds)
        return (130 if stop.is_set() else 0), ""
    return fake_execute


def test_due_slots_coalesce_and_late_ones_misfire(tmp_path):
    st = Storage(str(tmp_path / "root"))
    t0 = 1_800_000_000.0  # a whole minute
    add_schedule(st, Schedule("s", "* * * * * *", "cfg.yaml", created=t0, misfire_grace_s=10))
    calls: list = []
    sched = Scheduler(st, tick=1, execute=fake_execute_factory(0, calls))
    sched.tick(now=t0 + 5.5)
    sched.wait_running()
    (run,) = runs_of(read_history(st, "s"))
    assert (run["status"], run["coalesced"], _t(run["first_slot"]), _t(run["slot"])) == ("done", 5, t0 + 1, t0 + 5)
    sched.tick(now=t0 + 5.9)  # nothing new is due
    sched.wait_running()
    assert len(calls) == 1
    sched.tick(now=t0 + 40)  # 35 slots due, the latest 0 s ago: one run
    sched.wait_running()
    assert runs_of(read_history(st, "s"))[-1]["coalesced"] == 35
    add_schedule(st, Schedule("late", "0 3 * * *", "cfg.yaml", created=t0, misfire_grace_s=60))
    sched.tick(now=t0 + 86400 * 2)  # two nightly slots missed, the latest hours ago: a misfire
    sched.wait_running()
    (skip,) = [e for e in read_history(st, "late") if e["event"] == "skip"]
    assert skip["reason"] == "misfire" and skip["missed"] == 2
    assert runs_of(read_history(st, "late")) == []


def test_run_now_skips_while_a_run_holds_the_lease(tmp_path):
    st = Storage(str(tmp_path / "root"))
    sched = add_schedule(st, Schedule("s", "0 3 * * *", "cfg.yaml"))
    holder = acquire(st, "s", "someone-else", ttl=60)
    event = run_slot(st, sched, None, "run-now", execute=fake_execute_factory(0, []))
    assert event["event"] == "skip" and event["reason"] == "lease_held" and event["holder_run_id"] == "someone-else"
    holder.release()
    event = run_slot(st, sched, None, "run-now", execute=fake_execute_factory(0, []))
    assert event["event"] == "end" and event["status"] == "done"
    assert read_lease(st, "s")[0]["released"]


def test_run_due_runs_each_slot_once_and_not_late(tmp_path):
    """What the CronJob calls: a second start of the same slot (a CronJob firing twice) is a
    recorded skip; a start long after the slot is a misfire."""
    st = Storage(str(tmp_path / "root"))
    t0 = 1_800_000_000.0
    sched = add_schedule(st, Schedule("s", "*/5 * * * *", "cfg.yaml", created=t0 - 3600, misfire_grace_s=120))
    calls: list = []
    first = run_due(st, sched, execute=fake_execute_factory(0, calls), now=t0 + 30)
    assert first["event"] == "end" and first["status"] == "done" and len(calls) == 1
    again = run_due(st, sched, execute=fake_execute_factory(0, calls), now=t0 + 40)
    assert again["event"] == "skip" and again["reason"] == "slot_taken" and len(calls) == 1
    late = run_due(st, sched, execute=fake_execute_factory(0, calls), now=t0 + 290)
    assert late["event"] == "skip" and late["reason"] == "misfire" and len(calls) == 1
    nxt = run_due(st, sched, execute=fake_execute_factory(0, calls), now=t0 + 301)
    assert nxt["event"] == "end" and len(calls) == 2
    (start,) = [e for e in read_history(st, "s") if e["event"] == "start" and e["run_id"] == nxt["run_id"]]
    assert _t(start["slot"]) == t0 + 300 and start["coalesced"] == 1


def test_lost_lease_stops_the_job_with_a_fake_executor(tmp_path):
    """The scheduler's decision with a fake job (``fake_execute``): a holder whose lease is taken
    over stops its job and records lease_lost. A real job stopped on lease loss, Ray included:
    tests/test_ops_supervise.py."""
    st = Storage(str(tmp_path / "root"))
    sched = add_schedule(st, Schedule("s", "0 3 * * *", "cfg.yaml", lease_ttl_s=0.6))

    def thief():
        while True:
            time.sleep(0.05)
            state = read_lease(st, "s")
            if state and state[0]["run_id"] != "thief":
                break
        # take it over with a forged expired state: the holder's next renewal must fail
        from pipeline.store import layout
        from pipeline.store.conditional import conditional_store
        from pipeline.store.lease import _encode
        conditional_store(st).replace(layout.lease(st, "s"), _encode({**state[0], "run_id": "thief"}), state[1])

    t = threading.Thread(target=thief)
    t.start()
    calls: list = []
    event = run_slot(st, sched, None, "run-now", execute=fake_execute_factory(30, calls))
    t.join()
    assert event["status"] == "lease_lost" and "thief" in event["error_tail"]
    assert read_lease(st, "s")[0]["run_id"] == "thief"


def test_cli_checks_and_ls(tmp_path):
    cfg = _slow_config(tmp_path, str(tmp_path / "root"), seconds=0)
    # in this process: every command here but run-now (whose job is a child that needs tests/ on
    # its PYTHONPATH, which _cli sets)
    p = _cli_here("schedule", "add", "x", "--cron", "61 * * * *", "--config", str(cfg), check=False)
    assert p.returncode == 2 and "cron '61 * * * *'" in p.stderr
    p = _cli_here("schedule", "add", "x", "--cron", "0 3 * * *", "--tz", "Mars/Olympus", "--config", str(cfg),
                  check=False)
    assert p.returncode == 2 and "tz 'Mars/Olympus'" in p.stderr
    p = _cli_here("schedule", "add", "x", "--cron", "0 3 * * *", "--config", str(tmp_path / "missing.yaml"), check=False)
    assert p.returncode == 2 and "missing.yaml" in p.stderr
    _cli_here("schedule", "add", "x", "--cron", "0 3 * * *", "--tz", "Europe/Paris", "--config", str(cfg))
    p = _cli_here("schedule", "add", "x", "--cron", "0 4 * * *", "--config", str(cfg), check=False)
    assert p.returncode == 2 and "already exists" in p.stderr
    root = str(tmp_path / "root")
    p = _cli("schedule", "run-now", "x", "--root", root)
    assert "done" in p.stdout
    (row,) = json.loads(_cli_here("schedule", "ls", "--root", root, "--json").stdout)
    assert row["last_status"] == "done" and "clock.ticks" in row["last_datasets"]
    nxt = datetime.fromisoformat(row["next_run"])
    assert nxt.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Paris")).hour == 3
    hist = json.loads(_cli_here("schedule", "history", "x", "--root", root, "--json").stdout)
    assert [e["event"] for e in hist] == ["start", "end"]
    p = _cli_here("schedule", "run-now", "nope", "--root", root, check=False)
    assert p.returncode == 1 and "no schedule 'nope'" in p.stderr


def test_stopping_a_scheduler_interrupts_its_run_and_records_it(tmp_path):
    """SIGTERM (a pod being stopped): the job's whole process group goes, the history gets its
    end event (interrupted) and the lease is released for the next scheduler."""
    from conftest import process_tree, still_running

    root = str(tmp_path / "root")
    cfg = _slow_config(tmp_path, root, seconds=120)
    _cli_here("schedule", "add", "long", "--cron", "* * * * * *", "--config", str(cfg))
    st = Storage(root)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "scheduler", "--root", root, "--tick", "0.5"],
                            env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:  # until the job's own Ray (GCS and raylet) runs in the tree: not a snapshot too early
            job = process_tree(proc.pid) - {proc.pid}
            names = set()
            for p in job:
                try:
                    names.add(open(f"/proc/{p}/comm").read().strip())
                except OSError:
                    pass
            if {"gcs_server", "raylet"} <= names:
                break
            assert proc.poll() is None, "the scheduler died"
            assert time.time() < deadline, "hang guard (not a timing): the job's Ray never came up in 240 s"
            time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(90)
    assert code == 0
    assert still_running(job) == set()
    (run,) = runs_of(read_history(st, "long"))
    assert run["status"] == "interrupted" and run["finished"]
    state = read_lease(st, "long")[0]
    assert state["released"] and state["status"] == "interrupted"
