"""The whole DAG with real parts (vLLM engines in Ray actors, math-verify, TRL), on a local
folder and on S3 (moto on 127.0.0.1): same test, same assertions."""
import json
import os
import uuid

import pytest
from conftest import write_jsonl
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.core.config import load_config
from pipeline.core.runner import Runner
from pipeline.store.storage import Storage

N = 2
PROMPTS = [{"q": f"Compute {i} + {i + 3}.", "a": str(2 * i + 3)} for i in range(1, 7)]
OVERLONG = {"q": "Compute " + " + ".join(["12"] * 80) + ".", "a": "960"}
EVAL = [{"q": f"Compute {i} - 1.", "a": str(i - 1)} for i in range(2, 6)]

CONFIG = """
name: e2e
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
      engine: {{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 4}}
  verify:
    inputs: {{samples: generate.samples}}
  dedupe:
    inputs: {{samples: verify.verified}}
    params: {{require_verdict: null, max_per_prompt: 1}}
  sft:
    inputs: {{data: dedupe.sft}}
    params: {{model: {model}, max_steps: 2, batch_size: 4, max_length: 128, learning_rate: 1.0e-4, num_cpus: 1}}
  evaluate:
    inputs: {{prompts: {eval_input}, train: dedupe.sft, student: sft.model}}
    params:
      teacher: {model}
      sampling: {{n: {n}, temperature: 1.0, max_tokens: 16}}
      ks: [1, 2]
      engine: {{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 4}}
"""


def _setup(backend, tmp_path, request):
    src = write_jsonl(tmp_path / "src.jsonl", PROMPTS + [OVERLONG, {"q": "no answer here"}])
    eval_src = write_jsonl(tmp_path / "eval.jsonl", EVAL)
    if backend == "local":
        return str(tmp_path / "root"), str(src), str(eval_src)
    bucket = request.getfixturevalue("moto_s3_bucket")
    prefix = f"s3://{bucket}/{uuid.uuid4().hex[:8]}"
    st = Storage(prefix)
    st.put_bytes(st.path("in/src.jsonl"), src.read_bytes())
    st.put_bytes(st.path("in/eval.jsonl"), eval_src.read_bytes())
    return f"{prefix}/root", f"{prefix}/in/src.jsonl", f"{prefix}/in/eval.jsonl"


def _config(tmp_path, root, src, eval_src, model, eval_input="eval_prompts.prompts"):
    p = tmp_path / f"e2e-{uuid.uuid4().hex[:6]}.yaml"
    p.write_text(CONFIG.format(root=root, src=src, eval_src=eval_src, model=model, n=N, eval_input=eval_input))
    return p


@pytest.mark.engine
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_pipeline_end_to_end(backend, ray_local, tiny_model, tmp_path, request):
    root, src, eval_src = _setup(backend, tmp_path, request)
    cfg_path = _config(tmp_path, root, src, eval_src, tiny_model)
    runner = Runner(load_config(cfg_path))
    result = runner.run()
    assert result.ok, result.error
    stages = {s["name"]: s for s in result.manifest["stages"]}
    assert all(s["status"] == "done" for s in stages.values())
    for s in stages.values():
        assert set(s) >= {"name", "status", "seconds", "fingerprint", "output", "rows", "metrics"}
    st = runner.storage

    def read(stage, out):
        return st.read_dataset(st.strip(stages[stage]["output"][out])).to_pylist()

    # prompts: the row without an answer is quarantined with its reason
    assert stages["prompts"]["rows"] == {"prompts": 7, "quarantine": 1}
    assert read("prompts", "quarantine")[0]["reason"] == "missing answer field 'a'"

    # generate: every (prompt, sample) exactly once; the overlong prompt is an errored row
    samples = read("generate", "samples")
    keys = [(r["prompt_id"], r["sample_index"]) for r in samples]
    assert len(keys) == len(set(keys)) == 7 * N
    long_rows = [r for r in samples if r["prompt"].startswith("Compute 12 + 12")]
    assert len(long_rows) == N
    assert all(r["error"].startswith("prompt_too_long") and r["finish_reason"] == "error" for r in long_rows)
    ok_rows = [r for r in samples if r not in long_rows]
    assert all(r["error"] is None and r["finish_reason"] in ("stop", "length") for r in ok_rows)
    assert all(0 < r["completion_tokens"] <= 16 for r in ok_rows)

    # verify: every sample has a verdict and a reason; counts per reason add up
    verified = read("verify", "verified")
    assert len(verified) == 7 * N and all(r["verdict"] and r["reason"] for r in verified)
    assert {r["reason"] for r in verified if r["prompt"].startswith("Compute 12 + 12")} == {"generation_error"}
    assert sum(stages["verify"]["metrics"]["reasons"].values()) == 7 * N

    # dedupe: kept + dropped covers every input row; chat messages for SFT
    sft_rows, dropped = read("dedupe", "sft"), read("dedupe", "dropped")
    assert len(sft_rows) + len(dropped) == 7 * N
    assert len({r["prompt_id"] for r in sft_rows}) == len(sft_rows) <= 7
    assert [m["role"] for m in sft_rows[0]["messages"]] == ["user", "assistant"]

    # sft: a loadable checkpoint in storage
    model_files = st.tree_manifest(st.strip(stages["sft"]["output"]["model"]))["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f["path"] for f in model_files}
    assert stages["sft"]["metrics"]["steps"] == 2

    # evaluate: both models scored with the same metrics, recomputed here from the sample rows
    metrics = stages["evaluate"]["metrics"]
    evals = read("evaluate", "samples")
    assert {r["role"] for r in evals} == {"teacher", "student"} and len(evals) == 2 * len(EVAL) * N
    assert metrics["temperature"] == metrics["sampling"]["temperature"]
    for role in ("teacher", "student"):
        m = metrics["roles"][role]
        assert_metrics_match_rows(m, [r for r in evals if r["role"] == role], N)
    [vs_teacher] = metrics["comparisons"]
    assert (vs_teacher["a"], vs_teacher["b"]) == ("student", "teacher")
    assert vs_teacher["diff"] == pytest.approx(metrics["roles"]["student"]["pass@1"]
                                               - metrics["roles"]["teacher"]["pass@1"])

    # no credentials in anything written
    if backend == "s3":
        secret = os.environ["AWS_SECRET_ACCESS_KEY"]
        for path in st.fs.find(st.root):
            if path.endswith(".json"):
                assert secret not in st.fs.cat(path).decode()

    # a second run of the unchanged config does no work
    again = Runner(load_config(cfg_path)).run()
    assert again.ok and [s["status"] for s in again.manifest["stages"]] == ["cached"] * 7
    assert again.manifest["stages"][-1]["metrics"] == metrics

    cli = CliRunner()
    plan = cli.invoke(app, ["plan", str(cfg_path), "--json"])
    assert plan.exit_code == 0 and {e["action"] for e in json.loads(plan.output)} == {"cached"}
    shown = cli.invoke(app, ["runs", "show", "latest", "--root", root, "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)["run_id"] == again.run_id
    listed = cli.invoke(app, ["runs", "ls", "--root", root, "--json"])
    assert [r["run_id"] for r in json.loads(listed.output)] == [result.run_id, again.run_id]

    # the held-out set must not overlap the training data
    leak_cfg = _config(tmp_path, root, src, eval_src, tiny_model, eval_input="prompts.prompts")
    leak = Runner(load_config(leak_cfg)).run()
    assert not leak.ok
    assert "overlap the training data" in leak.stage_errors["evaluate"]


def assert_metrics_match_rows(m: dict, rows: list[dict], n: int) -> None:
    """pass@1, pass@k, maj@k and mean_tokens of an evaluate role, recomputed from its sample rows."""
    from collections import Counter, defaultdict
    from math import comb

    from stages.common.checkers import answer_key

    by_prompt = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["sample_index"]):
        if r["verdict"] != "error":
            by_prompt[r["prompt_id"]].append(r)
    assert m["prompts"] == len(by_prompt) and m["samples"] == sum(map(len, by_prompt.values()))
    assert m["errored"] == sum(r["verdict"] == "error" for r in rows)
    ok = {p: [r["verdict"] == "correct" for r in rs] for p, rs in by_prompt.items()}
    assert m["pass@1"] == pytest.approx(sum(sum(v) / len(v) for v in ok.values()) / len(ok))
    assert m[f"pass@{n}"] == pytest.approx(sum(any(v) for v in ok.values()) / len(ok))
    pass2 = [1 - comb(len(v) - sum(v), 2) / comb(len(v), 2) for v in ok.values()]
    assert dict((k, mean) for k, mean, _ in m["curves"]["pass@k"])[2] == pytest.approx(sum(pass2) / len(pass2))
    maj = []
    for rs in by_prompt.values():
        votes = Counter(answer_key(r["extracted"]) for r in rs[:n] if answer_key(r["extracted"]) is not None)
        if not votes:
            maj.append(0.0)
            continue
        top = max(votes.values())
        tied = [a for a, c in votes.items() if c == top]
        right = {answer_key(r["extracted"]) for r in rs[:n] if r["verdict"] == "correct"}
        maj.append(sum(a in right for a in tied) / len(tied))
    assert m[f"maj@{n}"] == pytest.approx(sum(maj) / len(maj))
    scored = [r for rs in by_prompt.values() for r in rs]
    assert m["mean_tokens"] == pytest.approx(sum(r["completion_tokens"] for r in scored) / len(scored))
