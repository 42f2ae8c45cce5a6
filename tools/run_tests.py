"""`make test`: pytest over the suite, with a report when pytest itself crashes.

Usage: ``python tools/run_tests.py [pytest options] [paths]`` (``make test`` passes
``-q -x --durations=15 tests``).

A test that fails fails the run, as always. A crash of the pytest process itself (a fatal
signal in native code under it: Ray's driver, torch, numba, Arrow) is different: the process
and every later test go with it, and pytest's own dump of every thread's stack is long enough
to bury the one that matters. So here:

- the test that was running and the stack of the thread that crashed are printed
  (``tests/conftest.py`` writes them to ``.pytest-crash.log``, named by
  ``DISTILL_TEST_CRASH_LOG``, instead of pytest's ``faulthandler``);
- the suite then runs once more from that test on (the crashed test included). A second
  crash, or any failure, fails the run; the exit code of a run with a crash is never 0 unless
  the rerun passed every test from the crashed one to the end.

Shards (``--shards N``; ``make test`` passes ``TEST_SHARDS``): the test files are split into N
groups of about equal time, and each group runs in a pytest process of its own, at the same
time, with its own temporary folder (removed once every shard passed), its own crash log and
the crash handling above. Much of the suite waits on one core (process and engine start-ups,
imports, Ray's control plane), so two processes on two cores finish sooner than one. Files that
share an expensive session fixture (``GROUPS``: the solver model, the Jobs head) stay in one
shard, so it is built once. Each file's time comes from ``tests/durations.json`` (``--weigh LOG``
rewrites it from a ``--durations=0`` log, ``[shard i]`` prefixes and all; a file it does not
list counts ``DEFAULT_SECONDS``): per file, the larger of 1.4 x its time in one process and its
slowest tests' time measured with two shards running (2026-12-03). Weights measured purely with
two shards (``TESTS="--durations=0 tests" CI=true bash .ci/run``, then ``--weigh``) balanced the
shards on paper but put the sandbox's timed runs beside the engine tests, where two clean-clone
runs failed a sandbox wall limit; they are not used. Each shard's lines are printed as they come, prefixed
``[shard i]``; the run passes only if every shard does.

Files marked ``pytest.mark.alone`` (a Ray cluster or scheduled jobs' Ray of their own) run after
the shards have passed, in one process with nothing beside it, prefixed ``[alone]``. Ray bounds
a node's start at a fixed 30 s (``ray._private.node``); in a run with every file sharded, one
such start in one shard passed it while the other shard ran a 3-node cluster.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

LOG = ".pytest-crash.log"
WEIGHTS = Path(__file__).resolve().parents[1] / "tests" / "durations.json"
DEFAULT_SECONDS = 5.0
# files that share a session fixture too costly to build twice (one shard each group)
GROUPS = {
    "solver model": ("solver_run", "solver_model", "solver_eval_rows"),
    "jobs head": ("ray_jobs_head",),
}
STACK_LINES = 40
PYTEST_FRAMES = ("/_pytest/", "/pluggy/", "/pytest/__main__.py", "<frozen runpy>")


def _pytest(args: list[str], log: str = LOG, prefix: str = "") -> int:
    if os.path.exists(log):
        os.remove(log)
    env = {**os.environ, "DISTILL_TEST_CRASH_LOG": log}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:faulthandler", *args]
    if not prefix:
        return subprocess.call(cmd, env=env)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in proc.stdout:
        print(f"{prefix}{line}", end="", flush=True)
    return proc.wait()


def crash_report(rc: int, log: str = LOG, prefix: str = "") -> str | None:
    """The crashed test's node id, after printing what is known of the crash; None when pytest
    exited on its own (or died before any test started)."""
    if rc >= 0:
        return None
    lines = open(log).read().splitlines() if os.path.exists(log) else []
    first = lines[0] if lines else ""
    nodeid = first.removeprefix("last test started: ").strip() if first.startswith("last test started: ") else None
    print(f"\n{prefix}pytest died of signal {-rc} in {nodeid or 'no test (collection or start-up)'}", flush=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), None)
    if start is not None:
        stack = lines[start:]
        end = next((i for i, line in enumerate(stack) if not line.strip()), len(stack))
        frames = [line for line in stack[:end] if not any(m in line for m in PYTEST_FRAMES)]  # pytest's own calls
        print("\n".join(prefix + f for f in frames[:STACK_LINES]), flush=True)
    else:
        print(f"{prefix}(no Python stack for the crashed thread: it crashed outside Python code)", flush=True)
    return nodeid


def _is_path(arg: str) -> bool:
    return not arg.startswith("-") and os.path.exists(arg.split("::")[0])


def run_once(argv: list[str], log: str = LOG, prefix: str = "") -> int:
    """One pytest process over ``argv``; after a crash, once more from the crashed test on."""
    rc = _pytest(argv, log, prefix)
    nodeid = crash_report(rc, log, prefix)
    if rc >= 0:
        return rc
    if nodeid is None:
        return 128 - rc
    options = [a for a in argv if not _is_path(a)]
    paths = [a for a in argv if _is_path(a)] or ["tests"]
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *paths],
                               capture_output=True, text=True).stdout.splitlines()
    ids = [line.strip() for line in collected if "::" in line]
    if nodeid not in ids:
        print(f"{prefix}{nodeid} is not among the collected tests: not run again", flush=True)
        return 128 - rc
    rest = ids[ids.index(nodeid):]
    print(f"{prefix}running the {len(rest)} tests from {nodeid} on again, once", flush=True)
    rc2 = _pytest([*options, *rest], log, prefix)
    crash_report(rc2, log, prefix)
    return 128 - rc2 if rc2 < 0 else rc2


def test_files(paths: list[str]) -> list[str]:
    """The test files under ``paths`` (files or folders), in a stable order."""
    files: list[str] = []
    for p in paths:
        path = Path(p)
        found = sorted(path.rglob("test_*.py")) if path.is_dir() else [path]
        files += [str(f) for f in found if str(f) not in files]
    return files


def _group(path: str) -> str:
    text = Path(path).read_text(errors="replace")
    for name, fixtures in GROUPS.items():
        if any(re.search(rf"\b{f}\b", text) for f in fixtures):
            return name
    return path


def alone(path: str) -> bool:
    """A file marked ``pytest.mark.alone`` (it starts a Ray cluster or process tree of its own,
    heavy enough that a second shard beside it slows Ray's fixed start-up limits past their
    bound): it runs after the shards, in one process, with nothing else running."""
    text = Path(path).read_text(errors="replace")
    return re.search(r"^(pytestmark\s*=.*|@)\bpytest\.mark\.alone\b", text, re.M) is not None


def seconds(files: list[str], weights: dict[str, float]) -> float:
    """The files' time by ``weights`` (per file name; ``DEFAULT_SECONDS`` for one not listed)."""
    return sum(weights.get(Path(f).name, DEFAULT_SECONDS) for f in files)


def shard(files: list[str], n: int, weights: dict[str, float]) -> list[list[str]]:
    """``files`` in ``n`` shards of about equal total time: each group (a file, or the files of a
    ``GROUPS`` entry) goes, longest first, to the shard with the least time so far."""
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(_group(f), []).append(f)
    shards: list[list[str]] = [[] for _ in range(n)]
    load = [0.0] * n
    for key in sorted(groups, key=lambda k: (-seconds(groups[k], weights), k)):
        i = load.index(min(load))
        shards[i] += groups[key]
        load[i] += seconds(groups[key], weights)
    return [sorted(s) for s in shards if s]


def weigh(log: str) -> dict[str, float]:
    """Seconds per test file (setup, call and teardown) from a pytest ``--durations=0`` log."""
    per: dict[str, float] = {}
    for line in Path(log).read_text().splitlines():
        m = re.match(r"(?:\[[\w ]+\] )?\s*([\d.]+)s (?:call|setup|teardown)\s+(\S+?)::", line)
        if m:
            name = Path(m.group(2)).name
            per[name] = round(per.get(name, 0.0) + float(m.group(1)), 1)
    return dict(sorted(per.items()))


def main(argv: list[str]) -> int:
    n = 1
    if argv[:1] == ["--weigh"] and len(argv) == 2:
        WEIGHTS.write_text(json.dumps(weigh(argv[1]), indent=1) + "\n")
        print(f"wrote {WEIGHTS}")
        return 0
    if "--shards" in argv:
        i = argv.index("--shards")
        n = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    if n <= 1 or any("::" in a for a in argv):
        return run_once(argv)
    options = [a for a in argv if not _is_path(a)]
    files = test_files([a for a in argv if _is_path(a)] or ["tests"])
    if len(files) < 2:
        return run_once(argv)
    weights = json.loads(WEIGHTS.read_text()) if WEIGHTS.exists() else {}
    solo = [f for f in files if alone(f)]
    shards = shard([f for f in files if f not in solo], n, weights)
    tmp = tempfile.mkdtemp(prefix="distill-tests-")
    rc = run_shards(options, shards, weights, tmp)
    if rc == 0 and solo:
        print(f"[alone] {len(solo)} files, weighing {seconds(solo, weights):.0f} s, with no shard beside them: "
              f"{' '.join(Path(f).name for f in solo)}", flush=True)
        rc = run_once([*options, f"--basetemp={tmp}/alone", *solo], f"{LOG}.alone", "[alone] ")
        print(f"[alone] exit code {rc}", flush=True)
    if rc == 0:  # pytest keeps its last 3 temporary folders; these go once every shard passed
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"the shards' temporary folders are kept in {tmp}", flush=True)
    return rc


def run_shards(options: list[str], shards: list[list[str]], weights: dict[str, float], tmp: str) -> int:
    """Each shard in a pytest process of its own, all at once; the first non-zero exit code."""
    codes = [0] * len(shards)

    def one(i: int, fs: list[str]) -> None:
        codes[i] = run_once([*options, f"--basetemp={tmp}/shard{i}", *fs], f"{LOG}.{i}", f"[shard {i}] ")

    for i, fs in enumerate(shards):
        print(f"[shard {i}] {len(fs)} files, weighing {seconds(fs, weights):.0f} s: "
              f"{' '.join(Path(f).name for f in fs)}", flush=True)
    threads = [threading.Thread(target=one, args=(i, fs)) for i, fs in enumerate(shards)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, rc in enumerate(codes):
        print(f"[shard {i}] exit code {rc}", flush=True)
    return next((rc for rc in codes if rc), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
