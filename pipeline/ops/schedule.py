"""Schedules: pipeline runs on a cron, at most one at a time, with their history in storage.

Everything lives under the storage root (local or ``s3://``), so a team shares it and any
number of schedulers (or Kubernetes CronJob pods) can watch one root (paths from
:mod:`pipeline.store.layout`)::

    schedules/<name>/schedule.json                     cron, timezone, config, address, grace, lease TTL
    schedules/<name>/history/<time>-<run>.start.json   a run began: slot, coalesced slots, trigger
    schedules/<name>/history/<time>-<run>.end.json     it ended: status, exit code, datasets, what was new
    schedules/<name>/history/<time>-<id>.skip.json     a slot not run, and why (lease held, slot taken, misfire)
    leases/<name>                                      the run lease (pipeline.store.lease)

History events are append-only: each is its own object, written with an exclusive create.

**Slots.** Cron expressions are parsed by croniter: five fields, or six where the sixth is
seconds (croniter's order), evaluated in the schedule's time zone. A scheduler looks for the
slots due since the last slot run (kept in the lease, so every scheduler sees it); several
due slots coalesce into one run of the latest, provided it is not older than the misfire
grace window (else it is recorded as a ``misfire`` skip).

**Exclusivity.** A run first takes the lease for its slot (:func:`pipeline.store.lease.acquire`):
a live lease (another run in progress) or a slot already run makes it record a ``skip``
instead. While the job runs the lease is renewed every third of its TTL; a renewal that
fails (the lease was lost) stops the job. The lease is released when the job ends.

**The job dies with its lease.** A holder that cannot renew before ``ttl - margin`` (a paused
or partitioned one) stops its job itself (``self_fenced``); a run longer than the schedule's
``max_run_s`` is stopped (``timeout``). A local job runs under :mod:`pipeline.ops.supervise`, which
kills its whole process tree, Ray included, when the holder dies (parent-death signal) or the
lease is no longer live by the store's clock, so a SIGKILLed scheduler leaves no orphan. The next
holder records the run it took the lease from as ``abandoned`` when that run has no end event.
The job gets ``DISTILL_FENCE`` (lease name, fencing epoch, run id): the pointers the run
publishes refuse to go back to an older epoch (see :func:`pipeline.store.lease.fenced_put`).

**The job.** Locally ``python -m pipeline.cli run CONFIG --run-id ID`` in a subprocess (its own
process group, so a crash never takes the scheduler down), in the schedule's working directory
(where it was added: a config's relative paths are relative to it); with an ``address``,
``distill submit CONFIG --address URL --run-id ID --wait`` (a Ray job). The run id is the
lease's fencing id and the pipeline run's id, so the end event reads the run manifest to
record which datasets it published and whether anything was new.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from pipeline.core.ids import new_run_id
from pipeline.store import layout
from pipeline.store.conditional import ConditionalWriteError
from pipeline.store.history import fresh_ls, iso, read_history, record
from pipeline.store.lease import LeaseHeld, LeaseLost, SlotTaken, acquire, is_live, read_lease
from pipeline.store.storage import AlreadyCommitted, Storage

log = logging.getLogger("distill.schedule")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
MAX_COUNTED_SLOTS = 10_000


class ScheduleError(ValueError):
    """A bad schedule definition or a missing schedule; the message names the field."""


@dataclass
class Schedule:
    name: str
    cron: str
    config: str
    address: str | None = None
    tz: str = "UTC"
    misfire_grace_s: float = 3600.0
    lease_ttl_s: float = 300.0
    created: float = field(default_factory=time.time)
    workdir: str | None = None  # where the job runs: a config's relative paths are relative to it
    max_run_s: float | None = None  # a run that lasts longer is stopped (status "timeout")

    def validate(self) -> "Schedule":
        types = {"name": str, "cron": str, "config": str, "tz": str, "address": (str, type(None)),
                 "workdir": (str, type(None)), "misfire_grace_s": (int, float), "lease_ttl_s": (int, float),
                 "created": (int, float), "max_run_s": (int, float, type(None))}
        for key, want in types.items():
            value = getattr(self, key)
            if not isinstance(value, want) or isinstance(value, bool):
                raise ScheduleError(f"schedule {self.name!r}: {key}: {value!r} is not a "
                                    f"{getattr(want, '__name__', None) or ' or '.join(t.__name__ for t in want)}")
        if not NAME_RE.match(self.name):
            raise ScheduleError(f"schedule name {self.name!r}: use letters, digits, '_', '.', '-' (at most 100)")
        if not croniter.is_valid(self.cron):
            raise ScheduleError(f"schedule {self.name!r}: cron {self.cron!r} is not a valid cron expression "
                                "(5 fields, or 6 with seconds last)")
        try:
            ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ScheduleError(f"schedule {self.name!r}: tz {self.tz!r} is not a known time zone") from e
        if self.misfire_grace_s <= 0 or self.lease_ttl_s <= 0:
            raise ScheduleError(f"schedule {self.name!r}: misfire_grace_s and lease_ttl_s must be positive")
        if self.max_run_s is not None and self.max_run_s <= 0:
            raise ScheduleError(f"schedule {self.name!r}: max_run_s must be positive")
        if self.address:
            from pipeline.ops.jobs import JobsError, resolve_address

            try:
                resolve_address(self.address)
            except JobsError as e:
                raise ScheduleError(f"schedule {self.name!r}: address: {e}") from None
        return self

    # -- slots -------------------------------------------------------------
    def _iter(self, start: float) -> croniter:
        return croniter(self.cron, datetime.fromtimestamp(start, ZoneInfo(self.tz)))

    def next_fire(self, now: float) -> float:
        """The first slot strictly after ``now``."""
        return self._iter(now).get_next(float)

    def due(self, after: float, now: float) -> tuple[float | None, float | None, int]:
        """The slots in ``(after, now]``: (first, latest, count); count stops at MAX_COUNTED_SLOTS."""
        it = self._iter(after)
        first = latest = None
        count = 0
        while count < MAX_COUNTED_SLOTS:
            t = it.get_next(float)
            if t > now:
                break
            first = t if first is None else first
            latest, count = t, count + 1
        if count >= MAX_COUNTED_SLOTS:  # too many to walk: take the latest directly
            latest = self._iter(now + 1e-3).get_prev(float)
        return first, latest, count


# -- the schedule store ---------------------------------------------------------------------------


def add_schedule(st: Storage, sched: Schedule, replace: bool = False) -> Schedule:
    sched.validate()
    path = layout.schedule_file(st, sched.name)
    try:
        st.write_json(path, asdict(sched), exclusive=not replace)
    except AlreadyCommitted as e:
        raise ScheduleError(f"schedule {sched.name!r} already exists (use --replace)") from e
    return sched


class NoSchedule(ScheduleError):
    """There is no schedule of that name (it may have been removed: its history stays)."""


def get_schedule(st: Storage, name: str) -> Schedule:
    """The schedule, validated as ``schedule add`` validates it: a ``schedule.json`` that anyone
    with write access to the storage changed is refused with the file and field named."""
    if not NAME_RE.match(name):
        raise ScheduleError(f"schedule name {name!r}: use letters, digits, '_', '.', '-' (at most 100)")
    path = layout.schedule_file(st, name)
    try:
        data = st.read_json(path)
    except FileNotFoundError as e:
        raise NoSchedule(f"no schedule {name!r} under {st.uri(layout.schedules_root(st))}") from e
    except ValueError as e:
        raise ScheduleError(f"{st.uri(path)}: not JSON ({e})") from None
    where = st.uri(path)
    if not isinstance(data, dict):
        raise ScheduleError(f"{where}: not a JSON object")
    known = Schedule.__dataclass_fields__
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ScheduleError(f"{where}: unknown field(s) {', '.join(unknown)}")
    missing = sorted(k for k in ("name", "cron", "config") if k not in data)
    if missing:
        raise ScheduleError(f"{where}: missing field(s) {', '.join(missing)}")
    if data["name"] != name:
        raise ScheduleError(f"{where}: name: {data['name']!r} is not the schedule's folder name {name!r}")
    try:
        return Schedule(**data).validate()
    except ScheduleError as e:
        raise ScheduleError(f"{where}: {e}") from None


def list_schedules(st: Storage) -> list[Schedule]:
    """Every valid schedule; an invalid one is logged (file and field) and left out."""
    out = []
    for p in fresh_ls(st, layout.schedules_root(st)):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        try:
            out.append(get_schedule(st, name))
        except NoSchedule:
            continue  # removed: only its history remains
        except ScheduleError as e:
            log.error("schedule %s is not run: %s", name, e)
    return sorted(out, key=lambda s: s.name)


def remove_schedule(st: Storage, name: str) -> None:
    """Delete the schedule; its history and lease stay (``history NAME`` still reads them)."""
    path = layout.schedule_file(st, name)
    if not st.exists(path):
        raise ScheduleError(f"no schedule {name!r} under {st.uri(layout.schedules_root(st))}")
    st.fs.rm(path)


# -- history --------------------------------------------------------------------------------------

def runs_of(events: list[dict]) -> list[dict]:
    """One row per run: its start event merged with its end event (``status: running`` if none)."""
    runs: dict[str, dict] = {}
    for e in events:
        if e["event"] == "start":
            runs[e["run_id"]] = {**e, "status": "running", "finished": None}
        elif e["event"] == "end":
            runs.setdefault(e["run_id"], {"run_id": e["run_id"]}).update(
                {k: v for k, v in e.items() if k not in ("event", "at")})
    return sorted(runs.values(), key=lambda r: r.get("started") or "")


# -- running one slot ----------------------------------------------------------------------------

def job_command(sched: Schedule, run_id: str) -> list[str]:
    if sched.address:
        return [sys.executable, "-m", "pipeline.cli", "submit", sched.config, "--address", sched.address,
                "--run-id", run_id, "--wait", "--stop-on-exit"]
    return [sys.executable, "-m", "pipeline.cli", "run", sched.config, "--run-id", run_id]


def summarize_run(st: Storage, run_id: str) -> dict:
    """What a pipeline run did, from its manifest: datasets published, stages run or cached,
    and whether anything was new."""
    try:
        m = st.read_json(layout.run_manifest(st, run_id))
    except FileNotFoundError:
        return {"manifest": None}
    stages = m.get("stages", [])
    ran = [s["name"] for s in stages if s.get("status") == "done"]
    cached = [s["name"] for s in stages if s.get("status") == "cached"]
    datasets = {f"{s['name']}.{o}": uri for s in stages for o, uri in (s.get("output") or {}).items()}
    engines = sum(1 for s in stages if s.get("status") == "done" and "engine_startup_seconds" in (s.get("metrics") or {}))
    if stages and not ran and m.get("status") == "done":
        what = "nothing new: every stage was cached, no engine or Ray started"
    else:
        what = f"ran {', '.join(ran) or 'nothing'}; cached {', '.join(cached) or 'nothing'}"
    return {"manifest": st.uri(layout.run_manifest(st, run_id)), "pipeline_status": m.get("status"),
            "ran": ran, "cached": cached, "engines_started": engines, "datasets": datasets,
            "rows": {s["name"]: s.get("rows") for s in stages if s.get("status") == "done"}, "summary": what,
            **({"fencing_refused": m["fencing_refused"]} if m.get("fencing_refused") else {})}


def _kill_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Stop(threading.Event):
    """Set to interrupt running jobs (a scheduler shutting down)."""


class _Watch:
    """The threads beside a running job: one renews the lease (and fences the job off before the
    lease could expire unrenewed), one stops the job on a scheduler stop or past ``max_run_s``.
    ``job_stop`` is set when the job must stop; ``lost`` and ``ended`` say why."""

    def __init__(self, sched: Schedule, lease, stop: threading.Event, started: float):
        self.sched, self.lease, self.stop, self.started = sched, lease, stop, started
        self.job_stop = threading.Event()
        self.lost: list[str] = []
        self.ended: list[str] = []  # "self_fenced" or "timeout"
        self.threads = [threading.Thread(target=self._renew, daemon=True),
                        threading.Thread(target=self._watch_stop, daemon=True)]

    def _renew(self) -> None:
        ttl = self.sched.lease_ttl_s
        margin, wait, last_ok = ttl / 5, ttl / 3, time.monotonic()  # last_ok: when the last write that succeeded began
        while not self.job_stop.wait(wait):
            began = time.monotonic()
            try:
                self.lease.renew()
                last_ok, wait = began, ttl / 3
            except LeaseLost as e:
                self.lost.append(str(e))
                self.job_stop.set()
            except Exception as e:  # a storage hiccup: retry soon, and fence ourselves before expiry
                log.warning("renewing lease of %s: %s", self.sched.name, e)
                wait = max(0.05, ttl / 15)
            if not self.job_stop.is_set() and time.monotonic() - last_ok >= ttl - margin:
                self.ended.append("self_fenced")
                self.lost.append(f"self-fenced: the lease of {self.sched.name!r} could not be renewed for "
                                 f"{time.monotonic() - last_ok:.1f}s (ttl {ttl:g}s - margin {margin:g}s); "
                                 "the job was stopped before anyone else could take the lease")
                self.job_stop.set()

    def _watch_stop(self) -> None:
        while not self.job_stop.is_set():
            if self.stop.wait(0.2):
                self.job_stop.set()
            elif self.sched.max_run_s is not None and time.time() - self.started > self.sched.max_run_s:
                self.ended.append("timeout")
                self.job_stop.set()

    def run(self, job: Callable[[], tuple[int, str]]) -> tuple[str, int | None, str]:
        """Run ``job`` with the threads beside it; (status, exit code, output tail)."""
        for t in self.threads:
            t.start()
        status, code, tail = "failed", None, ""
        try:
            code, tail = job()
            status = "done" if code == 0 else "failed"
        except Exception as e:  # the job could not even start
            tail = f"{type(e).__name__}: {e}"
        finally:
            interrupted = self.job_stop.is_set()
            self.job_stop.set()
            for t in self.threads:
                t.join()
        if "self_fenced" in self.ended:
            return "self_fenced", code, self.lost[0]
        if self.lost:
            return "lease_lost", code, self.lost[0]
        if "timeout" in self.ended and status != "done":
            return "timeout", code, f"stopped after the maximum run time of {self.sched.max_run_s:g}s\n" + tail
        return ("interrupted" if interrupted and status != "done" else status), code, tail


def run_slot(st: Storage, sched: Schedule, slot: float | None, trigger: str, first_slot: float | None = None,
             coalesced: int = 1, stop: threading.Event | None = None,
             execute: Callable[[Schedule, str, threading.Event], tuple[int, str]] | None = None) -> dict:
    """Take the lease for ``slot`` and run the job, recording start and end (or a skip).
    ``slot=None`` runs now (run-now), after any slot. Returns the end or skip event."""
    run_id = new_run_id(sched.name)
    try:
        lease = acquire(st, sched.name, run_id, ttl=sched.lease_ttl_s, slot=slot, trigger=trigger)
    except (LeaseHeld, SlotTaken) as e:
        reason = "lease_held" if isinstance(e, LeaseHeld) else "slot_taken"
        return record(st, sched.name, "skip", uuid.uuid4().hex[:8],
                      {"slot": iso(slot), "reason": reason, "detail": str(e), "holder_run_id": e.state.get("run_id"),
                       "trigger": trigger})
    started = time.time()
    _note_abandoned(st, sched, lease.state)
    if sched.address:
        _stop_orphan_ray_jobs(st, sched, lease.state)
    record(st, sched.name, "start", run_id,
           {"run_id": run_id, "slot": iso(lease.state["slot"]), "first_slot": iso(first_slot if first_slot else slot),
            "coalesced": coalesced, "trigger": trigger, "started": iso(started), "holder": lease.state["holder"],
            "mode": "ray-job" if sched.address else "local", "config": sched.config}, at=started)
    watch = _Watch(sched, lease, stop or threading.Event(), started)
    if execute is None:
        status, code, tail = watch.run(lambda: execute_subprocess(sched, run_id, watch.job_stop, st=st,
                                                                  lease=lease.state))
    else:
        status, code, tail = watch.run(lambda: execute(sched, run_id, watch.job_stop))
    finished = time.time()
    body = {"run_id": run_id, "status": status, "exit_code": code, "started": iso(started), "finished": iso(finished),
            "seconds": round(finished - started, 3), **summarize_run(st, run_id)}
    if status != "done":
        body["error_tail"] = tail[-2000:]
    end = record(st, sched.name, "end", run_id, body, at=finished)
    if not watch.lost or status == "self_fenced":
        try:
            lease.release(status=status)
        except ConditionalWriteError as e:  # a LeaseError, or the store refusing
            log.warning("releasing lease of %s: %s", sched.name, e)
    return end


def _note_abandoned(st: Storage, sched: Schedule, state: dict) -> None:
    """The run this lease was taken over from, if it started and never ended (its holder died
    or froze), gets an end event saying so."""
    prev = state.get("previous_run_id")
    if not prev or state.get("previous_released", True):
        return
    try:
        events = [e for e in read_history(st, sched.name) if e.get("run_id") == prev]
        if any(e["event"] == "start" for e in events) and not any(e["event"] == "end" for e in events):
            record(st, sched.name, "end", prev,
                   {"run_id": prev, "status": "abandoned", "exit_code": None, "finished": iso(time.time()),
                    "error_tail": f"its holder stopped renewing the lease; run {state['run_id']} took it over",
                    **summarize_run(st, prev)})
    except Exception as e:  # the history is a record; the run goes on
        log.warning("recording the abandoned run %s of %s: %s", prev, sched.name, e)


def _stop_orphan_ray_jobs(st: Storage, sched: Schedule, state: dict) -> None:
    """Before a Ray-job run starts: any job of this schedule's earlier runs still running on the
    cluster (its holder died without stopping it) is stopped, and that is recorded."""
    prev = state.get("previous_run_id")
    if not prev:
        return
    try:
        from pipeline.ops.jobs import JobsClient, resolve_address

        client = JobsClient(resolve_address(sched.address))
        for info in client.list():
            md = info.metadata or {}
            status = getattr(info.status, "value", str(info.status))
            if md.get("run_id") == prev and status in ("PENDING", "RUNNING"):
                client.stop(info.submission_id)
                final = client.wait(info.submission_id, timeout=120, poll=0.5)
                record(st, sched.name, "orphan_stopped", prev,
                       {"run_id": prev, "submission_id": info.submission_id, "status": final,
                        "by_run_id": state["run_id"],
                        "detail": f"job {info.submission_id} of run {prev} was still {status}; stopped ({final})"})
    except Exception as e:  # the run goes on; the supervisor of the new job is unaffected
        log.warning("looking for running jobs of %s's earlier run %s: %s", sched.name, prev, e)
        record(st, sched.name, "orphan_check_failed", prev, {"run_id": prev, "detail": f"{type(e).__name__}: {e}"})


def run_due(st: Storage, sched: Schedule, trigger: str = "cronjob", stop: threading.Event | None = None,
            execute=None, now: float | None = None) -> dict:
    """Run the latest cron slot at or before now, unless a run already took it (then a
    ``slot_taken`` skip) or it is older than the misfire grace (a ``misfire`` skip). What an
    external trigger that may fire twice or late, such as a Kubernetes CronJob, should call."""
    now = time.time() if now is None else now
    slot = sched._iter(now + 1e-3).get_prev(float)
    if now - slot > sched.misfire_grace_s:
        return record(st, sched.name, "skip", uuid.uuid4().hex[:8],
                      {"slot": iso(slot), "reason": "misfire", "missed": 1, "trigger": trigger,
                       "detail": f"the latest slot was {now - slot:.0f}s ago, past the misfire grace of "
                                 f"{sched.misfire_grace_s:.0f}s"})
    current = read_lease(st, sched.name)
    after = (current[0].get("slot") if current else None) or min(sched.created, slot - 1e-3)
    first, _, count = sched.due(after, slot)
    return run_slot(st, sched, slot, trigger, first, max(1, count), stop, execute)


def run_dir(sched: Schedule) -> str | None:
    """Where the job starts: the schedule's working directory; where that does not exist (a
    pod whose image holds the same tree elsewhere), the current one if the config is there;
    else None."""
    if not sched.workdir or os.path.isdir(sched.workdir):
        return sched.workdir or os.getcwd()
    if not os.path.isabs(sched.config) and os.path.exists(sched.config):
        return os.getcwd()
    return None


def execute_subprocess(sched: Schedule, run_id: str, stop: threading.Event, st: Storage | None = None,
                       lease: dict | None = None) -> tuple[int, str]:
    """Run the job in its own process group, under :mod:`pipeline.ops.supervise` (which stops its
    whole tree when this process dies or, given ``st`` and the ``lease`` state, when the lease is
    no longer live); stop it (the whole group) when ``stop`` is set. Returns (exit code, the
    tail of its output)."""
    import json
    import tempfile

    workdir = run_dir(sched)
    if workdir is None:
        return 2, (f"schedule {sched.name!r}: its working directory {sched.workdir} does not exist on this machine, "
                   f"and {sched.config} is not under the current one ({os.getcwd()})")
    sup = [sys.executable, "-m", "pipeline.ops.supervise", "--parent", str(os.getpid()), "--ttl", str(sched.lease_ttl_s)]
    root = (os.path.abspath(st.root) if st.is_local else st.root_uri) if st is not None else None
    if root is not None:
        sup += ["--root", root, "--lease", sched.name, "--run-id", run_id]
    if sched.max_run_s is not None:
        sup += ["--max-run-s", str(sched.max_run_s)]
    env = dict(os.environ)
    if lease is not None and st is not None:
        env["DISTILL_FENCE"] = json.dumps({"root": root, "lease": sched.name, "epoch": lease.get("epoch"),
                                           "run_id": run_id})
    here = str(Path(__file__).resolve().parents[2])  # pipeline.ops.supervise importable anywhere
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([*sup, "--", *job_command(sched, run_id)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=workdir, env=env)
        while proc.poll() is None:
            if stop.wait(0.2):
                _kill_group(proc)
                break
        code = proc.wait()
        out.seek(0)
        tail = out.read()[-4000:].decode("utf-8", "replace")
    return code, tail


def execute_in_process(sched: Schedule, run_id: str, stop: threading.Event) -> tuple[int, str]:
    """Run the pipeline in this process, on the Ray (and kept engines) it already has: for a
    caller that owns a Ray session, such as a notebook or a test. ``stop`` is not honoured
    mid-stage."""
    from pipeline.core.config import load_config
    from pipeline.core.runner import Runner

    result = Runner(load_config(sched.config)).run(run_id=run_id)
    return (0 if result.ok else 1), result.error or ""


# -- the scheduler --------------------------------------------------------------------------------

class Scheduler:
    """Runs every schedule under a root: one thread per running job, a tick per ``tick`` seconds
    (or sooner, at the next slot)."""

    def __init__(self, st: Storage, tick: float = 10.0, execute=None):
        self.st, self.tick_s, self.execute = st, tick, execute
        self.stop = Stop()
        self.threads: dict[str, threading.Thread] = {}
        self.noted: set[tuple[str, float]] = set()  # (schedule, slot) already recorded as skipped here

    def _start(self, sched: Schedule, slot: float, first: float | None, count: int) -> None:
        def body():
            try:
                event = run_slot(self.st, sched, slot, "scheduler", first, count, self.stop, self.execute)
                if event["event"] == "skip":
                    self.noted.add((sched.name, slot))
            except Exception:  # never let one schedule's storage error kill the scheduler
                log.exception("schedule %s", sched.name)

        t = threading.Thread(target=body, name=f"schedule-{sched.name}", daemon=True)
        self.threads[sched.name] = t
        t.start()

    def tick(self, now: float | None = None) -> float:
        """Start what is due; returns the next time anything is due."""
        now = time.time() if now is None else now
        wake = now + self.tick_s
        for sched in list_schedules(self.st):
            t = self.threads.get(sched.name)
            if t is not None and t.is_alive():
                continue  # our own run: the slots it misses coalesce into one run after it
            try:
                current = read_lease(self.st, sched.name)
                state = current[0] if current else None
                after = max(sched.created, (state or {}).get("slot") or 0.0)
                first, latest, count = sched.due(after, now)
                wake = min(wake, sched.next_fire(now))
                if latest is None or (sched.name, latest) in self.noted:
                    continue
                if now - latest > sched.misfire_grace_s:
                    record(self.st, sched.name, "skip", uuid.uuid4().hex[:8],
                           {"slot": iso(latest), "reason": "misfire", "missed": count, "trigger": "scheduler",
                            "detail": f"{count} slot(s) due, the latest {now - latest:.0f}s ago, past the "
                                      f"misfire grace of {sched.misfire_grace_s:.0f}s"})
                    self.noted.add((sched.name, latest))
                    continue
                if state is not None and is_live(state, now):
                    record(self.st, sched.name, "skip", uuid.uuid4().hex[:8],
                           {"slot": iso(latest), "reason": "lease_held", "holder_run_id": state.get("run_id"),
                            "trigger": "scheduler", "detail": f"run {state.get('run_id')} is in progress"})
                    self.noted.add((sched.name, latest))
                    continue
                self._start(sched, latest, first, count)
            except Exception:
                log.exception("schedule %s", sched.name)
        return wake

    def wait_running(self) -> None:
        for t in list(self.threads.values()):
            t.join()

    def serve(self, once: bool = False) -> None:
        if once:
            self.tick()
            self.wait_running()
            return
        while not self.stop.is_set():
            wake = self.tick()
            self.stop.wait(max(0.05, min(self.tick_s, wake - time.time())))
        self.wait_running()
