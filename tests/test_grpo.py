"""The grpo stage: its reward is verify's verdict, from the verifier's worker processes with
their hard deadline (a pathological answer gets 0 with reason timeout and the step goes on);
on a model that solves some prompts it trains on Ray Train and records the reward curves."""
import pytest
from conftest import run_stage_on_rows, write_jsonl
from test_verify_code_stage import sandbox_here  # noqa: F401  (a fixture)

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


def test_reward_by_visit_pairs_each_prompt_with_its_first_visit():
    """Two calls score prompt a and b, the third a again: visit 2 holds a only, paired with its visit 1."""
    from stages.grpo import RewardByVisit

    v = RewardByVisit()
    v.add(["a", "a", "b", "b"], [0.0, 1.0, 1.0, 1.0])  # a: 0.5, b: 1.0
    v.add(["c", "c"], [0.0, 0.0])
    v.add(["a", "a", "c", "c"], [1.0, 1.0, 1.0, 0.0])  # a: 1.0 (+0.5), c: 0.5 (+0.5)
    first, second = v.summary()
    assert first == {"visit": 1, "prompts": 3, "mean_reward": 0.5}
    assert second == {"visit": 2, "prompts": 2, "mean_reward": 0.75, "paired_prompts": 2, "gain_vs_first": 0.5,
                      "gain_se": 0.0}
    v.add(["b", "b"], [0.0, 0.0])  # b falls by 1.0: the gains are now +0.5, +0.5, -1.0
    second = v.summary()[1]
    assert second["paired_prompts"] == 3 and second["gain_vs_first"] == 0.0
    assert second["gain_se"] == pytest.approx(round((0.75 ** 0.5) / 3 ** 0.5, 4))  # sd of (0.5, 0.5, -1) / sqrt(3)


def test_the_reward_tallies_visits_by_prompt_id():
    reward = VerifierReward(FormatSpec(), timeout_s=2.0, max_completion_length=MAXLEN)
    good, bad = "<think>x</think> \\boxed{7}", "<think>x</think> \\boxed{8}"
    reward(prompts=[[]] * 2, completions=[bad, good], completion_ids=[[1]] * 2, answer=["7"] * 2, prompt_id=["p", "p"])
    reward(prompts=[[]] * 2, completions=[good, good], completion_ids=[[1]] * 2, answer=["7"] * 2, prompt_id=["p", "p"])
    assert [(r["visit"], r["mean_reward"]) for r in reward.by_visit.summary()] == [(1, 0.5), (2, 1.0)]
    assert reward.by_visit.summary()[1]["gain_vs_first"] == 0.5


def test_format_reward_pays_a_well_formed_wrong_answer_only():
    reward = VerifierReward(FormatSpec(), timeout_s=2.0, max_completion_length=MAXLEN, format_reward=0.2)
    got = reward(prompts=[[]] * 3, completions=["<think>x</think> \\boxed{7}", "<think>x</think> \\boxed{8}",
                                                "no reasoning \\boxed{8}"],
                 completion_ids=[[1]] * 3, answer=["7"] * 3)
    assert got == [1.0, 0.2, 0.0]


def test_code_rows_are_rewarded_by_the_sandbox_as_verify_checks_them(sandbox_here):
    """Code rows (a tests column) run in the sandbox, math rows beside them go to the verifier's
    workers: each reward is [verdict == correct] of verify's checks on the same rows (the
    verdicts the verify stage gives them in tests/test_verify_code_stage.py)."""
    from test_verify_code_stage import ROWS

    from stages.common.sandbox import CodeSpec

    reward = VerifierReward(FormatSpec(), timeout_s=2.0, max_completion_length=MAXLEN,
                            code=CodeSpec(timeout_s=2, cpu_seconds=10))
    math = ("<think>x</think> \\boxed{7}", "7")
    completions = [c for c, *_ in ROWS] + [math[0]]
    logged: dict = {}
    got = reward(prompts=[[]] * len(completions), completions=completions, completion_ids=[[1]] * len(completions),
                 answer=[""] * len(ROWS) + [math[1]], tests=[t for _, t, *_ in ROWS] + [None],
                 test_kind=[k for _, _, k, *_ in ROWS] + [None], log_metric=lambda k, v: logged.__setitem__(k, v))
    assert got == [1.0 if v == "correct" else 0.0 for *_, v, _ in ROWS] + [1.0]
    reasons = [r for *_, r in ROWS] + ["ok"]
    assert logged == {f"verify/{r}": reasons.count(r) / len(reasons) for r in set(reasons)}
    # a format reward pays a program that ran and failed, never one with no code block
    paid = VerifierReward(FormatSpec(), timeout_s=2.0, max_completion_length=MAXLEN, format_reward=0.25,
                          code=CodeSpec(timeout_s=2, cpu_seconds=10))
    got = paid(prompts=[[]] * 3, completions=[ROWS[0][0], ROWS[1][0], ROWS[8][0]], completion_ids=[[1]] * 3,
               answer=[""] * 3, tests=[ROWS[0][1], ROWS[1][1], ROWS[8][1]], test_kind=["function_call"] * 3)
    assert got == [1.0, 0.25, 0.0]


@pytest.mark.engine
def test_grpo_trains_on_the_solver_then_a_killed_driver_resumes(ray_local, solver_model, solver_eval_rows, tmp_path):
    """GRPO on a model that solves some prompts: a driver killed mid-training with the Ray it
    started (the whole tree at once, as a lost machine would: after a killpg, Ray's workers train
    on for a moment, and on a fast machine they finished all 12 steps) leaves checkpoints; the
    re-run resumes from the last one Ray Train registered and trains the remaining steps with the
    same step numbers, recording the reward curves as it goes."""
    import os
    import subprocess
    import sys
    import time

    from conftest import REPO, ProcessWatch, kill_tree, run_stages

    from pipeline.store import layout
    from pipeline.store.storage import Storage
    from stages.common.training import registered_checkpoint_step

    src = write_jsonl(tmp_path / "src.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]}
                                               for r in solver_eval_rows[:16]])
    root = tmp_path / "root"
    steps, every = 12, 3
    cfg = tmp_path / "grpo.yaml"
    cfg.write_text(f"""
name: grpo-test
storage: {{root: {root}}}
ray: {{num_cpus: 2}}
stages:
  prompts: {{params: {{path: {src}}}}}
  grpo:
    inputs: {{data: prompts.prompts}}
    params: {{model: {solver_model}, num_generations: 4, batch_size: 8, max_steps: {steps}, max_completion_length: 48,
             temperature: 1.0, learning_rate: 1.0e-5, logging_steps: 1, checkpoint_every: {every}, num_cpus: 1,
             seed: 0}}
""")
    st = Storage(str(root))

    def registered():
        st.fs.invalidate_cache()
        runs = [p.rsplit("/", 1)[0] for p in st.fs.glob(layout.train_run_glob(st))]
        return registered_checkpoint_step(st, runs[0]) if runs else None

    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(cfg)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    watch = ProcessWatch(proc.pid)
    try:
        deadline = time.time() + 600  # hang guard, not a timing claim
        while time.time() < deadline and proc.poll() is None and not registered():
            time.sleep(0.1)
        assert proc.poll() is None, "the first run finished before its driver could be killed"
    finally:
        kill_tree(proc.pid)  # the driver and the Ray it started, all at once: no step lands after
        proc.wait(30)
    assert watch.survivors(wait=60) == []
    step = registered()
    assert step and step % every == 0 and step < steps, f"registered step {step}"

    records, _ = run_stages(cfg)
    m = records["grpo"]["metrics"]
    [start] = m["worker_starts"]
    assert start["resumed_from_step"] == step, m["worker_starts"]  # the last checkpoint the killed run registered
    assert start["first_step"] == step + 1 and start["last_step"] == m["steps"] == steps
    rerun = list(range(step + 1, steps + 1))  # the same step numbers, continued
    assert [s for s, _ in m["loss_curve"]] == rerun
    curves = m["curves"]
    assert [s for s, _ in curves["reward"]] == rerun
    assert all(0 <= v <= 1 for _, v in curves["reward"])
    assert any(v > 0 for _, v in curves["reward"])  # the solver solves some: some completions are rewarded
    shares = {k: v for k, v in curves.items() if k.startswith("verify/")}
    assert "verify/ok" in shares
    for s in rerun:  # each step's reasons cover all its completions
        assert sum(v for c in shares.values() for t, v in c if t == s) == pytest.approx(1.0)
    assert {"completions/mean_length", "completions/clipped_ratio"} <= set(curves)
    assert [c for c in m["checkpoints"] if c > step] == list(range(step + every, steps + 1, every))
    # the same prompts followed across visits, counted from the step the resumed group started at:
    # every group scored since then (2 prompts per step) is one prompt's visit
    assert m["reward_by_visit_from_step"] == step
    assert sum(v["prompts"] for v in m["reward_by_visit"]) == (steps - step) * 8 // 4
