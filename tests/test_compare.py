"""The compare stage on hand-built evaluate samples (a matrix of FixtureRowsDouble stages,
test doubles of evaluate, through the runner: no engine), and the subsample and answer_only stages that make the ablation's data."""
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from conftest import output_rows, run_stages, write_jsonl

from pipeline.core.config import load_config
from pipeline.core.runner import Runner
from stages.answer_only import strip_reasoning

pytestmark = pytest.mark.usefixtures("ray_local")

# per (data, seed): per prompt, the verdicts of its student samples (c correct, w wrong, e error)
RUNS = {
    ("a", 0): {"p1": "cc", "p2": "cw", "p3": "cw"},
    ("a", 1): {"p1": "cc", "p2": "cc", "p3": "wc"},
    ("b", 0): {"p1": "cc", "p2": "ww", "p3": "cw"},   # a's seed 0 but p2: close to a
    ("b", 1): {"p1": "cc", "p2": "cc", "p3": "cwe"},  # an errored sample: left out, not wrong
    ("c", 0): {"p1": "ww", "p2": "ww", "p3": "ww"},   # far below a
    ("c", 1): {"p1": "ww", "p2": "ww", "p3": "ww"},
}
VERDICT = {"c": "correct", "w": "wrong", "e": "error"}


def _rows(data: str, seed: int) -> list[dict]:
    rows = []
    for pid, verdicts in RUNS[(data, seed)].items():
        for i, v in enumerate(verdicts):
            rows.append({"role": "student", "prompt_id": pid, "sample_index": i, "verdict": VERDICT[v]})
        # rows compare must leave out: another role, and a budget-forcing run
        # (the teacher fails p3 in seed 1: its seed scores differ, for ratio_to)
        rows.append({"role": "teacher", "prompt_id": pid, "sample_index": 0,
                     "verdict": "wrong" if (pid, seed) == ("p3", 1) else "correct"})
        rows.append({"role": "student", "prompt_id": pid, "sample_index": 9, "verdict": "correct",
                     "max_thinking_tokens": 16})
    return rows


def _config(tmp_path: Path, compare_params: str = "{baseline: {data: a}, group_by: [data], across: seed}") -> Path:
    for (data, seed) in RUNS:
        write_jsonl(tmp_path / f"{data}-{seed}.jsonl", _rows(data, seed))
    cfg = tmp_path / "cmp.yaml"
    cfg.write_text(f"""
name: cmp
storage: {{root: {tmp_path}/root}}
matrix: {{seed: [0, 1], data: [a, b, c]}}
stages:
  evaluate_rows_double:  # a test double of evaluate: hand-written sample rows, no engine
    uses: "fixture_rows_stage:FixtureRowsDouble"
    matrix: [seed, data]
    params: {{path: "{tmp_path}/{{data}}-{{seed}}.jsonl"}}
  ablation:
    uses: compare
    inputs: {{runs: evaluate_rows_double.samples}}
    params: {compare_params}
""")
    return cfg


def _expected():
    """Brute force, from the verdict strings: per-prompt pass@1 = correct / scored samples."""
    def per_prompt(data, seed):
        out = {}
        for pid, v in RUNS[(data, seed)].items():
            scored = [x for x in v if x != "e"]
            out[pid] = sum(x == "c" for x in scored) / len(scored)
        return out

    exp = {}
    for data in "abc":
        seeds = [statistics.mean(per_prompt(data, s).values()) for s in (0, 1)]
        avg = {pid: statistics.mean(per_prompt(data, s)[pid] for s in (0, 1)) for pid in ("p1", "p2", "p3")}
        exp[data] = {"mean": statistics.mean(seeds), "se_seeds": statistics.stdev(seeds) / 2 ** 0.5,
                     "se_prompts": statistics.stdev(avg.values()) / 3 ** 0.5, "avg": avg, "seeds": seeds}
    for data in "bc":
        d = [exp[data]["avg"][p] - exp["a"]["avg"][p] for p in ("p1", "p2", "p3")]
        per_seed = [exp[data]["seeds"][i] - exp["a"]["seeds"][i] for i in (0, 1)]
        exp[data].update(diff=statistics.mean(d), diff_se=statistics.stdev(d) / 3 ** 0.5,
                         diff_se_seeds=statistics.stdev(per_seed) / 2 ** 0.5)
    return exp


def test_compare_tabulates_variants_against_the_baseline(tmp_path):
    stages, storage = run_stages(_config(tmp_path))
    rec = stages["ablation"]
    rows = {r["variant"]: r for r in output_rows(storage, rec, "table")}
    assert set(rows) == {"data=a", "data=b", "data=c"}
    exp = _expected()
    for data in "abc":
        r = rows[f"data={data}"]
        assert r["seeds"] == 2 and r["prompts"] == 3 and r["metric"] == "pass@1" and r["baseline"] == "data=a"
        assert json.loads(r["axes"]) == {"data": data}
        for k in ("mean", "se_seeds", "se_prompts"):
            assert r[k] == pytest.approx(exp[data][k]), (data, k)
        assert r["per_seed"] == pytest.approx(exp[data]["seeds"])
        assert r["ratio"] is None and r["ratio_per_seed"] is None  # no ratio_to
    assert rows["data=a"]["diff"] is None and rows["data=a"]["significant"] is None
    for data in "bc":
        for k in ("diff", "diff_se", "diff_se_seeds"):
            assert rows[f"data={data}"][k] == pytest.approx(exp[data][k]), (data, k)
    # b is a's twin but for one prompt in one seed: inside 2 SE; c fails everything: far outside
    assert rows["data=b"]["significant"] is False and abs(exp["b"]["diff"]) < 2 * exp["b"]["diff_se"]
    assert rows["data=c"]["significant"] is True
    assert exp["c"]["diff"] == pytest.approx(-0.75)  # a scores 0.75 on average, c nothing
    # the errored sample is counted, not scored as wrong (b's seed-1 p3 scores 1/2, not 1/3)
    assert rows["data=b"]["errored"] == 1 and rec["dropped"] == {"errored": {"verdict_error": 1}}
    assert exp["b"]["avg"]["p3"] == 0.5
    # metrics carry the same numbers, in the {group: {metric: number}} shape the CLI prints
    m = rec["metrics"]
    assert m["baseline"] == "data=a" and m["metric"] == "pass@1" and m["across"] == "seed"
    assert m["data=c"]["mean"] == pytest.approx(0.0) and m["data=c"]["significant"] is True
    assert m["per_seed"]["data=a"] == pytest.approx({"0": exp["a"]["seeds"][0], "1": exp["a"]["seeds"][1]})
    # a second run is all cached: the expanded stages have ordinary fingerprints
    again = Runner(load_config(_config(tmp_path))).run()
    assert all(s["status"] == "cached" for s in again.manifest["stages"])


def test_compare_without_student_rows_fails_clearly(tmp_path):
    cfg = _config(tmp_path, "{baseline: {data: a}, role: base_student}")
    result = Runner(load_config(cfg)).run()
    assert not result.ok
    assert "no rows of role 'base_student'" in result.error and "roles present: student, teacher" in result.error


def test_compare_ratio_to_the_teacher_per_seed(tmp_path):
    """ratio_to: each seed's student score divided by the same seed's teacher score (not the ratio
    of the means), with mean, SE across seeds and the worst seed."""
    stages, storage = run_stages(_config(tmp_path, "{group_by: [data], across: seed, ratio_to: teacher}"))
    rec = stages["ablation"]
    rows = {r["variant"]: r for r in output_rows(storage, rec, "table")}
    exp = _expected()
    teacher = [1.0, 2 / 3]  # per seed: p3 wrong in seed 1
    for data in "abc":
        r = rows[f"data={data}"]
        ratios = [exp[data]["seeds"][i] / teacher[i] for i in (0, 1)]
        assert r["ratio_to"] == "teacher"
        assert r["ratio_to_per_seed"] == pytest.approx(teacher)
        assert r["ratio_per_seed"] == pytest.approx(ratios)
        assert r["ratio"] == pytest.approx(statistics.mean(ratios))
        assert r["ratio_se_seeds"] == pytest.approx(statistics.stdev(ratios) / 2 ** 0.5)
        assert r["ratio_min"] == pytest.approx(min(ratios))
        assert rec["metrics"][f"data={data}"]["ratio_min"] == pytest.approx(min(ratios))
    # a's seed 1 beats its teacher (5/6 against 2/3): a ratio, not a capped share
    assert rows["data=a"]["ratio_per_seed"][1] == pytest.approx(1.25)


def test_compare_ratio_to_a_teacher_scoring_zero_is_null(tmp_path):
    """A seed whose teacher scores 0 has no ratio (null), left out of the mean, not a NaN or inf."""
    zero = [dict(r, verdict="wrong") if r["role"] == "teacher" else r for r in _rows("a", 1)]
    cfg = _config(tmp_path, "{group_by: [data], across: seed, ratio_to: teacher}")
    write_jsonl(tmp_path / "a-1.jsonl", zero)
    stages, storage = run_stages(cfg)
    a = {r["variant"]: r for r in output_rows(storage, stages["ablation"], "table")}["data=a"]
    assert a["ratio_to_per_seed"] == pytest.approx([1.0, 0.0])
    assert a["ratio_per_seed"][1] is None
    assert a["ratio"] == pytest.approx(a["ratio_per_seed"][0]) == pytest.approx(a["ratio_min"])


def test_cli_prints_the_table(tmp_path):
    from pipeline.cli.main import _print_manifest, out

    _, storage = run_stages(_config(tmp_path))
    from pipeline.views.runs import load_run

    with out.capture() as cap:
        _print_manifest(load_run("latest", storage)[1])
    text = cap.get()
    assert "ablation metrics" in text and "data=c" in text and "se_seeds" in text and "diff_se" in text


# -- subsample ---------------------------------------------------------------------------------

def _prompts_cfg(tmp_path: Path, stages: str) -> Path:
    src = write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"what is {i}+1?", "answer": str(i + 1)} for i in range(10)])
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"name: s\nstorage: {{root: {tmp_path}/root}}\nstages:\n  prompts: {{params: {{path: {src}}}}}\n{stages}")
    return cfg


def test_subsample_keeps_n_or_as_many_as_like_seeded(tmp_path):
    stages, storage = run_stages(_prompts_cfg(tmp_path, """
  four: {uses: subsample, inputs: {data: prompts.prompts}, params: {n: 4, seed: 3}}
  like: {uses: subsample, inputs: {data: prompts.prompts, like: four.data}, params: {seed: 5}}
  all: {uses: subsample, inputs: {data: prompts.prompts}}
"""))
    everything = output_rows(storage, stages["prompts"], "prompts")
    four = output_rows(storage, stages["four"], "data")
    want = np.sort(np.random.default_rng(3).choice(10, size=4, replace=False))
    assert four == [everything[i] for i in want]  # seeded, in input order, columns unchanged
    assert stages["four"]["dropped"] == {"removed": {"subsampled": 6}}
    assert len(output_rows(storage, stages["like"], "data")) == 4
    assert output_rows(storage, stages["all"], "data") == everything and stages["all"]["dropped"] == {}


def test_subsample_refuses_to_grow(tmp_path):
    cfg = _prompts_cfg(tmp_path, "  many: {uses: subsample, inputs: {data: prompts.prompts}, params: {n: 11}}\n")
    result = Runner(load_config(cfg)).run()
    assert not result.ok and "has 10 rows, fewer than the 11 asked for by params.n" in result.error
    cfg = _prompts_cfg(tmp_path, "  many: {uses: subsample, inputs: {data: prompts.prompts}, "
                                 "params: {n: 11, allow_fewer: true}}\n")
    stages, _ = run_stages(cfg)
    assert stages["many"]["rows"] == {"data": 10}


# -- answer_only -------------------------------------------------------------------------------

def test_strip_reasoning():
    assert strip_reasoning("<think>\n1+2=3\n</think>\nThe answer is \\boxed{3}.") == ("The answer is \\boxed{3}.", None)
    assert strip_reasoning("The answer is \\boxed{3}.") == (None, "no_think_block")
    assert strip_reasoning("<think>x</think>   ") == (None, "empty_answer")


def test_answer_only_removes_reasoning_and_counts_what_it_drops(tmp_path):
    def row(i, content, system=False):
        msgs = ([{"role": "system", "content": "be brief"}] if system else []) + [
            {"role": "user", "content": f"q{i}"}] + ([{"role": "assistant", "content": content}] if content else [])
        return {"prompt_id": f"p{i}", "source": "toy", "sample_index": 0, "messages": msgs}

    src = write_jsonl(tmp_path / "sft.jsonl", [
        row(0, "<think>\n2+2=4\n</think>\nThe answer is \\boxed{4}.", system=True),
        row(1, "The answer is \\boxed{5}."),  # no reasoning block
        row(2, "<think>\nhmm\n</think>\n"),  # nothing after it
        row(3, None),  # no assistant turn
        row(4, "<think>3+3=6</think> The answer is \\boxed{6}."),
    ])
    cfg = tmp_path / "a.yaml"
    cfg.write_text(f"""
name: a
storage: {{root: {tmp_path}/root}}
stages:
  sft_rows_double: {{uses: "fixture_rows_stage:FixtureRowsDouble", params: {{path: {src}, schema_name: sft}}}}
  answer_only: {{inputs: {{data: sft_rows_double.samples}}}}
""")
    stages, storage = run_stages(cfg)
    rows = output_rows(storage, stages["answer_only"], "data")
    assert [r["prompt_id"] for r in rows] == ["p0", "p4"]
    assert rows[0]["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q0"},
                                   {"role": "assistant", "content": "The answer is \\boxed{4}."}]
    assert rows[1]["messages"][-1]["content"] == "The answer is \\boxed{6}."
    assert stages["answer_only"]["dropped"] == {"removed": {"no_think_block": 1, "empty_answer": 1,
                                                            "no_assistant_turn": 1}}
