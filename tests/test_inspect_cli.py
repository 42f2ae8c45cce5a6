"""`distill datasets ls/show/head --json` report what the datasets really hold (local and S3)."""
import json
import uuid

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.store.storage import Storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return f"s3://{request.getfixturevalue('moto_s3_bucket')}/{uuid.uuid4().hex[:8]}"


def _write(st: Storage, rel: str, rows: list[dict], stage: str, output: str, shard_rows: int = 3) -> str:
    path = st.path(rel)
    w = st.dataset_writer(path, {"run_id": "run-1", "stage": stage, "output": output, "fingerprint": "f" * 20,
                                 "parents": {}}, rows_per_shard=shard_rows)
    w.write(pa.Table.from_pylist(rows))
    w.commit()
    return st.uri(path)


def _json(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_ls_show_head(root):
    st = Storage(root)
    verified = [{"prompt_id": f"p{i % 3}", "source": "gsm8k" if i < 5 else "math", "completion_tokens": 10 * i,
                 "verdict": "correct" if i % 2 else "rejected", "reason": "ok" if i % 2 else "wrong_answer"}
                for i in range(8)]
    chat = [{"prompt_id": "p0", "messages": [{"role": "user", "content": "1+1?"},
                                             {"role": "assistant", "content": "<think>x</think> \\boxed{2}"}]}]
    v_uri = _write(st, "cache/verify/abc/1/verified", verified, "verify", "verified")
    c_uri = _write(st, "cache/dedupe/def/1/sft", chat, "dedupe", "sft")

    listed = _json(["datasets", "ls", root, "--json"])
    by_name = {d["name"]: d for d in listed}
    assert set(by_name) == {"verify.verified", "dedupe.sft"}
    assert by_name["verify.verified"]["rows"] == 8 and by_name["verify.verified"]["shards"] == 3
    assert by_name["dedupe.sft"]["rows"] == 1 and by_name["dedupe.sft"]["run"] == "run-1"
    assert by_name["verify.verified"]["bytes"] == sum(s["bytes"] for s in st.dataset_manifest(st.path("cache/verify/abc/1/verified"))["shards"])

    info = _json(["datasets", "show", v_uri, "--json"])
    assert info["rows"] == 8 and info["prompts"] == 3
    assert info["verdicts"] == {"rejected": 4, "correct": 4}
    assert info["reasons"] == {"wrong_answer": 4, "ok": 4}
    assert info["sources"] == {"gsm8k": 5, "math": 3}
    assert sum(b["count"] for b in info["completion_tokens_histogram"]) == 8
    assert info["lineage"]["stage"] == "verify" and info["schema"]["completion_tokens"] == "int64"

    rows = _json(["datasets", "head", v_uri, "-n", "4", "--json"])
    assert rows == verified[:4]  # crosses a shard boundary in order
    assert _json(["datasets", "head", c_uri, "--json"]) == chat
    text = CliRunner().invoke(app, ["datasets", "head", c_uri]).output
    assert "user: 1+1?" in text and "assistant: <think>x</think>" in text


def test_show_missing_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["datasets", "show", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "no committed dataset" in result.output
    result = CliRunner().invoke(app, ["datasets", "ls", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "nothing at" in result.output


def test_diff(root):
    st = Storage(root)
    a = [{"prompt_id": p, "completion_tokens": t, "verdict": v}
         for p, t, v in [("p1", 10, "correct"), ("p1", 20, "rejected"), ("p2", 30, "rejected")]]
    b = [{"prompt_id": p, "completion_tokens": t, "verdict": v}
         for p, t, v in [("p1", 10, "correct"), ("p1", 40, "correct"), ("p3", 50, "correct"), ("p3", 60, "rejected")]]
    ua = _write(st, "cache/verify/a/1/verified", a, "verify", "verified")
    ub = _write(st, "cache/verify/b/1/verified", b, "verify", "verified")
    d = _json(["datasets", "diff", ua, ub, "--json"])
    assert d["rows"] == {"a": 3, "b": 4, "delta": 1}
    assert d["prompts"]["added"] == ["p3"] and d["prompts"]["removed"] == ["p2"]
    assert d["length"]["a"]["mean"] == 20 and d["length"]["b"]["mean"] == 40 and d["length"]["mean_shift"] == 20
    # pass rate per prompt: a = [0.5, 0.0], b = [1.0, 0.5]
    assert d["pass_rate"]["a"]["mean"] == 0.25 and d["pass_rate"]["b"]["mean"] == 0.75
    text = CliRunner().invoke(app, ["datasets", "diff", ua, ub]).output
    assert "rows 3 -> 4 (+1)" in text and "1 added, 1 removed" in text


TRACE = ("<think> First we add the two numbers of apples that Janet has in her basket, which gives twelve, "
         "then we subtract the three she gave to her neighbour on Monday morning, leaving nine apples </think> \\boxed{9}")


def test_show_funnel_from_a_pipeline(ray_local, root, tmp_path):
    """prompts -> dedupe -> decontaminate: `show` on the last dataset reports every step's rows
    and reasons, and they match the committed datasets."""
    from conftest import write_jsonl

    from pipeline.core.config import load_config
    from pipeline.core.runner import Runner

    rows = [{"prompt": f"Apples question {i}?", "trace": f"<think> {i} apples </think> \\boxed{{{i}}}", "source": "s"}
            for i in range(6)]
    rows += [{"prompt": "Janet's apples, version A?", "trace": TRACE},
             {"prompt": "Janet's apples, version B?", "trace": TRACE.replace("Monday", "Tuesday")},  # near duplicate
             {"prompt": "No trace?"},  # quarantined
             {"prompt": "  ", "trace": "x"},  # quarantined
             {"prompt": "Apples question 0?", "trace": "again"}]  # quarantined: duplicate prompt
    src = write_jsonl(tmp_path / "src.jsonl", rows)
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"question": "Apples question 3?"}, {"question": "unrelated"}])
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: funnel
storage: {{root: {root}}}
stages:
  prompts: {{params: {{path: {src}, answer_field: trace}}}}
  dedupe:
    inputs: {{samples: prompts.prompts}}
    params: {{completion_field: answer, require_verdict: null, near_dup: {{enabled: true, threshold: 0.5, ngram: 3}}}}
  decontaminate:
    inputs: {{samples: dedupe.sft}}
    params: {{eval_files: [{{path: {evals}, field: question, name: held-out}}]}}
""")
    runner = Runner(load_config(cfg))
    result = runner.run()
    assert result.ok, result.error
    st = runner.storage
    out = {(s["name"], k): v for s in result.manifest["stages"] for k, v in s["output"].items()}
    real = {k: st.dataset_manifest(st.strip(v))["rows"] for k, v in out.items()}
    assert real == {("prompts", "prompts"): 8, ("prompts", "quarantine"): 3, ("dedupe", "sft"): 7,
                    ("dedupe", "dropped"): 1, ("decontaminate", "clean"): 6, ("decontaminate", "contaminated"): 1}

    info = _json(["datasets", "show", out[("decontaminate", "clean")], "--json"])
    steps = info["funnel"]
    assert [s["name"] for s in steps] == ["prompts.prompts", "dedupe.sft", "decontaminate.clean"]
    assert [s["uri"] for s in steps] == [out[("prompts", "prompts")], out[("dedupe", "sft")], out[("decontaminate", "clean")]]
    for s in steps:
        assert s["rows"] == real[(s["stage"], s["output"])]
        assert s["outputs"] == {o: n for (stage, o), n in real.items() if stage == s["stage"]}
    prompts, dedupe, decon = steps
    assert prompts["dropped"] == {"quarantined": {"missing answer field 'trace'": 1, "empty prompt field 'prompt'": 1,
                                                  "duplicate prompt": 1}}
    assert prompts["metrics"]["input_rows"] == len(rows) == prompts["rows"] + prompts["outputs"]["quarantine"]
    assert dedupe["dropped"] == {"removed": {"near_duplicate": 1}}
    assert dedupe["metrics"]["input_rows"] == prompts["rows"] == dedupe["rows"] + dedupe["outputs"]["dropped"]
    assert decon["dropped"] == {"removed": {"contaminated:held-out": 1}}
    assert info["dropped"] == decon["dropped"]  # the shown dataset's own manifest
    assert decon["metrics"]["input_rows"] == dedupe["rows"] == decon["rows"] + decon["outputs"]["contaminated"]
    assert dedupe["parents"] == {"samples": prompts["uri"]} and decon["parents"] == {"samples": dedupe["uri"]}
    assert prompts["parents"] == {}
    # no completion_tokens column: lengths in characters of the completion turn
    hist = info["length_histogram"]
    assert hist["column"] == "messages" and hist["unit"] == "chars" and sum(b["count"] for b in hist["bins"]) == 6
    assert "completion_tokens_histogram" not in info

    shown = _json(["datasets", "show", out[("prompts", "prompts")], "--json"])
    assert list(shown["sources"].values()) == [8]  # one source file
    assert shown["length_histogram"]["column"] == "prompt" and len(shown["funnel"]) == 1

    text = CliRunner().invoke(app, ["datasets", "show", out[("decontaminate", "clean")]]).output
    assert "funnel" in text and "near_duplicate=1" in text and "contaminated:held-out=1" in text
    assert "length of messages (chars)" in text


def test_funnel_follows_lineage_of_datasets_written_directly(root):
    """Datasets written through the storage API with lineage: the funnel walks every ancestor
    once, oldest first, leaves models out and marks a parent that is gone."""
    st = Storage(root)

    def write(rel, n, parents, stage, output):
        path = st.path(rel)
        w = st.dataset_writer(path, {"run_id": "r", "stage": stage, "output": output, "fingerprint": stage * 4,
                                     "parents": {k: {"uri": u, "fingerprint": "x"} for k, u in parents.items()}},
                              rows_per_shard=2)
        w.write(pa.table({"prompt_id": [f"p{i}" for i in range(n)], "completion": ["x" * i for i in range(n)]}))
        w.commit()
        return st.uri(path)

    fake_model = st.path("models", "fake-teacher")  # a test double: a model manifest with no files
    st.write_json(f"{fake_model}/_manifest.json", {"format": "distill.model/1", "files": []})
    prompts = write("d/prompts", 5, {}, "prompts", "prompts")
    samples = write("d/samples", 9, {"prompts": prompts, "model": st.uri(fake_model)}, "generate", "samples")
    verified = write("d/verified", 9, {"samples": samples}, "verify", "verified")
    gone = st.uri(st.path("d", "deleted"))
    sft = write("d/sft", 4, {"samples": verified, "prompts": prompts, "extra": gone}, "dedupe", "sft")

    steps = _json(["datasets", "show", sft, "--json"])["funnel"]
    # prompts is a parent of both samples and sft: listed once, before everything built on it
    assert [s.get("name") or s["uri"] for s in steps] == ["prompts.prompts", "generate.samples", gone,
                                                          "verify.verified", "dedupe.sft"]
    rows = {s["name"]: s["rows"] for s in steps if not s.get("missing")}
    assert rows == {"prompts.prompts": 5, "generate.samples": 9, "verify.verified": 9, "dedupe.sft": 4}
    (missing,) = [s for s in steps if s.get("missing")]
    assert missing["uri"] == gone
    by_name = {s.get("name"): s for s in steps}
    assert by_name["generate.samples"]["parents"] == {"prompts": prompts}  # the model is not a row step
    assert all("dropped" not in s for s in steps)  # no stage records, no stats: rows only
    info = _json(["datasets", "show", sft, "--json"])
    assert info["length_histogram"] == {"column": "completion", "unit": "chars",
                                        "bins": [{"from": b, "to": b, "count": 1} for b in range(4)]}


def test_show_reads_manifests_and_records_written_before_the_dropped_key(tmp_path):
    """Datasets and stage records in the old shapes (per-stage names: stats.quarantined,
    stats.removed, stats.reasons; metrics quarantine_reasons, dropped_reasons,
    removed_by_eval_set) are shown in the one shape {kind: {reason: count}}."""
    from pipeline.store.storage import STAGE_RECORD

    st = Storage(str(tmp_path / "root"))

    def old_stage(kind, output, n, parents, stats, metrics):
        fp = kind * 3
        path = st.path("cache", kind, fp, "a1", output)
        w = st.dataset_writer(path, {"run_id": "old", "stage": kind, "output": output, "fingerprint": fp,
                                     "parents": {k: {"uri": u, "fingerprint": "x"} for k, u in parents.items()}})
        w.write(pa.table({"prompt_id": [f"p{i}" for i in range(n)]}))
        w.commit(stats=stats)  # written as the old stages did: no "dropped"
        st.write_json(st.path("cache", kind, fp, STAGE_RECORD), {
            "name": kind, "kind": kind, "fingerprint": fp, "run_id": "old", "attempt": "a1",
            "outputs": {output: {"type": "dataset", "path": path, "uri": st.uri(path)}},
            "rows": {output: n}, "metrics": metrics, "seconds": 1.0, "created": "2026-01-01T00:00:00+00:00"})
        return st.uri(path)

    prompts = old_stage("prompts", "prompts", 5, {}, {"input_rows": 7, "quarantined": {"empty prompt": 2}},
                        {"input_rows": 7, "quarantine_reasons": {"empty prompt": 2}})
    sft = old_stage("dedupe", "sft", 3, {"samples": prompts}, {"input_rows": 5, "removed": {"duplicate": 2}},
                    {"input_rows": 5, "kept": 3, "dropped_reasons": {"duplicate": 2}})
    clean = old_stage("decontaminate", "clean", 2, {"samples": sft},
                      {"input_rows": 3, "removed": {"contaminated": 1}, "removed_by_eval_set": {"gsm8k/test": 1}},
                      {"removed": 1, "removed_by_eval_set": {"gsm8k/test": 1}})

    info = _json(["datasets", "show", clean, "--json"])
    assert info["dropped"] == {"removed": {"contaminated": 1}}  # the manifest's own old stats
    assert [s["dropped"] for s in info["funnel"]] == [
        {"quarantined": {"empty prompt": 2}}, {"removed": {"duplicate": 2}},
        {"removed": {"contaminated:gsm8k/test": 1}}]
    (step,) = _json(["datasets", "show", prompts, "--json"])["funnel"]
    assert step["dropped"] == {"quarantined": {"empty prompt": 2}}
    text = CliRunner().invoke(app, ["datasets", "show", clean]).output
    assert "duplicate=2" in text and "contaminated:gsm8k/test=1" in text

    # no stage record, verify's old stats (every verdict's reason, "ok" the accepted rows): from the manifest
    path = st.path("d", "verified")
    w = st.dataset_writer(path, {"stage": "verify", "output": "verified"})
    w.write(pa.table({"prompt_id": ["a", "b", "c"]}))
    w.commit(stats={"reasons": {"ok": 1, "wrong_answer": 2}})
    assert _json(["datasets", "show", st.uri(path), "--json"])["dropped"] == {"rejected": {"wrong_answer": 2}}
