"""Helpers shared by the benchmarks: a tiny model built locally, JSON-line output."""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def emit(benchmark: str, ours: float, baseline: float, unit: str, lower_is_better: bool = False, **extra) -> None:
    """One JSON line. ``ratio`` is ours ÷ baseline, or baseline ÷ ours for a ``lower_is_better``
    unit (seconds), so that a higher ratio is always better."""
    if lower_is_better:
        ratio = round(baseline / ours, 4) if ours else None
        extra = {"ratio_is": "baseline / ours (lower is better for this unit)", **extra}
    else:
        ratio = round(ours / baseline, 4) if baseline else None
    print(json.dumps({"benchmark": benchmark, "ratio": ratio, "ours": round(ours, 2), "baseline": round(baseline, 2),
                      "unit": unit, **extra}), flush=True)


def toy_rows(n: int, seed: int = 0) -> list[dict]:
    from stages.toy_task import make_problem

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, solution, answer = make_problem(rng, 2, 3, 40, 0.5)
        rows.append({"prompt": prompt, "answer": answer, "solution": solution})
    return rows


def build_model(out: Path, layers: int = 2, hidden: int = 256, max_pos: int = 1024) -> str:
    """A randomly initialised Llama with a tokenizer trained here on toy arithmetic text."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.init_model import build_tokenizer

    rows = toy_rows(2000)
    tok = build_tokenizer([t for r in rows for t in (r["prompt"], r["solution"])], 384)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=max_pos,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


RUNS = int(os.environ.get("BENCH_RUNS", "3"))  # interleaved runs per side, every benchmark


def interleaved(sides: dict, runs: int = RUNS, alternate: bool = False) -> dict[str, dict]:
    """Run each side's zero-argument callable ``runs`` times, interleaved (a, b, a, b, ...), so a
    slow spell of the machine hits every side alike; ``alternate`` reverses the order every other
    round (a, b, b, a, ...), so neither side always runs first. Per side: median, min, max and
    every run, in round order."""
    values: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for i in range(runs):
        for name in (order[::-1] if alternate and i % 2 else order):
            values[name].append(float(sides[name]()))
    return {name: summary(v) for name, v in values.items()}


def summary(values: list[float]) -> dict:
    """Median, min, max and every value (in round order), as ``interleaved`` gives per side."""
    import statistics

    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": [round(x, 4) for x in values]}


def emit_medians(benchmark: str, ours: dict, baseline: dict, unit: str, lower_is_better: bool = False,
                 **extra) -> None:
    """One JSON line: the ratio of medians, with the spread: ``ratio_min``/``ratio_max`` pair the
    worst and best runs of the two sides; ``round_ratios`` are ours ÷ baseline within each round
    (neighbouring runs), with their median, min and max (from ``interleaved``)."""
    import statistics

    def r(a: float, b: float) -> float | None:
        if lower_is_better:
            a, b = b, a
        return round(a / b, 4) if b else None

    rounds = [r(a, b) for a, b in zip(ours["runs"], baseline["runs"])]
    rounds_ok = [x for x in rounds if x is not None]
    lo, hi = ("max", "min") if lower_is_better else ("min", "max")  # each side's worst, best run
    emit(benchmark, ours["median"], baseline["median"], unit, lower_is_better,
         ratio_min=r(ours[lo], baseline[hi]), ratio_max=r(ours[hi], baseline[lo]),
         round_ratios=rounds, round_ratio_median=round(statistics.median(rounds_ok), 4) if rounds_ok else None,
         round_ratio_min=min(rounds_ok, default=None), round_ratio_max=max(rounds_ok, default=None),
         runs=len(ours["runs"]), ours_runs=ours["runs"], baseline_runs=baseline["runs"], **extra)
