"""benchmark `adaptive`: verified traces per million generated tokens, adaptive ÷ fixed sampling,
at the same coverage (prompts with at least `target_correct` verified traces).

On the demo task with the demo's toy teacher (built, or taken from cache, by
configs/toy-teacher.yaml under .distill), on 256 distill prompts.

- Adaptive: rounds of 2 samples per prompt, verified as they finish; a prompt stops at
  `target_correct` verified traces, at `max_samples`, or when it has no verified trace
  after `give_up_after` samples.
- Fixed: one run of n = `max_samples` samples per prompt, verified. Its samples are
  i.i.d. per index, so the first n of them are a fixed-n run for every n <= max_samples.
  Fixed is charged at the smallest n whose coverage reaches adaptive's coverage (the
  line reports both coverages and that n).

Counting: `adaptive` counts at most `target_correct` traces per prompt, the traces the
dataset keeps (dedupe's max_per_prompt is the same k); traces past that on easy prompts
are surplus. `adaptive-all-traces` counts every verified trace, surplus included.
Both sides use the same teacher, engine settings and sampling temperature.

Sampling noise: the comparison is made ``BENCH_RUNS`` (default 3) times with sampling seeds
0, 1, 2, ..., the two sides' runs interleaved (fixed, adaptive, adaptive, fixed, ...); lines
give the median ratio over seeds with its spread (``_common.emit_medians``), and `coverage`,
`tokens` and `fixed_n` per seed.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RUNS, emit_medians, interleaved, summary  # noqa: E402

N_PROMPTS, TARGET, MAX_SAMPLES, GIVE_UP, ROUND = 256, 2, 16, 6, 2


def _run(tmp: str, name: str, src: Path, teacher: str, sampling: dict) -> list[dict]:
    """One pipeline run (prompts, generate, verify) in its own storage root, so nothing is cached."""
    from pipeline.core.config import load_config
    from pipeline.core.runner import Runner
    from pipeline.store.storage import Storage

    cfg = Path(tmp) / f"{name}.yaml"
    cfg.write_text(json.dumps({"name": f"bench-{name}", "storage": {"root": f"{tmp}/{name}"}, "stages": {
        "prompts": {"params": {"path": str(src)}},
        "generate": {"inputs": {"prompts": "prompts.prompts"}, "params": {
            "model": teacher, "sampling": {"temperature": 1.0, "max_tokens": 96, **sampling},
            "engine": {"max_model_len": 256, "kv_cache_gb": 1}}},
        "verify": {"inputs": {"samples": "generate.samples"}},
    }}))
    run = Runner(load_config(cfg)).run()
    if not run.ok:
        raise SystemExit(run.error)
    stages = {s["name"]: s for s in run.manifest["stages"]}
    rs = Storage(f"{tmp}/{name}")
    return rs.read_dataset(rs.strip(stages["verify"]["output"]["verified"]),
                           columns=["prompt_id", "sample_index", "verdict", "completion_tokens"]).to_pylist()


def _score(rows: list[dict]) -> dict:
    correct: dict[str, int] = {}
    for r in rows:
        correct[r["prompt_id"]] = correct.get(r["prompt_id"], 0) + (r["verdict"] == "correct")
    return {"tokens": sum(r["completion_tokens"] for r in rows), "traces": sum(correct.values()),
            "kept_traces": sum(min(c, TARGET) for c in correct.values()),
            "coverage": sum(c >= TARGET for c in correct.values())}


def main() -> None:
    os.environ["DISTILL_KEEP_ENGINES"] = "1"
    os.chdir(REPO)
    from pipeline.core.config import load_config
    from pipeline.core.runner import Runner
    from pipeline.store.storage import Storage

    teacher_run = Runner(load_config("configs/toy-teacher.yaml")).run()
    if not teacher_run.ok:
        raise SystemExit(teacher_run.error)
    out = {s["name"]: s["output"] for s in teacher_run.manifest["stages"]}
    st = Storage(".distill")
    prompts = st.read_dataset(st.strip(out["toy_task"]["distill"])).slice(0, N_PROMPTS).to_pylist()
    teacher = out["teacher_sft"]["model"]
    runs: dict[str, list] = {"fixed": [], "adaptive": []}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "prompts.jsonl"
        src.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in prompts))

        def fixed() -> float:
            seed = len(runs["fixed"])
            runs["fixed"].append(_run(tmp, f"fixed-{seed}", src, teacher, {"n": MAX_SAMPLES, "seed": seed}))
            return seed

        def adaptive() -> float:
            seed = len(runs["adaptive"])
            runs["adaptive"].append(_score(_run(tmp, f"adaptive-{seed}", src, teacher, {
                "strategy": "adaptive", "n": ROUND, "max_samples": MAX_SAMPLES, "target_correct": TARGET,
                "give_up_after": GIVE_UP, "seed": seed})))
            return seed

        interleaved({"fixed": fixed, "adaptive": adaptive}, runs=RUNS, alternate=True)
    kept = {"adaptive": [], "fixed": []}
    every = {"adaptive": [], "fixed": []}
    per_seed = []
    for fixed_rows, ada in zip(runs["fixed"], runs["adaptive"]):
        curve = {n: _score([r for r in fixed_rows if r["sample_index"] < n]) for n in range(1, MAX_SAMPLES + 1)}
        n_fixed = next((n for n, s in curve.items() if s["coverage"] >= ada["coverage"]), MAX_SAMPLES)
        fix = curve[n_fixed]
        for side, sc in (("adaptive", ada), ("fixed", fix)):
            kept[side].append(sc["kept_traces"] / sc["tokens"] * 1e6)
            every[side].append(sc["traces"] / sc["tokens"] * 1e6)
        per_seed.append({"fixed_n": n_fixed, "coverage": {"adaptive": ada["coverage"], "fixed": fix["coverage"]},
                         "tokens": {"adaptive": ada["tokens"], "fixed": fix["tokens"]}})
    common = {"target_correct": TARGET, "max_samples": MAX_SAMPLES, "give_up_after": GIVE_UP, "prompts": N_PROMPTS,
              "seeds": list(range(len(per_seed))), "per_seed": per_seed}
    emit_medians("adaptive", summary(kept["adaptive"]), summary(kept["fixed"]),
                 "kept verified traces (<= target_correct per prompt) per 1M tokens", **common)
    emit_medians("adaptive-all-traces", summary(every["adaptive"]), summary(every["fixed"]),
                 "verified traces per 1M tokens", fixed_n=[s["fixed_n"] for s in per_seed])


if __name__ == "__main__":
    main()
