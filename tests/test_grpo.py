"""The grpo stage: its reward is verify's verdict, from the verifier's worker processes with
their hard deadline (a pathological answer gets 0 with reason timeout and the step goes on);
on a model that solves some prompts it trains on Ray Train and records the reward curves."""
import pytest
from conftest import run_stage_on_rows, write_jsonl

from stages.common.checkers import FormatSpec
from stages.grpo import VerifierReward
from stages.verify import Verify

MAXLEN = 32
CASES = [  # completion, gold, completion tokens, the reason verify gives
    ("<think>x</think> \\boxed{7}", "7", 10, "ok"),
    ("<think>x</think> \\boxed{8}", "7", 10, "wrong_answer"),
    ("<think>x</think> \\boxed{7} or \\boxed{8}", "7", 10, "hedged_answer"),
    ("no reasoning \\boxed{7}", "7", 10, "missing_think"),
    ("<think>x</think> no box", "7", 10, "no_boxed_answer"),
    ("<think>x</think> \\boxed{7}", "7", MAXLEN, "truncated"),  # cut at max_completion_length
    ("<think>x</think> \\boxed{9^{9^{9^{9}}}}", "1", 10, "timeout"),  # a power tower: the deadline stops it
    ("<think>x</think> \\boxed{7}", "", 10, "bad_gold"),
]


def test_reward_is_verify_verdict_for_every_reason(ray_local, tmp_path):
    reward = VerifierReward(FormatSpec(), timeout_s=2.0, max_completion_length=MAXLEN)
    logged: dict = {}
    rewards = reward(prompts=[[{"role": "user", "content": "q"}]] * len(CASES),
                     completions=[[{"role": "assistant", "content": c}] for c, _, _, _ in CASES],
                     completion_ids=[[1] * n for _, _, n, _ in CASES], answer=[g for _, g, _, _ in CASES],
                     log_metric=lambda k, v: logged.__setitem__(k, v))
    rows = [{"prompt_id": f"p{i}", "sample_index": 0, "prompt": "q", "completion": c, "answer": g,
             "finish_reason": "length" if n >= MAXLEN else "stop", "error": None}
            for i, (c, g, n, _) in enumerate(CASES)]
    ctx, _ = run_stage_on_rows(tmp_path, Verify, {"timeout_s": 2.0}, {"samples": rows})
    verified = ctx.storage.read_dataset(ctx.written["verified"].path).to_pylist()
    assert [v["reason"] for v in verified] == [r for *_, r in CASES]  # every reason, as verify gives it
    assert rewards == [1.0 if v["verdict"] == "correct" else 0.0 for v in verified]
    assert rewards == [1.0] + [0.0] * (len(CASES) - 1)
    assert logged == {f"verify/{r}": 1 / len(CASES) for *_, r in CASES}  # each reason's share of the step
    # the pool survived the pathological answer: the next check is answered
    assert reward(prompts=[[]], completions=["<think>y</think> \\boxed{3}"], completion_ids=[[1]], answer=["3"]) == [1.0]


def test_format_reward_pays_a_well_formed_wrong_answer_only():
    reward = VerifierReward(FormatSpec(), timeout_s=2.0, max_completion_length=MAXLEN, format_reward=0.2)
    got = reward(prompts=[[]] * 3, completions=["<think>x</think> \\boxed{7}", "<think>x</think> \\boxed{8}",
                                                "no reasoning \\boxed{8}"],
                 completion_ids=[[1]] * 3, answer=["7"] * 3)
    assert got == [1.0, 0.2, 0.0]


@pytest.mark.engine
def test_grpo_trains_on_the_solver_and_records_rewards(solver_model, solver_eval_rows, tmp_path):
    from conftest import run_stages

    src = write_jsonl(tmp_path / "src.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]}
                                               for r in solver_eval_rows[:8]])
    cfg = tmp_path / "grpo.yaml"
    cfg.write_text(f"""
name: grpo-test
storage: {{root: {tmp_path}/root}}
stages:
  prompts: {{params: {{path: {src}}}}}
  grpo:
    inputs: {{data: prompts.prompts}}
    params: {{model: {solver_model}, num_generations: 4, batch_size: 8, max_steps: 2, max_completion_length: 48,
             temperature: 1.0, learning_rate: 1.0e-5, logging_steps: 1, checkpoint_every: 1, num_cpus: 1, seed: 0}}
""")
    stages, _ = run_stages(cfg)
    m = stages["grpo"]["metrics"]
    assert m["steps"] == 2 and [s for s, _ in m["loss_curve"]] == [1, 2]
    curves = m["curves"]
    assert [s for s, _ in curves["reward"]] == [1, 2]
    assert all(0 <= v <= 1 for _, v in curves["reward"])
    assert any(v > 0 for _, v in curves["reward"])  # the solver solves some: some completions are rewarded
    shares = {k: v for k, v in curves.items() if k.startswith("verify/")}
    assert "verify/ok" in shares
    for step in (1, 2):  # each step's reasons cover all its completions
        assert sum(v for c in shares.values() for s, v in c if s == step) == pytest.approx(1.0)
    assert {"completions/mean_length", "completions/clipped_ratio"} <= set(curves)
    assert m["checkpoints"] == [1, 2]
