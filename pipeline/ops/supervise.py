"""The supervisor of a scheduled local job: the job dies with its lease.

``python -m pipeline.ops.supervise --root ROOT --lease NAME --run-id RUN --ttl S --parent PID
[--max-run-s S] -- COMMAND...`` runs COMMAND (``distill run ...``) as its child and stops the
whole process tree under it, Ray included, when

- its holder dies: a parent-death signal (``PR_SET_PDEATHSIG``), and the parent pid checked
  every half second in case the signal was missed;
- the lease is no longer its run's or is no longer live by the store's clock (a holder that
  is paused or cut off from the store stops renewing; checked every ``ttl/6``), or cannot be
  read for longer than ``ttl``;
- the run has lasted ``--max-run-s``;
- it is sent SIGTERM or SIGINT (the scheduler stopping the job).

It is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so processes that leave their parent
(Ray's GCS, raylet and workers when the driver dies, or anything that daemonizes) stay under
it and are found by walking ``/proc``. The tree gets SIGTERM, then SIGKILL after a grace,
until nothing is left. The reason is printed on stderr, and the exit code is the job's own, or
``128 + signal`` when it was stopped.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
GRACE_S = 30.0  # a `distill submit --stop-on-exit` stops its Ray job in this time


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return False


def descendants(pid: int) -> set[int]:
    """Every process under ``pid`` (not ``pid`` itself), from /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), list(children.get(pid, []))
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += children.get(p, [])
    return out


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_tree(grace: float = GRACE_S) -> None:
    """SIGTERM everything under this process, SIGKILL what is left after ``grace``, until none."""
    me = os.getpid()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0), (signal.SIGKILL, 5.0), (signal.SIGKILL, 5.0)):
        pids = descendants(me)
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap()
            if not descendants(me):
                return
            time.sleep(0.1)


class _LeaseWatch:
    """Whether the lease is still this run's and live, looked at every ``ttl/6``."""

    def __init__(self, root: str, name: str, run_id: str, ttl: float):
        from pipeline.store.storage import Storage

        self.st, self.name, self.run_id, self.ttl = Storage(root), name, run_id, ttl
        self.next = time.monotonic() + ttl / 6
        self.last_seen = time.monotonic()

    def check(self) -> str | None:
        from pipeline.store.lease import is_live, read_lease

        now = time.monotonic()
        if now < self.next:
            return None
        self.next = now + self.ttl / 6
        try:
            got = read_lease(self.st, self.name)
        except Exception as e:  # the store is unreachable from here
            if now - self.last_seen > self.ttl:
                return f"the lease could not be read for {now - self.last_seen:.0f}s (> ttl {self.ttl:g}s): {e}"
            return None
        if got is None or got[0].get("run_id") != self.run_id:
            holder = got[0].get("run_id") if got else None
            return f"the lease {self.name!r} is no longer run {self.run_id}'s (now {holder})"
        if not is_live(got[0]):
            return f"the lease {self.name!r} of run {self.run_id} expired (its holder stopped renewing it)"
        self.last_seen = now
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.ops.supervise")
    ap.add_argument("--root")
    ap.add_argument("--lease")
    ap.add_argument("--run-id")
    ap.add_argument("--ttl", type=float, default=300.0)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--max-run-s", type=float, default=None)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("no command after --")

    stopped: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: stopped.append(s))
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    if os.getppid() != args.parent:  # the holder died before the signal was armed
        print("supervisor: the holder is gone before the job started", file=sys.stderr)
        return 128 + signal.SIGTERM

    watch = _LeaseWatch(args.root, args.lease, args.run_id, args.ttl) if args.root and args.lease else None
    started = time.monotonic()
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    reason, code = None, None
    while reason is None:
        try:
            code = child.wait(0.5)
            break
        except subprocess.TimeoutExpired:
            pass
        if stopped:
            reason, code = f"stopped by signal {signal.Signals(stopped[0]).name}", 128 + stopped[0]
        elif os.getppid() != args.parent:
            reason, code = f"its holder (pid {args.parent}) died", 128 + signal.SIGTERM
        elif args.max_run_s is not None and time.monotonic() - started > args.max_run_s:
            reason, code = f"the run passed its maximum run time of {args.max_run_s:g}s", 124
        elif watch is not None:
            lost = watch.check()
            if lost:
                reason, code = lost, 128 + signal.SIGTERM
    if reason is not None:
        print(f"supervisor: stopping the job and its whole process tree: {reason}", file=sys.stderr, flush=True)
    kill_tree()  # also what a finished job left behind (a Ray that outlived its driver)
    _reap()
    return code if code is not None and code >= 0 else 128 + (-(code or 0))


if __name__ == "__main__":
    sys.exit(main())
