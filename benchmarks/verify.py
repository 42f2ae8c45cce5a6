"""benchmarks `verify` and `verify-scaling`.

`verify`: verifier-service checks/s with one worker process ÷ raw single-process
math-verify (`parse` + `verify`) on the same unique (gold, answer) pairs.
`verify-scaling`: two workers ÷ one worker on fresh unique pairs.
Pairs are unique and never string-equal, so neither side's caches or fast paths help.
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

N = 400


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


def raw(ps) -> float:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    cfg = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    t0 = time.perf_counter()
    for g, p in ps:
        verify(parse("\\boxed{" + g + "}", extraction_config=cfg), parse("\\boxed{" + p + "}", extraction_config=cfg))
    return len(ps) / (time.perf_counter() - t0)


def service(ps, workers: int) -> float:
    from stages.common.verifier import VerifierPool

    with VerifierPool(workers=workers, timeout=10.0) as pool:
        pool.equal_many(pairs(workers * 4, seed=999))  # warm the workers' imports
        t0 = time.perf_counter()
        pool.equal_many(ps)
        return len(ps) / (time.perf_counter() - t0)


def main() -> None:
    raw(pairs(20, seed=998))  # import + first-call costs out of the timing
    base = raw(pairs(N, seed=1))
    one = service(pairs(N, seed=1), 1)  # same pairs as the baseline; caches are per process
    two = service(pairs(N, seed=3), 2)
    emit("verify", one, base, "checks/s", pairs=N)
    emit("verify-scaling", two, one, "checks/s", workers=2)


if __name__ == "__main__":
    main()
