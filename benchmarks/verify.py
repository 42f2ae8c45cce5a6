"""benchmarks `verify`, `verify-scaling` and `verify-agreement`.

`verify`: verifier-service checks/s with one worker process ÷ raw single-process
math-verify (`parse` + `verify`) on the same unique (gold, answer) pairs, the raw side given the
service's exact-string shortcut (both answers equal after ``checkers._normalize``: settled
without parsing; ``shortcut_share`` is the share of pairs it settles).
`verify-scaling`: two workers ÷ one worker, on the same pairs.
`verify-pool`: two workers ÷ a ``multiprocessing.Pool(2)`` of raw math-verify (the same
shortcut), started and warmed before the timing as the service's workers are, same pairs.
Pairs are unique and never string-equal, so no cache helps; each round draws fresh pairs, the
same ones for every side. Each side runs ``BENCH_RUNS``
(default 3) times, interleaved; lines give the ratio of medians with its spread.

`verify-agreement`: the share of (gold, completion) pairs on which the project's verdict
(correct or not, from the verifier service) agrees with raw math-verify:
`verify(parse("$" + gold + "$"), parse(completion))` with math-verify's default extraction
(GSM8K gold: its `#### n` number). Pairs: every MATH-500 gold (the gold answer boxed, other
spellings of it: spacing, `\\dfrac`, `n.0`; a number of it changed, another problem's answer,
and for every fifth the answer hedged with another) and every GSM8K gold (the number boxed,
with a unit or `\\$` or thousands commas, the number changed),
each after a `<think>` block holding the reference solution with its boxes removed; plus the
multi-part cases below (lists, equations, named variables, sets, intervals, units, hedges).
`ours` is the number of agreeing pairs (an `error` verdict of ours never agrees), `baseline`
the number of pairs; `disagreements` counts them by pair kind, `examples` shows a few.
Set `VERIFY_AGREEMENT_LIMIT=n` to use the first n gold answers of each data set only.
"""
from __future__ import annotations

import json
import os
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RUNS, emit, emit_medians, interleaved  # noqa: E402

N = 400
DATA = REPO.parent / "shared" / "data"


def pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        a, b = rng.randint(1, 999), rng.randint(2, 99)
        kind = rng.randrange(3)
        if kind == 0:
            out.add((f"\\frac{{{a}}}{{{b}}}", f"{a / b:.6f}"))
        elif kind == 1:
            out.add((f"{a} + \\sqrt{{{b}}}", f"\\sqrt{{{b}}} + {a}"))
        else:
            out.add((f"({a}, {b})", f"\\left( {a}, {b + rng.randint(0, 1)} \\right)"))
    return sorted(out)


def raw_check(pair: tuple[str, str]) -> bool:
    """Raw math-verify on one pair, given the same exact-string shortcut the service takes
    (``checkers._normalize`` of both sides equal: settled without parsing)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    from stages.common.checkers import _normalize

    g, p = pair
    if _normalize(g) == _normalize(p):
        return True
    cfg = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return bool(verify(parse("\\boxed{" + g + "}", extraction_config=cfg), parse("\\boxed{" + p + "}", extraction_config=cfg)))


def raw(ps) -> float:
    t0 = time.perf_counter()
    for pair in ps:
        raw_check(pair)
    return len(ps) / (time.perf_counter() - t0)


def raw_pool(ps, workers: int) -> float:
    """A ``multiprocessing.Pool`` of raw math-verify (the same shortcut), started and warmed
    before the timing, as the service's workers are."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(raw_check, pairs(workers * 4, seed=999))  # imports
        t0 = time.perf_counter()
        pool.map(raw_check, ps)
        return len(ps) / (time.perf_counter() - t0)


def shortcut_share(ps) -> float:
    from stages.common.checkers import _normalize

    return sum(_normalize(g) == _normalize(p) for g, p in ps) / len(ps)


def service(ps, workers: int) -> float:
    from stages.common.verifier import VerifierPool

    with VerifierPool(workers=workers, timeout=10.0) as pool:
        pool.equal_many(pairs(workers * 4, seed=999))  # warm the workers' imports
        t0 = time.perf_counter()
        pool.equal_many(ps)
        return len(ps) / (time.perf_counter() - t0)


# -- agreement ---------------------------------------------------------------------------------

# (kind, gold as a data set would hold it, the completion's answer part). Golds with ``$`` or
# ``\boxed`` are given to raw math-verify as written, others wrapped in ``$...$``.
MULTI_PART = [
    ("boxed_list", r"\boxed{2}, \boxed{3}, \boxed{5}", r"The primes are $\boxed{2}$, $\boxed{3}$ and $\boxed{5}$."),
    ("boxed_list", r"\boxed{2}, \boxed{3}, \boxed{5}", r"$\boxed{2, 3, 5}$"),
    ("boxed_list", r"\boxed{2}, \boxed{3}, \boxed{5}", r"$\boxed{5}, \boxed{3}, \boxed{2}$"),
    ("boxed_list", r"\boxed{2}, \boxed{3}, \boxed{5}", r"$\boxed{2}, \boxed{3}$"),
    ("boxed_list", r"\boxed{2}, \boxed{3}, \boxed{5}", r"$\boxed{2}, \boxed{3}, \boxed{7}$"),
    ("tuple_list", "(2, 2), (6, 2)", r"$\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}$"),
    ("tuple_list", "(2, 2), (6, 2)", r"$\boxed{(6, 2), (2, 2)}$"),
    ("tuple_list", "(2, 2), (6, 2)", r"$\boxed{(2, 2)} \text{ and } \boxed{(2, 6)}$"),
    ("semicolon_list", "-3; -1; 4", r"$\boxed{\{-3, -1, 4\}}$"),
    ("semicolon_list", "-3; -1; 4", r"$\boxed{-3}, \boxed{-1}, \boxed{4}$"),
    ("semicolon_list", "-3; -1; 4", r"$\boxed{-3, 1, 4}$"),
    ("named_vars", "k = 45, n = 2", r"$\boxed{k = 45} \quad \text{and} \quad \boxed{n = 2}$"),
    ("named_vars", "k = 45, n = 2", r"$\boxed{n = 2, k = 45}$"),
    ("named_vars", "k = 45, n = 2", r"$\boxed{45}, \boxed{2}$"),
    ("named_vars", "k = 45, n = 2", r"$\boxed{k = 45, n = 3}$"),
    ("named_vars", "x_1 = 2, x_2 = 7", r"$\boxed{x_1 = 2, x_2 = 7}$"),
    ("named_vars", "x_1 = 2, x_2 = 7", r"$\boxed{2} \text{ and } \boxed{7}$"),
    ("named_vars", "x_1 = 2, x_2 = 7", r"$\boxed{x_1 = 2, x_2 = 8}$"),
    ("equation", "x = 5", r"The answer is $\boxed{5}$."),
    ("equation", "5", r"The answer is $\boxed{x = 5}$."),
    ("equation", "y = 2x + 3", r"$\boxed{y = 3 + 2x}$"),
    ("equation", "y = 2x + 3", r"$\boxed{y = 2x - 3}$"),
    ("and_or", r"6 \text{ and } 8", r"$\boxed{6, 8}$"),
    ("and_or", "6, 8", r"$\boxed{8 \text{ or } 6}$"),
    ("and_or", "6, 8", r"$\boxed{6 \text{ and } 9}$"),
    ("set", r"\{1, 2, 3\}", r"$\boxed{\{3, 2, 1\}}$"),
    ("set", r"\{1, 2, 3\}", r"$\boxed{1}, \boxed{2}, \boxed{3}$"),
    ("set", r"\{1, 2, 3\}", r"$\boxed{\{1, 2\}}$"),
    ("interval", "[1, 3)", r"$\boxed{[1, 3)}$"),
    ("interval", "[1, 3)", r"$\boxed{(1, 3]}$"),
    ("interval", r"(-\infty, 2] \cup [5, \infty)", r"$\boxed{(-\infty, 2] \cup [5, \infty)}$"),
    ("interval", r"(-\infty, 2] \cup [5, \infty)", r"$\boxed{(-\infty, 2) \cup [5, \infty)}$"),
    ("units", r"0.06 \text{ yuan}", r"$\boxed{0.06 \text{ yuan}}$"),
    ("units", r"0.06", r"$\boxed{0.06 \text{ yuan}}$"),
    ("units", "18", r"$\boxed{\$18}$"),
    ("units", "18", r"$\boxed{18 \text{ dollars}}$"),
    ("units", r"12 \text{ cm}^2", r"$\boxed{12}$"),
    ("units", r"12 \text{ cm}^2", r"$\boxed{13 \text{ cm}^2}$"),
    ("text", r"\text{Evelyn}", r"$\boxed{\text{Evelyn}}$"),
    ("text", r"\text{Evelyn}", r"$\boxed{\text{Alice}}$"),
    ("text", r"\text{(C)}", r"$\boxed{C}$"),
    ("hedge", "7", r"$\boxed{7}$ or $\boxed{8}$"),
    ("hedge", "7", r"$\boxed{7, 8}$"),
    ("hedge", "7", r"$\boxed{7 \text{ or } 8}$"),
    # deliberate differences (see stages/common/checkers.py): boxes far apart still count
    # together (a hedge), and one value boxed twice in two forms is one value
    ("hedge_far_apart", "143",
     r"A first guess is $\boxed{20}$, but checking the constraint again we find the final answer $\boxed{143}$."),
    ("restated", "5", r"The answer is $\boxed{5}$, that is, $\boxed{x = 5}$."),
    ("restated", "5", r"The answer is \boxed{5}. So \boxed{x = 5}"),
]


def _unboxed(text: str) -> str:
    """``text`` with every ``\\boxed{...}`` replaced by its content (the reasoning keeps the value)."""
    from stages.common.checkers import boxed_spans

    out, pos = [], 0
    for start, end, content in boxed_spans(text):
        out += [text[pos:start], content]
        pos = end
    return "".join(out + [text[pos:]])


def _bump(ans: str) -> str | None:
    """``ans`` with its last integer increased by one, or None without one."""
    ms = list(re.finditer(r"\d+", ans))
    if not ms:
        return None
    m = ms[-1]
    return ans[: m.start()] + str(int(m.group()) + 1) + ans[m.end():]


def _rewritten(ans: str) -> list[tuple[str, str]]:
    """Equivalent spellings of a gold answer, as a model might write them: ``(kind, form)``."""
    out = []
    if " " in ans.strip():
        out.append(("correct_spacing", re.sub(r"(?<![A-Za-z\\])\s+|\s+(?![A-Za-z])", "", ans)))
    elif "," in ans and not re.search(r"\d,(\\!)?\d{3}(?!\d)", ans):  # a list, not thousands
        out.append(("correct_spacing", ans.replace(",", ", ")))
    if "\\frac" in ans:
        out.append(("correct_dfrac", ans.replace("\\frac", "\\dfrac")))
    if re.fullmatch(r"-?\d+", ans.strip()):
        out.append(("correct_decimal", ans.strip() + ".0"))
    return [(k, f) for k, f in out if f != ans]


def agreement_pairs(limit: int | None = None) -> list[dict]:
    """Rows for the verifier plus what raw math-verify gets (``raw_gold``, ``completion``)."""
    out = []

    def add(source, kind, gold, raw_gold, reasoning, answer_part):
        completion = f"<think>\n{reasoning.strip()}\n</think>\n\n{answer_part}"
        out.append({"source": source, "kind": kind, "answer": gold, "raw_gold": raw_gold, "completion": completion,
                     "finish_reason": "stop", "error": None})

    math = [json.loads(line) for line in open(DATA / "math500" / "test.jsonl")][:limit]
    for i, r in enumerate(math):
        gold, reasoning = r["answer"], _unboxed(r["solution"])
        raw_gold = "$" + gold + "$"
        add("math500", "correct", gold, raw_gold, reasoning, f"The final answer is $\\boxed{{{gold}}}$.")
        for kind, form in _rewritten(gold):
            add("math500", kind, gold, raw_gold, reasoning, f"So the answer is $\\boxed{{{form}}}$.")
        bumped = _bump(gold)
        if bumped is not None:
            add("math500", "perturbed_number", gold, raw_gold, reasoning, f"The final answer is $\\boxed{{{bumped}}}$.")
        other = math[(i + 1) % len(math)]["answer"]
        add("math500", "other_answer", gold, raw_gold, reasoning, f"The final answer is $\\boxed{{{other}}}$.")
        if i % 5 == 0:
            add("math500", "hedge", gold, raw_gold, reasoning, f"It is $\\boxed{{{gold}}}$ or $\\boxed{{{other}}}$.")

    gsm = [json.loads(line) for line in open(DATA / "gsm8k" / "test.jsonl")][:limit]
    for i, r in enumerate(gsm):
        reasoning, num = r["answer"].rsplit("####", 1)
        num = num.strip()
        raw_gold = "$" + num + "$"
        plain = num.replace(",", "")
        add("gsm8k", "correct", r["answer"], raw_gold, reasoning, f"The answer is $\\boxed{{{plain}}}$.")
        n = int(plain) if re.fullmatch(r"-?\d+", plain) else None
        styled = (f"{n:,}" if n is not None and abs(n) >= 1000 else
                  [f"\\${plain}", f"{plain} \\text{{ dollars}}", f"{plain}\\text{{ apples}}"][i % 3])
        add("gsm8k", "correct_styled", r["answer"], raw_gold, reasoning, f"The answer is $\\boxed{{{styled}}}$.")
        wrong = str(n + 1) if n is not None else _bump(plain)
        add("gsm8k", "perturbed_number", r["answer"], raw_gold, reasoning, f"The answer is $\\boxed{{{wrong}}}$.")

    for kind, gold, answer_part in MULTI_PART:
        raw_gold = gold if ("$" in gold or "\\boxed" in gold) else "$" + gold + "$"
        add("multi_part", kind, gold, raw_gold, "Working through the cases one by one.", answer_part)
    return out


# generous on both sides, so that the comparison measures grading, not a loaded machine
AGREEMENT_TIMEOUT_S = 30


def raw_verdicts(rows: list[dict]) -> list[bool]:
    from math_verify import parse, verify

    return [bool(verify(parse(r["raw_gold"], parsing_timeout=AGREEMENT_TIMEOUT_S),
                        parse(r["completion"], parsing_timeout=AGREEMENT_TIMEOUT_S), timeout_seconds=AGREEMENT_TIMEOUT_S))
            for r in rows]


def agreement() -> None:
    import logging

    from stages.common.checkers import FormatSpec
    from stages.common.verifier import VerifierPool

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    limit = int(os.environ["VERIFY_AGREEMENT_LIMIT"]) if os.environ.get("VERIFY_AGREEMENT_LIMIT") else None
    rows = agreement_pairs(limit)
    t0 = time.perf_counter()
    base = raw_verdicts(rows)
    raw_s = time.perf_counter() - t0
    with VerifierPool(workers=2, timeout=AGREEMENT_TIMEOUT_S) as pool:
        pool.equal_many([("1", "2"), ("3", "4")])  # the workers' start-up out of the timing
        t0 = time.perf_counter()
        ours = pool.check_rows(rows, FormatSpec())
        ours_s = time.perf_counter() - t0
    by_kind: dict[str, int] = {}
    examples = []
    agree = 0
    for r, b, o in zip(rows, base, ours):
        if (o["verdict"] == "correct") == b and o["verdict"] != "error":
            agree += 1
            continue
        key = f"{r['source']}/{r['kind']}" + (f" ({o['reason']})" if o["verdict"] == "error" else "")
        by_kind[key] = by_kind.get(key, 0) + 1
        if len(examples) < 12:
            examples.append({"kind": key, "gold": r["answer"][-80:], "answer": r["completion"].rsplit("</think>", 1)[1].strip()[:120],
                             "math_verify": b, "ours": o["reason"]})
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[f"{r['source']}/{r['kind']}"] = kinds.get(f"{r['source']}/{r['kind']}", 0) + 1
    reasons: dict[str, int] = {}
    for o in ours:
        reasons[o["reason"]] = reasons.get(o["reason"], 0) + 1
    by_source: dict[str, list[int]] = {}
    for r, b, o in zip(rows, base, ours):
        c = by_source.setdefault(r["source"], [0, 0])
        c[0] += (o["verdict"] == "correct") == b and o["verdict"] != "error"
        c[1] += 1
    emit("verify-agreement", agree, len(rows), "pairs agreeing",
         agreement_by_source={k: round(a / n, 4) for k, (a, n) in by_source.items()}, pairs=kinds,
         math_verify_correct=sum(base),
         our_reasons=reasons, disagreements=by_kind, examples=examples, raw_seconds=round(raw_s, 1),
         ours_seconds=round(ours_s, 1))


def main() -> None:
    which = sys.argv[1:] or ["verify", "verify-agreement"]
    if "verify" in which:
        raw(pairs(20, seed=998))  # import + first-call costs out of the timing
        rounds = {"raw": 0, "one": 0, "two": 0, "raw_pool": 0}

        def fresh(side: str, offset: int) -> list:  # new pairs every round, the same for every side
            rounds[side] += 1
            return pairs(N, seed=offset + rounds[side])

        # every side checks the same pairs in the same round (caches are per process: the
        # service's workers and the pool's are new each run)
        r = interleaved({"raw": lambda: raw(fresh("raw", 100)),
                         "one": lambda: service(fresh("one", 100), 1),
                         "two": lambda: service(fresh("two", 100), 2),
                         "raw_pool": lambda: raw_pool(fresh("raw_pool", 100), 2)}, alternate=True)
        share = round(sum(shortcut_share(pairs(N, seed=100 + i)) for i in range(1, RUNS + 1)) / RUNS, 3)
        emit_medians("verify", r["one"], r["raw"], "checks/s", pairs=N, shortcut_share=share,
                     baseline_is="raw math-verify in one process, given the service's exact-string shortcut")
        emit_medians("verify-scaling", r["two"], r["one"], "checks/s", workers=2, pairs=N,
                     note="both sides on the same pairs")
        emit_medians("verify-pool", r["two"], r["raw_pool"], "checks/s", workers=2, pairs=N, shortcut_share=share,
                     baseline_is="multiprocessing.Pool(2) of raw math-verify with the same shortcut, same pairs")
    if "verify-agreement" in which:
        agreement()


if __name__ == "__main__":
    main()
