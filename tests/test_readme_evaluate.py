"""README promises of the Evaluation section, through ``distill run`` on a real engine: the
``base_student`` role and the student − base student comparison, the ``budgets`` sweep (each
role under budget forcing at each cap, its figures those of its own samples), and the promotion
gate through evaluate (the decision in the stage's metrics, on the terminal and in
``best/<name>.history/``; a second run compares student − best against the promoted one)."""
import json

import pytest
from conftest import write_jsonl
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.store import layout
from pipeline.store.storage import Storage
from stages.common.promotion import read_best

N, CAPS = 2, [4, 8]
ENGINE = "{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 16}"  # as test_evaluate_metrics: its kept engines


def _config(tmp_path, name: str, student: str, base: str, budgets: list[int]) -> str:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"""
name: readme-eval
storage: {{root: {tmp_path}/root}}
stages:
  heldout: {{uses: prompts, params: {{path: {tmp_path}/eval.jsonl}}}}
  train: {{uses: prompts, params: {{path: {tmp_path}/train.jsonl}}}}
  evaluate:
    inputs: {{prompts: heldout.prompts, train: train.prompts}}
    params:
      student: {student}
      base: {base}
      sampling: {{n: {N}, temperature: 1.0, max_tokens: 48, seed: 4}}
      ks: [1, {N}]
      budgets: {budgets}
      promote: {{name: readme}}
      engine: {ENGINE}
""")
    return str(cfg)


@pytest.mark.engine
def test_base_student_budget_sweep_and_promotion_through_evaluate(ray_local, tiny_model, solver_model,
                                                                  solver_eval_rows, tmp_path):
    prompts = solver_eval_rows[:16]
    write_jsonl(tmp_path / "eval.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]} for r in prompts])
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Compute 100 + 200 + 300.", "answer": "600"}])

    # round 1: the untrained model as the student, the solver as its "base": the first student is promoted
    cli = CliRunner().invoke(app, ["run", _config(tmp_path, "r1", tiny_model, solver_model, CAPS)])
    assert cli.exit_code == 0, cli.output
    terminal = " ".join(cli.output.split())  # rich wraps long lines
    assert "promoted to best/readme: first student of this pipeline" in terminal
    assert "budget sweep student: 4:" in terminal and "budget sweep base_student: 4:" in terminal
    assert "student - base_student: pass@1" in terminal
    st = Storage(str(tmp_path / "root"))
    ev1, rows1 = _latest_evaluate(st)
    m1 = ev1["metrics"]
    assert set(m1["roles"]) == {"student", "base_student"}
    (cmp,) = [c for c in m1["comparisons"] if (c["a"], c["b"]) == ("student", "base_student")]
    base = _pass1(rows1, "base_student", None)
    student = _pass1(rows1, "student", None)
    assert m1["roles"]["base_student"]["pass@1"] == pytest.approx(_mean(base))
    assert _mean(base) > 0  # the solver solves some
    assert cmp["diff"] == pytest.approx(_mean([student[p] - base[p] for p in base]))
    assert cmp["diff"] < 0 and cmp["prompts"] == len(prompts)
    # the budget sweep: each role at each cap, in order, its figures from its own samples
    sweep = m1["budget_sweep"]
    assert set(sweep) == {"student", "base_student"}
    for role, points in sweep.items():
        assert [pt["max_thinking_tokens"] for pt in points] == CAPS
        for pt in points:
            capped = [r for r in rows1 if r["role"] == role and r["max_thinking_tokens"] == pt["max_thinking_tokens"]]
            assert len(capped) == len(prompts) * N
            assert pt["pass@1"] == pytest.approx(_mean(_pass1(rows1, role, pt["max_thinking_tokens"])))
            scored = [r for r in capped if r["verdict"] != "error"]
            assert pt["mean_tokens"] == pytest.approx(sum(r["completion_tokens"] for r in scored) / len(scored))
    uncapped = [r for r in rows1 if r["max_thinking_tokens"] is None]
    assert len(uncapped) == 2 * len(prompts) * N  # the roles' own scores are not mixed with the sweep's
    p1 = m1["promotion"]
    assert p1["promoted"] and p1["pointer"] == "readme" and read_best(st, "readme")["model"] == tiny_model

    # round 2: the solver as the student, against the promoted untrained one: student - best, and a decision
    cli = CliRunner().invoke(app, ["run", _config(tmp_path, "r2", solver_model, tiny_model, [])])
    assert cli.exit_code == 0, cli.output
    ev2, rows2 = _latest_evaluate(st)
    m2 = ev2["metrics"]
    (vs_best,) = [c for c in m2["comparisons"] if c["b"] == "best"]
    best_scores = {p: s for p, s in _pass1(rows1, "student", None).items()}
    now = _pass1(rows2, "student", None)
    assert vs_best["best"] == tiny_model
    assert vs_best["diff"] == pytest.approx(_mean([now[p] - best_scores[p] for p in now])) and vs_best["diff"] > 0
    p2 = m2["promotion"]
    assert p2["promoted"] == (p2["margin"] > 2 * p2["se"])  # the stated rule, z = 2
    assert p2["margin"] == pytest.approx(vs_best["diff"])
    word = "promoted" if p2["promoted"] else "not promoted"
    terminal = " ".join(cli.output.split())
    assert f"{word} to best/readme: {p2['reason']}" in terminal and "student - best: pass@1" in terminal
    assert read_best(st, "readme")["model"] == (solver_model if p2["promoted"] else tiny_model)
    history = sorted(st.fs.ls(layout.promotion_event(st, "readme", "x").rsplit("/", 1)[0]))
    events = [json.loads(st.fs.cat(h)) for h in history]
    assert len(events) == 2 and {e["candidate"] for e in events} == {tiny_model, solver_model}
    assert [e["promoted"] for e in events if e["candidate"] == solver_model] == [p2["promoted"]]


def _latest_evaluate(st: Storage) -> tuple[dict, list[dict]]:
    runs = [p for p in st.fs.ls(st.path(layout.RUNS)) if not p.rsplit("/", 1)[1].startswith("_")]
    manifests = [st.read_json(f"{r}/manifest.json") for r in runs if st.exists(f"{r}/manifest.json")]
    latest = max(manifests, key=lambda m: m["started"])
    ev = next(s for s in latest["stages"] if s["name"] == "evaluate")
    return ev, st.read_dataset(st.strip(ev["output"]["samples"])).to_pylist()


def _pass1(rows: list[dict], role: str, cap) -> dict[str, float]:
    by: dict[str, list[bool]] = {}
    for r in rows:
        if r["role"] == role and r["max_thinking_tokens"] == cap and r["verdict"] != "error":
            by.setdefault(r["prompt_id"], []).append(r["verdict"] == "correct")
    return {p: sum(v) / len(v) for p, v in by.items()}


def _mean(values) -> float:
    values = list(values.values()) if isinstance(values, dict) else list(values)
    return sum(values) / len(values)
