"""Helpers shared by the benchmarks: a tiny model built locally, JSON-line output."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def emit(benchmark: str, ours: float, baseline: float, unit: str, **extra) -> None:
    print(json.dumps({"benchmark": benchmark, "ratio": round(ours / baseline, 4) if baseline else None,
                      "ours": round(ours, 2), "baseline": round(baseline, 2), "unit": unit, **extra}), flush=True)


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


def interleaved(sides: dict, runs: int = 3) -> dict[str, dict]:
    """Run each side's zero-argument callable ``runs`` times, interleaved (a, b, a, b, ...), so a
    slow spell of the machine hits every side alike. Per side: median, min, max and every run."""
    import statistics

    values: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(runs):
        for name, fn in sides.items():
            values[name].append(float(fn()))
    return {name: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": [round(x, 2) for x in v]}
            for name, v in values.items()}


def emit_medians(benchmark: str, ours: dict, baseline: dict, unit: str, **extra) -> None:
    """One JSON line: the ratio of medians, with each side's min, max and runs (from ``interleaved``)."""
    emit(benchmark, ours["median"], baseline["median"], unit,
         ratio_min=round(ours["min"] / baseline["max"], 4) if baseline["max"] else None,
         ratio_max=round(ours["max"] / baseline["min"], 4) if baseline["min"] else None,
         ours_runs=ours["runs"], baseline_runs=baseline["runs"], **extra)
