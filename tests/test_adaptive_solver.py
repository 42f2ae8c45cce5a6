"""Adaptive sampling on a model that solves some prompts (the session's ``solver_model``, trained
here by the sft stage on toy-task gold solutions): prompts stop at ``target_correct`` verified
samples, or at ``max_tokens_per_prompt``, never a round later and never a round earlier, and
``prompt_stats`` records each prompt's pass-rate estimate. The verdicts are recomputed by a
verify stage downstream, independently of the ones generate used to decide when to stop."""
import random

import pytest
from conftest import output_rows, run_stages, write_jsonl

from stages.toy_task import make_problem

N, TARGET, MAX_SAMPLES, TOKEN_BUDGET = 2, 2, 10, 200


@pytest.mark.engine
def test_adaptive_sampling_stops_at_target_correct_and_records_difficulty(solver_model, solver_eval_rows, tmp_path):
    rng = random.Random(7)
    hard = [make_problem(rng, 4, 4, 40) for _ in range(4)]  # longer and larger than anything it trained on
    prompts = [{"prompt": r["prompt"], "answer": r["answer"]} for r in solver_eval_rows[:16]]
    prompts += [{"prompt": p, "answer": a} for p, _, a in hard]
    src = write_jsonl(tmp_path / "src.jsonl", prompts)
    cfg = tmp_path / "adaptive.yaml"
    cfg.write_text(f"""
name: adaptive-solver
storage: {{root: {tmp_path}/root}}
stages:
  prompts: {{params: {{path: {src}}}}}
  generate:
    inputs: {{prompts: prompts.prompts}}
    params:
      model: {solver_model}
      sampling: {{strategy: adaptive, n: {N}, target_correct: {TARGET}, max_samples: {MAX_SAMPLES},
                 max_tokens_per_prompt: {TOKEN_BUDGET}, temperature: 0.7, max_tokens: 48, seed: 0}}
      engine: {{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 8}}
  verify: {{inputs: {{samples: generate.samples}}}}
""")
    stages, st = run_stages(cfg)
    gen = stages["generate"]
    stats = {s["prompt_id"]: s for s in output_rows(st, gen, "prompt_stats")}
    by_prompt: dict[str, list[dict]] = {}
    for r in output_rows(st, stages["verify"], "verified"):
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    assert len(stats) == len(prompts) == len(by_prompt)

    def finished(samples: int, correct: int, tokens: int) -> bool:
        return correct >= TARGET or samples >= MAX_SAMPLES or tokens >= TOKEN_BUDGET

    stopped_by = {"target": 0, "tokens": 0, "max_samples": 0}
    for pid, rows in by_prompt.items():
        rows.sort(key=lambda r: r["sample_index"])
        assert [r["sample_index"] for r in rows] == list(range(len(rows)))  # rounds continue the indices
        samples = correct = tokens = 0
        for start in range(0, len(rows), N):  # replay the rounds: each was asked for while unfinished
            assert not finished(samples, correct, tokens), (pid, "a round was sampled after the prompt was done")
            for r in rows[start:start + N]:
                samples, correct, tokens = samples + 1, correct + (r["verdict"] == "correct"), tokens + r["completion_tokens"]
        assert finished(samples, correct, tokens), (pid, "the prompt stopped before any stopping rule held")
        stopped_by["target" if correct >= TARGET else "max_samples" if samples >= MAX_SAMPLES else "tokens"] += 1
        s = stats[pid]
        assert (s["samples"], s["correct"], s["completion_tokens"]) == (samples, correct, tokens)
        assert s["est_pass_rate"] == pytest.approx(correct / samples)
        assert s["exhausted_unsolved"] == (correct == 0)

    m = gen["metrics"]
    assert m["prompts_reaching_target"] == stopped_by["target"] >= 4  # the solver solves some prompts twice
    assert m["verified_samples"] == sum(s["correct"] for s in stats.values())
    assert m["prompts_exhausted_unsolved"] == sum(s["correct"] == 0 for s in stats.values())
    assert stopped_by["tokens"] >= 1  # the token budget stopped some prompt before max_samples
    # a prompt stopped at its target before max_samples, and the estimates differ by difficulty
    assert any(s["correct"] >= TARGET and s["samples"] < MAX_SAMPLES for s in stats.values())
    rates = {round(s["est_pass_rate"], 3) for s in stats.values()}
    assert max(rates) > 0 and len(rates) >= 3, rates
    assert m["samples"] < len(prompts) * MAX_SAMPLES  # adaptive sampling spent less than a fixed budget would
