"""``make mutate``: a mutation check of the test suite. Not part of ``make test``.

Each entry of ``MUTATIONS`` is one deliberate one-line break of the code (a comparison turned,
a constant changed, a guard dropped) and the tests that cover that line. For each, a scratch
copy of the repository's committed tree (``git archive HEAD``: the live working tree, where
others are working, is never touched) gets the break, and only its tests run there (pytest
``-x``; ``PYTHONPATH`` points at the copy, so Ray workers import the broken code too). A break
is *caught* when a test fails, and *survives* when they all pass; a survivor is a hole in the
suite. The script prints one line per break and a summary, writes the results as JSON
(``--json``), and exits 1 if any break survives or any break no longer applies (its line moved:
update the list).

    .venv/bin/python tools/mutate.py                # every break
    .venv/bin/python tools/mutate.py hedge-gte ...  # those named
    .venv/bin/python tools/mutate.py --list
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the root
    why: str = ""


M = Mutation
PROMO, CHECK, MULTI = "stages/common/promotion.py", "stages/common/checkers.py", "tests/test_multipart_math.py"
METRICS, VERIFIER = "stages/common/metrics.py", "stages/common/verifier.py"
SOLVER_TESTS = ("tests/test_evaluate_metrics.py", "tests/test_feedback_loop.py::test_hard_prompts_threshold_on_a_model_that_solves_some")

MUTATIONS: list[Mutation] = [
    # the promotion gate
    M("promo-z-decide", PROMO, "def decide(best: dict | None, candidate: dict, z: float = 2.0)",
      "def decide(best: dict | None, candidate: dict, z: float = 1.0)", ("tests/test_promotion.py",),
      "the 2-SE rule becomes 1 SE"),
    M("promo-z-promote", PROMO, "candidate: dict, z: float = 2.0, tries: int = 20)",
      "candidate: dict, z: float = 1.0, tries: int = 20)", ("tests/test_promotion.py",), "promote's own z"),
    M("promo-gte", PROMO, 'if paired["diff"] > z * paired["se"]:', 'if paired["diff"] >= z * paired["se"]:',
      ("tests/test_promotion.py",), "a tie at zero SE promotes"),
    M("promo-first", PROMO, '{"promoted": True, "margin": None', '{"promoted": False, "margin": None',
      ("tests/test_promotion.py",), "the first student is not promoted"),
    M("promo-no-common", PROMO, 'if paired["prompts"] == 0:', 'if paired["prompts"] < 0:',
      ("tests/test_promotion.py",), "no prompt in common is judged anyway"),
    # the math checker
    M("hedge-gte", CHECK, 'return "hedged_answer" if len(distinct) > n_gold else "wrong_answer"',
      'return "hedged_answer" if len(distinct) >= n_gold else "wrong_answer"', (MULTI,),
      "6 and x = 6 against 5 become a hedge"),
    M("hedge-max-values", CHECK, "MAX_VALUES = 32", "MAX_VALUES = 3200", (MULTI,),
      "many boxes are parsed one by one"),
    M("deadline-per-check", CHECK, "signal.setitimer(signal.ITIMER_REAL, seconds)",
      "signal.setitimer(signal.ITIMER_REAL, seconds * 4)", (MULTI,), "a longer deadline than declared"),
    M("truncated-reason", CHECK, 'if fmt.reject_truncated and finish_reason == "length":',
      'if fmt.reject_truncated and finish_reason == "max_tokens":', ("tests/test_checkers.py",),
      "a truncated sample passes"),
    M("empty-reasoning", CHECK, "    if not reasoning.strip():", "    if False:", ("tests/test_checkers.py",),
      "an empty think block passes"),
    M("generation-error", CHECK, 'parts``."""\n    if error:\n        return Verdict("error", "generation_error", error, None)',
      'parts``."""\n    if error:\n        return Verdict("rejected", "generation_error", error, None)',
      ("tests/test_checkers.py",),
      "an engine error becomes a rejection (a wrong answer)"),
    # metrics
    M("pass-at-k-edge", METRICS, "if n - c < k:", "if n - c <= k:", ("tests/test_metrics.py",),
      "pass@k's shortcut taken one too early"),
    M("maj-ties", METRICS, "return sum(a in correct_keys for a in tied) / len(tied)",
      "return float(any(a in correct_keys for a in tied))", ("tests/test_metrics.py",),
      "a tied majority counts as fully right"),
    M("se-ddof", METRICS, "var = sum((v - mean) ** 2 for v in values) / (n - 1)",
      "var = sum((v - mean) ** 2 for v in values) / n", ("tests/test_metrics.py",), "SE with ddof 0"),
    M("errored-scored", METRICS, "kept = sorted((x for x in samples if not x.errored), key=lambda x: x.index)",
      "kept = sorted((x for x in samples), key=lambda x: x.index)", ("tests/test_metrics.py",),
      "errored samples scored as wrong"),
    M("paired-sign", METRICS, "diffs = [a[p] - b[p] for p in shared]", "diffs = [b[p] - a[p] for p in shared]",
      ("tests/test_metrics.py", "tests/test_promotion.py"), "the paired difference reversed"),
    # the verifier service
    M("verifier-timeouts", VERIFIER, 'self.stats["timeouts"] += 1', 'self.stats["timeouts"] += 0',
      ("tests/test_verifier.py",), "timeouts not counted"),
    M("verifier-cache-errors", VERIFIER, 'if err is None or err == "timeout":', "if True:",
      ("tests/test_verifier.py",), "infrastructure faults cached as answers"),
    # text normalisation and the sandbox
    M("textnorm-case", "stages/common/textnorm.py", "low = chr(c).lower()", "low = chr(c)",
      ("tests/test_textnorm.py",), "case folding dropped"),
    M("sandbox-outputs", "stages/common/sandbox.py", "return _lines(got) == _lines(expected)",
      "return _lines(got)[:len(_lines(expected))] == _lines(expected)", ("tests/test_sandbox.py::test_outputs_match_trims_trailing_whitespace_only",),
      "output with lines beyond the expected ones passes"),
    # slower: Ray, engines (the solver model)
    M("heldout-ids", "stages/common/heldout.py",
      'leaked |= held & set(t.column("prompt_id").to_pylist())', "leaked |= set()",
      ("tests/test_feedback_loop.py::test_hard_prompts_refuse_a_pool_that_overlaps_the_heldout_set",),
      "a shared prompt_id is not refused"),
    M("ngram-default", "stages/common/ngrams.py", "DEFAULT_NGRAM = 13", "DEFAULT_NGRAM = 14",
      ("tests/test_eval_contamination.py::test_evaluate_refuses_ngram_overlap_before_engines",),
      "the documented 13-gram rule changed"),
    M("scoring-errored", "stages/common/scoring.py", 'errored=r["verdict"] == "error"', "errored=False",
      SOLVER_TESTS, "errors are scored as wrong answers"),
    M("sft-data-order", "stages/sft.py", "        data_seed=p.seed,\n", "        data_seed=p.seed,\n        ignore_data_skip=True,\n",
      ("tests/test_sft_train.py::test_worker_sigkill_resumes_from_last_checkpoint[s3]",),
      "a resumed group replays the epoch from its start (another data order)"),
    M("budget-reservation", "stages/generate.py", 'need = req.get("n", self.n) * self.per_sample', "need = 0",
      ("tests/test_budget_cap.py",), "a request reserves nothing, so the cap can be passed"),
    M("pairs-errored", "stages/preference_pairs.py", 'usable = [i for i, v in enumerate(verdicts) if v != "error"]',
      "usable = list(range(len(verdicts)))", ("tests/test_preference_pairs.py",), "errored samples used in pairs"),
    M("grpo-reward-errors", "stages/grpo.py", 'rewards = [1.0 if v["verdict"] == "correct" else',
      'rewards = [1.0 if v["verdict"] != "rejected" else', ("tests/test_grpo.py::test_reward_is_verify_verdict_for_every_reason",),
      "a checker timeout or error rewarded"),
    M("dpo-truncation", "stages/dpo.py", "if fraction > p.max_truncated_fraction:", "if fraction > 1:",
      ("tests/test_dpo.py::test_too_short_max_length_fails_before_training_naming_the_setting",),
      "pairs cut by max_length train silently"),
    M("engine-window", "stages/common/engine.py", "                    self.max_inflight = window\n",
      "                    pass\n", ("tests/test_generate_overhead.py::test_generate_reports_overhead",),
      "a kept engine keeps its first client's window"),
    M("grpo-code-rows", "stages/grpo.py", '                row["tests"] = tests[i]\n', "                pass\n",
      ("tests/test_grpo.py::test_code_rows_are_rewarded_by_the_sandbox_as_verify_checks_them",),
      "code rows rewarded as math (their tests never run)"),
]


def _scratch(root: Path) -> Path:
    """The committed tree, unpacked under ``root/main`` (``../shared`` linked beside it)."""
    dest = root / "main"
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    shared = REPO.parent / "shared"
    if shared.exists():
        (root / "shared").symlink_to(shared)
    return dest


def _pytest(tree: Path, tests: tuple[str, ...], log: Path, timeout: float) -> int:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1",
           # the solver model is trained once and reused by every later run (no break touches training)
           "DISTILL_SOLVER_ROOT": os.environ.get("DISTILL_SOLVER_ROOT") or str(tree.parent / "solver-store")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    with open(log, "w") as f:
        try:
            return subprocess.run(cmd, cwd=tree, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\nmutate: stopped after {timeout:g}s\n")
            return -1


def _failed(log: Path) -> bool:
    """Whether pytest's summary counts a failed test (not only errors at setup or collection)."""
    import re

    tail = log.read_text(errors="replace")[-4000:]
    return bool(re.search(r"\b\d+ failed\b", tail))


def run(mutations: list[Mutation], timeout: float, keep: bool, baseline: bool) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="distill-mutate-"))
    tree = _scratch(root)
    print(f"scratch copy of HEAD: {tree}", flush=True)
    results = []
    try:
        if baseline:  # the covering tests must pass on the unbroken code, or a "catch" means nothing
            tests = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
            rc = _pytest(tree, tests, root / "baseline.log", timeout * 4)
            print(f"baseline ({len(tests)} test targets): {'passes' if rc == 0 else f'FAILS (rc {rc}), see {root}/baseline.log'}",
                  flush=True)
            if rc != 0:
                raise SystemExit(2)
        for m in mutations:
            path = tree / m.path
            text = path.read_text()
            found = text.count(m.old)
            if found != 1:
                res = {"name": m.name, "result": "not_applied", "detail": f"{m.path}: the line occurs {found} times"}
            else:
                path.write_text(text.replace(m.old, m.new))
                t0 = time.monotonic()
                log = root / f"{m.name}.log"
                try:
                    rc = _pytest(tree, m.tests, log, timeout)
                finally:
                    path.write_text(text)
                result = "caught" if rc == 1 and _failed(log) else "survived" if rc == 0 else \
                    "timeout" if rc == -1 else "error"  # an error at setup (e.g. Ray did not start) is no catch
                res = {"name": m.name, "result": result, "rc": rc, "seconds": round(time.monotonic() - t0, 1),
                       "path": m.path, "tests": list(m.tests), "why": m.why}
                if result != "caught":
                    res["log"] = str(log)
            results.append(res)
            print(f"{res['result']:>11}  {m.name:<22} {m.path}  ({m.why})", flush=True)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="only these breaks (default: all)")
    ap.add_argument("--list", action="store_true", help="list the breaks and exit")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per break's test run")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy and logs")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unbroken run of the covering tests")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:<22} {m.path}: {m.old!r} -> {m.new!r}  [{' '.join(m.tests)}]")
        return 0
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        ap.error(f"unknown break(s): {', '.join(sorted(unknown))}")
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    results = run(chosen, args.timeout, args.keep or False, not args.no_baseline)
    bad = [r for r in results if r["result"] != "caught"]
    print(f"{len(results) - len(bad)} of {len(results)} breaks caught"
          + (f"; not caught: {', '.join(r['name'] + ' (' + r['result'] + ')' for r in bad)}" if bad else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
