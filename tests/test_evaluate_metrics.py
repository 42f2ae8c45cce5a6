"""evaluate's metrics, recomputed from its own sample rows, on a model that solves some of the
held-out problems (so a metric stuck at 0, or errors counted as wrong, would be caught), one of
them too long for the engine (its samples are errors)."""
import pytest
from conftest import output_rows, run_stages, write_jsonl
from test_pipeline_e2e import assert_metrics_match_rows

N = 4


@pytest.mark.engine
def test_evaluate_metrics_match_the_samples_on_a_model_that_solves_some(ray_local, solver_model, solver_eval_rows,
                                                                       tmp_path):
    # and one prompt too long for the engine: its samples come back as errors (an engine error,
    # verdict ``error``), which the metrics must leave out and count, never score as wrong
    too_long = {"prompt": "Compute " + " + ".join(str(i % 10) for i in range(120)) + ".", "answer": "540"}
    write_jsonl(tmp_path / "eval.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]} for r in solver_eval_rows]
                + [too_long])
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Compute 100 + 200 + 300.", "answer": "600"}])
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"""
name: eval-metrics
storage: {{root: {tmp_path}/root}}
stages:
  heldout: {{uses: prompts, params: {{path: {tmp_path}/eval.jsonl}}}}
  train: {{uses: prompts, params: {{path: {tmp_path}/train.jsonl}}}}
  evaluate:
    inputs: {{prompts: heldout.prompts, train: train.prompts}}
    params:
      student: {solver_model}
      sampling: {{n: {N}, temperature: 1.0, max_tokens: 64, seed: 1}}
      ks: [1, 2, {N}]
      engine: {{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 16}}
""")
    stages, st = run_stages(cfg)
    m = stages["evaluate"]["metrics"]["roles"]["student"]
    rows = output_rows(st, stages["evaluate"], "samples")
    assert len(rows) == (len(solver_eval_rows) + 1) * N
    errored = [r for r in rows if r["verdict"] == "error"]
    assert len(errored) == N and {r["reason"] for r in errored} == {"generation_error"}
    assert m["errored"] == N and m["prompts_all_errored"] == 1 and m["prompts"] == len(solver_eval_rows)
    assert 0 < m["pass@1"] < m[f"pass@{N}"] <= 1  # it solves some, not all: the checks below can fail
    assert_metrics_match_rows(m, rows, N)
    lo, hi = m["pass@1_ci95"]
    assert lo < m["pass@1"] < hi and m["pass@1_se"] > 0
