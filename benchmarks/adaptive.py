"""benchmark `adaptive`: verified traces per million generated tokens, adaptive ÷ fixed sampling.

On the demo task with the demo's toy teacher (built, or taken from cache, by
configs/toy-teacher.yaml under .distill). Fixed draws n=8 samples per prompt;
adaptive samples rounds of 2 per prompt and stops a prompt at `target_correct`
verified samples or 8 samples. Both use the same engine settings and seeds; the
JSON line also reports how many prompts reached `target_correct` under each, so
the two are compared at the same coverage.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, emit  # noqa: E402

N_PROMPTS, TARGET, MAX_SAMPLES = 256, 2, 8


def main() -> None:
    os.environ["DISTILL_KEEP_ENGINES"] = "1"
    os.chdir(REPO)
    from pipeline.config import load_config
    from pipeline.runner import Runner
    from pipeline.storage import Storage

    teacher_run = Runner(load_config("configs/toy-teacher.yaml")).run()
    if not teacher_run.ok:
        raise SystemExit(teacher_run.error)
    out = {s["name"]: s["output"] for s in teacher_run.manifest["stages"]}
    st = Storage(".distill")
    prompts = st.read_dataset(st.strip(out["toy_task"]["distill"])).slice(0, N_PROMPTS).to_pylist()
    teacher = out["teacher_sft"]["model"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "prompts.jsonl"
        src.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in prompts))
        for strategy in ("fixed", "adaptive"):
            sampling = {"n": MAX_SAMPLES, "temperature": 1.0, "max_tokens": 96, "seed": 0} if strategy == "fixed" else \
                {"strategy": "adaptive", "n": 2, "max_samples": MAX_SAMPLES, "target_correct": TARGET,
                 "temperature": 1.0, "max_tokens": 96, "seed": 0}
            cfg = Path(tmp) / f"{strategy}.yaml"
            cfg.write_text(json.dumps({"name": f"bench-{strategy}", "storage": {"root": f"{tmp}/{strategy}"}, "stages": {
                "prompts": {"params": {"path": str(src)}},
                "generate": {"inputs": {"prompts": "prompts.prompts"}, "params": {
                    "model": teacher, "sampling": sampling,
                    "engine": {"max_model_len": 256, "kv_cache_gb": 1, "batch_size": 256}}},
                "verify": {"inputs": {"samples": "generate.samples"}},
            }}))
            run = Runner(load_config(cfg)).run()
            if not run.ok:
                raise SystemExit(run.error)
            stages = {s["name"]: s for s in run.manifest["stages"]}
            rs = Storage(f"{tmp}/{strategy}")
            verified = rs.read_dataset(rs.strip(stages["verify"]["output"]["verified"]), columns=["prompt_id", "verdict"]).to_pylist()
            correct: dict[str, int] = {}
            for r in verified:
                correct[r["prompt_id"]] = correct.get(r["prompt_id"], 0) + (r["verdict"] == "correct")
            results[strategy] = {
                "traces": sum(correct.values()),
                "useful_traces": sum(min(c, TARGET) for c in correct.values()),
                "tokens": stages["generate"]["metrics"]["completion_tokens"],
                "prompts_at_target": sum(c >= TARGET for c in correct.values()),
            }
    per_m = {k: v["traces"] / v["tokens"] * 1e6 for k, v in results.items()}
    emit("adaptive", per_m["adaptive"], per_m["fixed"], "verified traces per 1M tokens",
         target_correct=TARGET, max_samples=MAX_SAMPLES, prompts=N_PROMPTS,
         prompts_at_target={k: v["prompts_at_target"] for k, v in results.items()},
         tokens={k: v["tokens"] for k, v in results.items()})
    # Traces past target_correct on a prompt are surplus (dedupe keeps at most k per prompt):
    # counting at most target_correct per prompt compares what each strategy pays per needed trace.
    useful = {k: v["useful_traces"] / v["tokens"] * 1e6 for k, v in results.items()}
    emit("adaptive-useful", useful["adaptive"], useful["fixed"], "traces (at most target_correct per prompt) per 1M tokens",
         target_correct=TARGET)


if __name__ == "__main__":
    main()
