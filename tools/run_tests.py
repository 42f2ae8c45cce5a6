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
"""
from __future__ import annotations

import os
import subprocess
import sys

LOG = ".pytest-crash.log"
STACK_LINES = 40
PYTEST_FRAMES = ("/_pytest/", "/pluggy/", "/pytest/__main__.py", "<frozen runpy>")


def _pytest(args: list[str]) -> int:
    if os.path.exists(LOG):
        os.remove(LOG)
    env = {**os.environ, "DISTILL_TEST_CRASH_LOG": LOG}
    return subprocess.call([sys.executable, "-m", "pytest", "-p", "no:faulthandler", *args], env=env)


def crash_report(rc: int) -> str | None:
    """The crashed test's node id, after printing what is known of the crash; None when pytest
    exited on its own (or died before any test started)."""
    if rc >= 0:
        return None
    lines = open(LOG).read().splitlines() if os.path.exists(LOG) else []
    first = lines[0] if lines else ""
    nodeid = first.removeprefix("last test started: ").strip() if first.startswith("last test started: ") else None
    print(f"\npytest died of signal {-rc} in {nodeid or 'no test (collection or start-up)'}", flush=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), None)
    if start is not None:
        stack = lines[start:]
        end = next((i for i, line in enumerate(stack) if not line.strip()), len(stack))
        frames = [line for line in stack[:end] if not any(m in line for m in PYTEST_FRAMES)]  # pytest's own calls
        print("\n".join(frames[:STACK_LINES]), flush=True)
    else:
        print("(no Python stack for the crashed thread: it crashed outside Python code)", flush=True)
    return nodeid


def _is_path(arg: str) -> bool:
    return not arg.startswith("-") and os.path.exists(arg.split("::")[0])


def main(argv: list[str]) -> int:
    rc = _pytest(argv)
    nodeid = crash_report(rc)
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
        print(f"{nodeid} is not among the collected tests: not run again", flush=True)
        return 128 - rc
    rest = ids[ids.index(nodeid):]
    print(f"running the {len(rest)} tests from {nodeid} on again, once", flush=True)
    rc2 = _pytest([*options, *rest])
    crash_report(rc2)
    return 128 - rc2 if rc2 < 0 else rc2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
