"""The feedback loop's edge: hard_prompts scores a model on the training pool (refusing any
overlap with the held-out set) and feeds the next round's generate; concat joins rounds' data."""
import pytest
from conftest import output_rows, run_stages, write_jsonl

from pipeline.core.config import load_config
from pipeline.core.runner import Runner

POOL = [{"prompt": f"Compute {i} + {i + 3} - 1.", "answer": str(2 * i + 2)} for i in range(6)]
HELDOUT = [{"prompt": "Compute 40 + 2.", "answer": "42"}, {"prompt": "Compute 7 + 9.", "answer": "16"}]


def _config(tmp_path, model: str, pool: list[dict]) -> "object":
    write_jsonl(tmp_path / "pool.jsonl", pool)
    write_jsonl(tmp_path / "heldout.jsonl", HELDOUT)
    engine = "{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 8}"
    cfg = tmp_path / "loop.yaml"
    cfg.write_text(f"""
name: loop
storage: {{root: {tmp_path}/root}}
stages:
  pool: {{uses: prompts, params: {{path: {tmp_path}/pool.jsonl}}}}
  heldout: {{uses: prompts, params: {{path: {tmp_path}/heldout.jsonl}}}}
  hard:
    uses: hard_prompts
    inputs: {{prompts: pool.prompts, model: null, heldout: heldout.prompts}}
    params: {{model: {model}, threshold: 0.5, sampling: {{n: 2, max_tokens: 12, seed: 0}}, engine: {engine}}}
  generate_r2:
    uses: generate
    inputs: {{prompts: hard.hard_prompts}}
    params: {{model: {model}, sampling: {{n: 1, max_tokens: 8, seed: 5}}, engine: {engine}}}
  both:
    uses: concat
    inputs: {{a: pool.prompts, b: heldout.prompts}}
""".replace("model: null, ", ""))
    return cfg


@pytest.mark.engine
def test_hard_prompts_feed_the_next_rounds_generate(ray_local, tiny_model, tmp_path):
    stages, st = run_stages(_config(tmp_path, tiny_model, POOL))
    hard = output_rows(st, stages["hard"], "hard_prompts")
    # an untrained model solves nothing: every pool prompt is hard, with its stats
    assert sorted(r["prompt"] for r in hard) == sorted(r["prompt"] for r in POOL)
    assert all(r["pass_rate"] == 0.0 and r["samples"] == 2 and r["correct"] == 0 for r in hard)
    m = stages["hard"]["metrics"]
    assert (m["pool"], m["hard"], m["pool_pass@1"]) == (6, 6, 0.0)
    # the next round generates for exactly those prompts
    samples = output_rows(st, stages["generate_r2"], "samples")
    assert sorted({r["prompt_id"] for r in samples}) == sorted(r["prompt_id"] for r in hard)
    # concat: a's rows, then b's
    both = output_rows(st, stages["both"], "data")
    assert [r["prompt"] for r in both] == [r["prompt"] for r in POOL] + [r["prompt"] for r in HELDOUT]
    assert stages["both"]["metrics"]["rows_per_input"] == [6, 2]


def test_hard_prompts_refuse_a_pool_that_overlaps_the_heldout_set(ray_local, tiny_model, tmp_path):
    result = Runner(load_config(_config(tmp_path, tiny_model, POOL + HELDOUT[:1]))).run()
    assert not result.ok
    assert "overlap the training data" in result.stage_errors["hard"]
    assert "1 shared prompt_id(s)" in result.stage_errors["hard"]  # found by its id (the same prompt)


@pytest.mark.engine
def test_hard_prompts_threshold_on_a_model_that_solves_some(ray_local, solver_model, solver_eval_rows, tmp_path):
    """On the session's solver (it solves some toy problems, not all), each prompt lands on the
    side of ``threshold`` its pass rate puts it: hard below, solved at or above; a prompt too
    long for the engine errors on every sample and is counted as errored, never as hard."""
    too_long = {"prompt": "Compute " + " + ".join(str(i % 10) for i in range(120)) + ".", "answer": "540"}
    pool = [{"prompt": r["prompt"], "answer": r["answer"]} for r in solver_eval_rows[:24]] + [too_long]
    cfg = _config(tmp_path, solver_model, pool)
    text = cfg.read_text().replace("threshold: 0.5, sampling: {n: 2, max_tokens: 12, seed: 0}",
                                   "threshold: 0.5, sampling: {n: 4, temperature: 1.0, max_tokens: 48, seed: 3}")
    cfg.write_text(text.replace("kv_cache_gb: 0.25, batch_size: 8", "kv_cache_gb: 0.25, batch_size: 16"))
    stages, st = run_stages(cfg)
    rec = stages["hard"]
    hard = output_rows(st, rec, "hard_prompts")
    assert all(r["samples"] == 4 and r["pass_rate"] == r["correct"] / 4 < 0.5 for r in hard), hard
    solved = rec["dropped"].get("removed", {}).get("solved", 0)
    assert hard and solved, (len(hard), solved)  # the rule is exercised on both sides
    assert rec["dropped"].get("errored") == {"all_samples_errored": 1}  # the too-long prompt
    assert too_long["prompt"] not in {r["prompt"] for r in hard}
    m = rec["metrics"]
    assert (m["pool"], m["hard"]) == (25, len(hard)) and len(hard) + solved + 1 == 25
    assert 0 < m["pool_pass@1"] < 1
