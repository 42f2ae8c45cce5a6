"""The run report (``distill report``): its numbers against the manifests of a small real run
(prompts -> vLLM generate -> verify -> dedupe -> decontaminate -> evaluate with vLLM, whose
student is the session's solver, so its figures are not all zero), its
sections, its errors, and the one-line ``distill datasets ls``."""
from __future__ import annotations

import html
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import write_jsonl
from report_fake_run import fake_demo_run
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.core.config import load_config
from pipeline.core.runner import Runner
from pipeline.store import layout
from pipeline.views.inspect_datasets import read_dropped
from pipeline.views.report import ReportError, build
from pipeline.views.runs import load_run

N = 4
TRAIN = [{"q": f"Compute {i} + {i + 3}.", "a": str(2 * i + 3)} for i in range(1, 7)]
LEAK = "Compute the sum of seven and eight and then add two more to it."
EVAL = [{"q": f"Compute {i} - 1.", "a": str(i - 1)} for i in range(2, 6)] + [{"q": LEAK + " Now.", "a": "17"}]

CONFIG = """
name: report-run
storage: {{root: {root}}}
stages:
  prompts:
    params: {{path: {src}, prompt_field: q, answer_field: a}}
  eval_prompts:
    uses: prompts
    params: {{path: {eval_src}, prompt_field: q, answer_field: a}}
  generate:
    inputs: {{prompts: prompts.prompts}}
    params:
      model: {model}
      sampling: {{n: {n}, temperature: 1.0, max_tokens: 16, seed: 1}}
      engine: {{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 4}}  # as test_pipeline_e2e: its kept engine serves here
  verify:
    inputs: {{samples: generate.samples}}
  dedupe:
    inputs: {{samples: verify.verified}}
    params: {{require_verdict: null, max_per_prompt: 2}}
  decontaminate:
    inputs: {{samples: dedupe.sft, eval: eval_prompts.prompts}}
    params: {{ngram: 8}}
  evaluate:  # the student is the session's solver (it solves some held-out problems), the teacher untrained
    inputs: {{prompts: eval_prompts.prompts, train: decontaminate.clean}}
    params:
      student: {solver}
      teacher: {model}
      sampling: {{n: {n}, temperature: 1.0, max_tokens: 48, seed: 2}}
      ks: [1, 2]
      engine: {{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 16}}  # as test_evaluate_metrics: its kept engine
"""


@pytest.fixture(scope="module")
def real_run(ray_local, tiny_model, solver_model, solver_eval_rows, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report-run")
    src = write_jsonl(tmp / "src.jsonl", TRAIN + [{"q": LEAK, "a": "17"}, {"q": "no answer here"}])
    eval_src = write_jsonl(tmp / "eval.jsonl", EVAL + [{"q": r["prompt"], "a": r["answer"]} for r in solver_eval_rows[:12]])
    cfg = tmp / "p.yaml"
    cfg.write_text(CONFIG.format(root=tmp / "root", src=src, eval_src=eval_src, model=tiny_model, solver=solver_model,
                                 n=N))
    runner = Runner(load_config(cfg))
    result = runner.run()
    assert result.ok, result.error
    return runner.storage, result.manifest, tmp


def _rows(st, uri, columns=None):
    return st.read_dataset(st.strip(uri), columns=columns).to_pylist()


@pytest.mark.engine
def test_report_numbers_match_the_manifests(real_run, tmp_path):
    st, manifest, _ = real_run
    stages = {s["name"]: s for s in manifest["stages"]}
    cli = CliRunner().invoke(app, ["report", manifest["run_id"], "--root", st.root_uri, "--out", str(tmp_path / "r")])
    assert cli.exit_code == 0, cli.output
    page = tmp_path / "r" / "report.html"
    assert f"report: {page}" in cli.output
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    text = page.read_text()

    # summary: from the run manifest, with the config hash and the commit it records
    assert data["summary"]["run_id"] == manifest["run_id"] and manifest["config_hash"]
    assert data["summary"]["config_hash"] == manifest["config_hash"] and manifest["config_hash"] in text
    assert data["summary"]["git_commit"] == manifest.get("git_commit")
    # DAG: every stage with its status, seconds and rows out
    assert [s["name"] for s in data["dag"]] == [s["name"] for s in manifest["stages"]]
    for d in data["dag"]:
        assert (d["status"], d["rows_out"], d["fingerprint"]) == (stages[d["name"]]["status"], stages[d["name"]]["rows"],
                                                                   stages[d["name"]]["fingerprint"])

    # funnel: the chain to the training data, each step's rows from its dataset manifest
    steps = data["funnel"]["steps"]
    assert [s["dataset"] for s in steps] == ["prompts.prompts", "generate.samples", "verify.verified", "dedupe.sft",
                                             "decontaminate.clean"]
    for s in steps:
        stage, out = s["dataset"].rsplit(".", 1)
        uri = stages[stage]["output"][out]
        assert s["rows"] == st.dataset_manifest(st.strip(uri))["rows"] == stages[stage]["rows"][out]
        assert s["dropped"] == read_dropped(None, stages[stage])
    assert steps[0]["rows"] == len(TRAIN) + 1 and steps[1]["rows"] == (len(TRAIN) + 1) * N
    assert [s["rows_in"] for s in steps[1:]] == [s["rows"] for s in steps[:-1]]

    # per-reason counts equal the rows of the datasets, counted here
    quarantine = Counter(r["reason"] for r in _rows(st, stages["prompts"]["output"]["quarantine"]))
    assert steps[0]["dropped"] == {"quarantined": dict(quarantine)} and sum(quarantine.values()) == 1
    verified = _rows(st, stages["verify"]["output"]["verified"], ["verdict", "reason", "completion_tokens",
                                                                   "prompt_id", "sample_index"])
    rejected = Counter(r["reason"] for r in verified if r["verdict"] == "rejected")
    assert steps[2]["dropped"].get("rejected", {}) == dict(rejected) and rejected
    assert steps[2]["passed"] == sum(r["verdict"] == "correct" for r in verified)
    removed = Counter(r["reason"] for r in _rows(st, stages["dedupe"]["output"]["dropped"]))
    assert steps[3]["dropped"] == {"removed": dict(removed)} and removed
    contaminated = _rows(st, stages["decontaminate"]["output"]["contaminated"])
    assert len(contaminated) >= 1 and steps[4]["rows"] == steps[3]["rows"] - len({(r["prompt_id"], r["sample_index"])
                                                                                   for r in contaminated})
    assert sum(steps[4]["dropped"]["removed"].values()) == steps[3]["rows"] - steps[4]["rows"]
    for s in steps:  # the page shows every count, and examples of every reason taken from the datasets
        for kind, reasons in s["dropped"].items():
            for reason, n in reasons.items():
                assert f"{reason}={n:,}" in html.unescape(text)  # as the page shows it
                examples = s["examples"][reason]
                assert 1 <= len(examples) <= 3 and all(e["reason"] == reason for e in examples)
    verify_examples = steps[2]["examples"]
    assert all("completion" in e for ex in verify_examples.values() for e in ex)

    # lengths: kept traces are the rows of the training data, rejected ones those verify rejected
    series = data["lengths"]["series"]
    assert data["lengths"]["dataset"] == "verify.verified"
    assert series["kept"]["count"] == steps[4]["rows"]
    clean = {(r["prompt_id"], r["sample_index"]) for r in _rows(st, stages["decontaminate"]["output"]["clean"])}
    assert series["rejected"]["count"] == sum(r["verdict"] == "rejected" and (r["prompt_id"], r["sample_index"])
                                              not in clean for r in verified)

    # evaluation: pass@1 per role as the stage recorded it, and as the samples say
    metrics = stages["evaluate"]["metrics"]
    roles = metrics.get("roles") or {k: v for k, v in metrics.items() if isinstance(v, dict) and "pass@1" in v}
    (ev,) = data["evaluation"]
    assert set(ev["roles"]) == set(roles) >= {"teacher", "student"}
    samples = _rows(st, stages["evaluate"]["output"]["samples"], ["role", "verdict"])
    # figures that can differ: the solver student scores above the untrained teacher, so a report
    # showing one role's figure for the other, or 0.000 for everything, is caught below
    assert roles["student"]["pass@1"] > roles["teacher"]["pass@1"] >= 0
    assert f"{roles['student']['pass@1']:.3f}" != f"{roles['teacher']['pass@1']:.3f}"
    for role, m in roles.items():
        assert ev["roles"][role]["pass@1"] == m["pass@1"]
        scored = [r["verdict"] == "correct" for r in samples if r["role"] == role and r["verdict"] != "error"]
        assert m["pass@1"] == pytest.approx(sum(scored) / len(scored))
        assert f"{m['pass@1']:.3f}" in text
        assert [p[0] for p in ev["curves"][role]["pass"]][:2] == [1, 2]

    # figures: every one referenced exists; nothing is loaded from elsewhere
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]+)"', text)
    assert {"figures/dag.png", "figures/funnel.png", "figures/lengths.png", "figures/timings.png"} <= set(srcs)
    assert all((tmp_path / "r" / s).stat().st_size > 1000 for s in srcs)
    assert not re.search(r"(?i)<script|<link|https?://", text)

    # the default place: beside the run manifest, via `latest`
    default = build("latest", st.root_uri)
    assert default == (Path(layout.run_dir(st, manifest["run_id"])) / "report" / "report.html").resolve()
    assert default.read_text().count("<img") == text.count("<img")


def test_sections_and_both_metric_shapes(tmp_path):
    st, run_id = fake_demo_run(tmp_path / "root")
    page = build(run_id, st.root_uri, tmp_path / "new")
    text = page.read_text()
    for section in ("summary", "dag", "funnel", "lengths", "evaluation", "performance", "lineage"):
        assert f"id='{section}'" in text
    assert "Accuracy against tokens" in text and "Promotion" in text and "promoted" in text
    assert "base_student" in text and "-0.150" in text  # the comparison student - teacher
    assert "3,200.5" in text  # training tok/s

    # stage names of matrix variants may hold dots: "stage.output" refs split at the last one
    path = layout.run_manifest(st, run_id)
    m = st.read_json(path)
    variant = "decontaminate[ngram=8.5]"
    for stage in m["stages"]:
        stage["name"] = variant if stage["name"] == "decontaminate" else stage["name"]
        stage["inputs"] = {k: v.replace("decontaminate.", f"{variant}.") for k, v in stage["inputs"].items()}
    st.write_json(path, m)
    data = json.loads((build(run_id, st.root_uri, tmp_path / "variant").parent / "report.json").read_text())
    assert [s["dataset"] for s in data["funnel"]["steps"]][-2:] == ["dedupe.sft", f"{variant}.clean"]
    assert data["funnel"]["steps"][-1]["dropped"] == {"removed": {"contaminated:eval": 2}}

    # the older shape: metrics.teacher / metrics.student with flat pass@k
    ev = next(s for s in m["stages"] if s["name"] == "evaluate")
    ev["metrics"] = {"teacher": {"prompts": 16, "samples": 128, "pass@1": 0.625, "pass@4": 0.8, "maj@4": 0.7},
                     "student": {"prompts": 16, "samples": 128, "pass@1": 0.4375, "pass@4": 0.6, "maj@4": 0.5}}
    st.write_json(path, m)
    old = build(run_id, st.root_uri, tmp_path / "old")
    data = json.loads((old.parent / "report.json").read_text())
    assert data["evaluation"][0]["curves"]["student"]["pass"] == [[1, 0.4375, None], [4, 0.6, None]]
    assert "0.438" in old.read_text() and "0.625" in old.read_text()

    # a run without evaluate: the section is left out, the others stay
    m["stages"] = [s for s in m["stages"] if s["name"] != "evaluate"]
    st.write_json(path, m)
    text = build(run_id, st.root_uri, tmp_path / "noeval").read_text()
    assert "id='evaluation'" not in text and "id='funnel'" in text and "curves-0.png" not in text


def test_training_section_draws_loss_and_reward_curves(tmp_path):
    """A GRPO stage's reward curves (mean reward, each verification reason's share, completion
    length) and a DPO stage's margins are in the report's Training section, with their first and
    last values; a run without training curves has no such section."""
    st, run_id = fake_demo_run(tmp_path / "root")
    path = layout.run_manifest(st, run_id)
    m = st.read_json(path)
    reward = [[s, 0.2 + 0.01 * s] for s in range(5, 65, 5)]
    m["stages"].append({"name": "student_grpo", "kind": "grpo", "fingerprint": "f" * 20, "status": "done",
                        "seconds": 300.0, "inputs": {}, "output": {}, "rows": {}, "metrics": {
                            "steps": 60, "loss_curve": [[s, 0.01] for s in range(5, 65, 5)],
                            "worker_starts": [{"resumed_from_step": None}, {"resumed_from_step": 40}],
                            "curves": {"reward": reward, "verify/ok": reward,
                                       "verify/wrong_answer": [[s, 0.8 - 0.01 * s] for s in range(5, 65, 5)],
                                       "completions/mean_length": [[s, 60.0] for s in range(5, 65, 5)],
                                       "completions/clipped_ratio": [[s, 0.0] for s in range(5, 65, 5)]}}})
    m["stages"].append({"name": "student_dpo", "kind": "dpo", "fingerprint": "d" * 20, "status": "done",
                        "seconds": 90.0, "inputs": {}, "output": {}, "rows": {}, "metrics": {
                            "steps": 4, "loss_curve": [[2, 0.69], [4, 0.61]],
                            "curves": {"rewards/margins": [[2, 0.0], [4, 0.125]]}}})
    st.write_json(path, m)
    page = build(run_id, st.root_uri, tmp_path / "rl")
    text = page.read_text()
    assert "id='training'" in text and "href='#training'" in text
    data = json.loads((page.parent / "report.json").read_text())
    grpo, dpo = data["training"]
    assert grpo["stage"] == "student_grpo" and grpo["rewards"] == {"reward": reward}
    assert set(grpo["reasons"]) == {"ok", "wrong_answer"} and grpo["lengths"]["completions/mean_length"][0] == [5, 60.0]
    assert dpo["rewards"] == {"rewards/margins": [[2, 0.0], [4, 0.125]]}
    assert (page.parent / "figures" / "training-0.png").stat().st_size > 1000
    section = text[text.index("id='training'"):text.index("id='performance'")]
    assert "0.250" in section and "0.800" in section  # the reward's first (step 5) and last (step 60) values
    assert "0.125" in section and "from step 40" in section
    # the fake demo's own sft stages carry no loss curve: without the added stages, no section
    m["stages"] = m["stages"][:-2]
    st.write_json(path, m)
    assert "id='training'" not in build(run_id, st.root_uri, tmp_path / "plain").read_text()


def test_missing_or_corrupt_manifests_are_named(tmp_path):
    st, run_id = fake_demo_run(tmp_path / "root")
    with pytest.raises(ReportError, match=r"no runs under .*missing .*_latest"):
        load_run("latest", str(tmp_path / "empty"))
    with pytest.raises(ReportError, match=r"runs/nope/manifest.json: missing \(run manifest\)"):
        load_run("nope", st.root_uri)

    path = layout.run_manifest(st, run_id)
    good = st.fs.cat(path)
    # a dataset manifest the run names, gone corrupt
    m = json.loads(good)
    clean_uri = next(s for s in m["stages"] if s["name"] == "decontaminate")["output"]["clean"]
    st.put_bytes(f"{st.strip(clean_uri)}/_manifest.json", b"{not json")
    with pytest.raises(ReportError, match=re.escape(f"{clean_uri}/_manifest.json") + r": corrupt manifest of "
                       r"decontaminate.clean"):
        build(run_id, st.root_uri, tmp_path / "out")
    st.put_bytes(path, good[: len(good) // 2])  # a truncated run manifest
    result = CliRunner().invoke(app, ["report", run_id, "--root", st.root_uri, "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert f"{st.uri(path)}: corrupt run manifest, not valid JSON" in result.output
    # a run manifest URI works the same (here: still corrupt)
    result = CliRunner().invoke(app, ["report", st.uri(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "corrupt run manifest" in result.output


@pytest.mark.s3
def test_report_from_s3_root(moto_s3_bucket, tmp_path):
    st, run_id = fake_demo_run(f"s3://{moto_s3_bucket}/report-{tmp_path.name}", local_tmp=tmp_path / "models")
    uri = st.uri(layout.run_manifest(st, run_id))
    result = CliRunner().invoke(app, ["report", uri, "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["funnel"]["steps"][-1]["dataset"] == "decontaminate.clean"
    assert data["funnel"]["steps"][2]["dropped"]["rejected"]
    assert all(a["uri"].startswith("s3://") for a in data["lineage"]["written"])
    assert (tmp_path / "r" / "figures" / "funnel.png").exists()


def test_datasets_ls_fits_80_columns(tmp_path, monkeypatch):
    st, _ = fake_demo_run(tmp_path / "root")
    runner = CliRunner()
    listed = json.loads(runner.invoke(app, ["datasets", "ls", st.root_uri, "--json"]).output)
    assert len(listed) == 9 and all({"uri", "created", "run", "bytes"} <= set(d) for d in listed)

    from pipeline.cli import main as cli

    monkeypatch.setattr(cli.out, "_width", 80)  # an 80-column terminal
    short = runner.invoke(app, ["datasets", "ls", st.root_uri])
    assert short.exit_code == 0
    lines = short.output.rstrip("\n").split("\n")
    assert len(lines) == 1 + len(listed)  # a header, then one line per dataset
    assert max(len(line.rstrip()) for line in lines) <= 80
    assert lines[0].split() == ["name", "version", "rows", "size", "age", "run"]
    assert all(str(tmp_path) not in line for line in lines)  # no paths
    row = next(line for line in lines if line.startswith("verify.verified"))
    assert row.split()[1:3] == [listed[[d["name"] for d in listed].index("verify.verified")]["version"][:8], "384"]
    assert row.split()[-1] == "demo-fake01"  # the run, without its timestamp

    monkeypatch.setattr(cli.out, "_width", 250)  # a wide terminal: paths on one line
    long = runner.invoke(app, ["datasets", "ls", st.root_uri, "--long"])
    assert long.exit_code == 0 and "path" in long.output.split("\n")[0]
    assert all(d["uri"] in long.output for d in listed) and "20260101-000000-demo-fake01" in long.output


def test_report_open_hands_the_page_to_the_browser(tmp_path, monkeypatch):
    """``--open``: the page's file:// URI goes to the browser the standard ``$BROWSER`` names
    (here a script that records what it was asked to open)."""
    import webbrowser

    seen = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\nprintf "%s" "$1" > {seen}\n')
    browser.chmod(0o755)
    monkeypatch.setenv("BROWSER", f"{browser} %s")
    monkeypatch.setattr(webbrowser, "_browsers", {})  # read $BROWSER afresh
    monkeypatch.setattr(webbrowser, "_tryorder", None)
    st, run_id = fake_demo_run(tmp_path / "root")
    result = CliRunner().invoke(app, ["report", run_id, "--root", st.root_uri, "--out", str(tmp_path / "r"), "--open"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r" / "report.html").resolve()
    assert seen.read_text() == page.as_uri() and page.exists()
    assert "could not start a browser" not in result.output
