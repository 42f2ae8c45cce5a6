"""``fake_demo_run``: a test double of a finished demo run, for rendering the report without
minutes of vLLM and training. The datasets and models are committed with the project's own
writers (real manifests, Parquet shards, lineage and ``stats.dropped``); the run manifest has the
demo's stages and the evaluate stage's metrics in the ``roles`` shape (curves, comparisons,
budget sweep, promotion). Its numbers are made up; tests/test_report.py checks a real run."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa

from pipeline.store import layout
from pipeline.store.storage import Storage, now_iso

RUN_ID = "20260101-000000-demo-fake01"
PREV_RUN = "20251231-000000-toy-teacher-fake00"
REASONS = ["wrong_answer", "missing_think", "truncated", "no_boxed_answer"]


def _fp(i: int) -> str:
    return f"{i:02d}fakefingerprint{i:04d}"[:20]


def fake_demo_run(root: str | Path, prompts: int = 48, n: int = 8, seed: int = 0,
                  local_tmp: Path | None = None) -> tuple[Storage, str]:
    """Commit the fake run under ``root`` (a folder or ``s3://``; model files are staged in
    ``local_tmp``, default ``<root>/_fake_models``); returns (storage, run id)."""
    rng = random.Random(seed)
    st = Storage(str(root))
    stages: list[dict] = []

    def ds(stage: str, kind: str, fp: str, output: str, rows: list[dict], schema: pa.Schema, parents: dict,
           stats: dict | None = None, run_id: str = RUN_ID) -> str:
        path = layout.output_path(st, kind, fp, "a1", output)
        w = st.dataset_writer(path, {"run_id": run_id, "stage": stage, "kind": kind, "output": output,
                                     "fingerprint": fp, "parents": parents})
        w.write(pa.Table.from_pylist(rows, schema=schema))
        w.commit(schema, stats=stats)
        return st.uri(path)

    def model(stage: str, kind: str, fp: str, tmp: Path, run_id: str = RUN_ID) -> str:
        d = tmp / stage
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
        path = layout.output_path(st, kind, fp, "a1", "model")
        st.put_tree(d, path, {"run_id": run_id, "stage": stage, "kind": kind, "output": "model", "fingerprint": fp,
                              "parents": {}})
        return st.uri(path)

    def stage(name, kind, fp, inputs, status, seconds, outputs, rows, metrics=None, dropped=None, produced=None):
        s = {"name": name, "kind": kind, "fingerprint": fp, "inputs": inputs, "status": status, "seconds": seconds,
             "output": outputs, "rows": rows, "metrics": metrics or {}, "dropped": dropped or {}}
        if produced:
            s["produced_by_run"] = produced
        stages.append(s)

    tmp = Path(local_tmp) if local_tmp else Path(st.root) / "_fake_models"
    # toy_task (cached, from the teacher's run)
    pschema = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()), ("answer", pa.string())])
    prow = [{"prompt_id": f"p{i:04d}", "prompt": f"Compute {i} + {i * 3} - 2.", "answer": str(4 * i - 2)}
            for i in range(prompts)]
    distill = ds("toy_task", "toy_task", _fp(1), "distill", prow, pschema, {}, run_id=PREV_RUN)
    ev = ds("toy_task", "toy_task", _fp(1), "eval", prow[:16], pschema, {}, run_id=PREV_RUN)
    stage("toy_task", "toy_task", _fp(1), {}, "cached", 0.4, {"distill": distill, "eval": ev},
          {"distill": prompts, "eval": 16}, produced=PREV_RUN)
    teacher = model("teacher_sft", "sft", _fp(2), tmp, PREV_RUN)
    stage("teacher_sft", "sft", _fp(2), {}, "cached", 95.0, {"model": teacher}, {}, {"tokens_per_second": 2100.0,
          "train_tokens": 180000, "train_seconds": 85.7}, produced=PREV_RUN)
    # generate
    sschema = pa.schema([("prompt_id", pa.string()), ("sample_index", pa.int32()), ("prompt", pa.string()),
                         ("answer", pa.string()), ("completion", pa.string()), ("completion_tokens", pa.int32()),
                         ("finish_reason", pa.string()), ("error", pa.string())])
    samples = []
    for p in prow:
        for k in range(n):
            t = rng.randint(20, 96)
            samples.append({**p, "sample_index": k, "completion": f"<think>{p['prompt']} step {k}</think> \\boxed{{{p['answer']}}}",
                            "completion_tokens": t, "finish_reason": "length" if t == 96 else "stop", "error": None})
    gen = ds("generate", "generate", _fp(3), "samples", samples, sschema, {"prompts": {"uri": distill}})
    tokens = sum(r["completion_tokens"] for r in samples)
    stage("generate", "generate", _fp(3), {"prompts": "toy_task.distill", "model": "teacher_sft.model"}, "done", 41.5,
          {"samples": gen}, {"samples": len(samples)},
          {"prompts": prompts, "samples": len(samples), "completion_tokens": tokens,
           "generated_tokens_this_attempt": tokens, "engine_startup_seconds": 22.0})
    # verify
    vschema = pa.schema(list(sschema) + [pa.field("verdict", pa.string()), pa.field("reason", pa.string()),
                                         pa.field("detail", pa.string())])
    verified, reasons = [], {}
    for r in samples:
        ok = rng.random() < 0.55 and r["finish_reason"] == "stop"
        reason = "ok" if ok else ("truncated" if r["finish_reason"] == "length" else rng.choice(REASONS[:2] + REASONS[3:]))
        reasons[reason] = reasons.get(reason, 0) + 1
        verified.append({**r, "verdict": "correct" if ok else "rejected", "reason": reason,
                         "detail": None if ok else f"expected {r['answer']}"})
    rejected = {k: v for k, v in reasons.items() if k != "ok"}
    ver = ds("verify", "verify", _fp(4), "verified", verified, vschema, {"samples": {"uri": gen}},
             {"input_rows": len(samples), "dropped": {"rejected": rejected}})
    stage("verify", "verify", _fp(4), {"samples": "generate.samples"}, "done", 6.2, {"verified": ver},
          {"verified": len(verified)}, {"samples": len(verified), "correct": reasons.get("ok", 0), "reasons": reasons},
          {"rejected": rejected})
    # dedupe
    mtype = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    sft_schema = pa.schema([("prompt_id", pa.string()), ("sample_index", pa.int32()), ("messages", mtype)])
    dschema = pa.schema([("prompt_id", pa.string()), ("sample_index", pa.int32()), ("reason", pa.string())])
    kept, dropped, per = [], [], {}
    for r in sorted(verified, key=lambda r: r["completion_tokens"]):
        if r["verdict"] != "correct":
            dropped.append({"prompt_id": r["prompt_id"], "sample_index": r["sample_index"], "reason": "verdict:rejected"})
        elif per.get(r["prompt_id"], 0) >= 4:
            dropped.append({"prompt_id": r["prompt_id"], "sample_index": r["sample_index"], "reason": "max_per_prompt"})
        else:
            per[r["prompt_id"]] = per.get(r["prompt_id"], 0) + 1
            kept.append({"prompt_id": r["prompt_id"], "sample_index": r["sample_index"],
                         "messages": [{"role": "user", "content": r["prompt"]},
                                      {"role": "assistant", "content": r["completion"]}]})
    removed = dict(sorted({d["reason"]: sum(x["reason"] == d["reason"] for x in dropped) for d in dropped}.items()))
    dstats = {"input_rows": len(verified), "dropped": {"removed": removed}}
    sft = ds("dedupe", "dedupe", _fp(5), "sft", kept, sft_schema, {"samples": {"uri": ver}}, dstats)
    dd = ds("dedupe", "dedupe", _fp(5), "dropped", dropped, dschema, {"samples": {"uri": ver}}, dstats)
    stage("dedupe", "dedupe", _fp(5), {"samples": "verify.verified"}, "done", 1.1, {"sft": sft, "dropped": dd},
          {"sft": len(kept), "dropped": len(dropped)}, {"input_rows": len(verified), "kept": len(kept)},
          {"removed": removed})
    # decontaminate: the first two kept rows "match" an eval item
    cschema = pa.schema([("prompt_id", pa.string()), ("sample_index", pa.int32()), ("field", pa.string()),
                         ("eval_source", pa.string()), ("eval_id", pa.string()), ("eval_text", pa.string()),
                         ("ngram", pa.string())])
    cont = [{"prompt_id": r["prompt_id"], "sample_index": r["sample_index"], "field": "prompt", "eval_source": "eval",
             "eval_id": "p0001", "eval_text": prow[1]["prompt"], "ngram": "compute 1 + 3"} for r in kept[:2]]
    clean_rows = kept[2:]
    cstats = {"input_rows": len(kept), "dropped": {"removed": {"contaminated:eval": len(cont)}}}
    clean = ds("decontaminate", "decontaminate", _fp(6), "clean", clean_rows, sft_schema,
               {"samples": {"uri": sft}, "eval": {"uri": ev}}, cstats)
    contaminated = ds("decontaminate", "decontaminate", _fp(6), "contaminated", cont, cschema,
                      {"samples": {"uri": sft}, "eval": {"uri": ev}}, cstats)
    stage("decontaminate", "decontaminate", _fp(6), {"samples": "dedupe.sft", "eval": "toy_task.eval"}, "done", 0.8,
          {"clean": clean, "contaminated": contaminated}, {"clean": len(clean_rows), "contaminated": len(cont)},
          {"input_rows": len(kept)}, {"removed": {"contaminated:eval": len(cont)}})
    init = model("student_init", "init_model", _fp(7), tmp)
    stage("student_init", "init_model", _fp(7), {"corpus": "decontaminate.clean"}, "done", 3.0, {"model": init}, {})
    student = model("student_sft", "sft", _fp(8), tmp)
    stage("student_sft", "sft", _fp(8), {"data": "decontaminate.clean", "model": "student_init.model"}, "done", 64.0,
          {"model": student}, {}, {"tokens_per_second": 3200.5, "train_tokens": 150000, "train_seconds": 46.9})

    # evaluate, the roles shape
    def role(p1: float) -> dict:
        curves = {"pass@k": [[k, min(1.0, p1 + 0.08 * (k - 1) ** 0.7), 0.03] for k in range(1, n + 1)],
                  "maj@k": [[k, min(1.0, p1 + 0.03 * (k - 1) ** 0.5), 0.035] for k in range(1, n + 1)]}
        return {"prompts": 16, "samples": 16 * n, "errored": 0, "pass@1": p1, "pass@1_se": 0.04,
                "pass@1_ci95": [p1 - 0.08, p1 + 0.08], f"pass@{n}": curves["pass@k"][-1][1], f"pass@{n}_se": 0.03,
                f"maj@{n}": curves["maj@k"][-1][1], f"maj@{n}_se": 0.035, "mean_tokens": 52.1,
                "mean_tokens_correct": 48.0, "mean_tokens_wrong": 60.2, "tokens_per_correct": 110.0,
                "accuracy_per_1k_tokens": 8.1, "truncated_rate": 0.02, "curves": curves}

    metrics = {"temperature": 0.6, "sampling": {"n": n, "temperature": 0.6, "top_p": 1.0, "max_tokens": 96, "seed": 1},
               "roles": {"teacher": role(0.62), "base_student": role(0.05), "student": role(0.47)},
               "comparisons": [{"a": "student", "b": "teacher", "metric": "pass@1", "diff": -0.15, "se": 0.03,
                                "ci95": [-0.21, -0.09], "prompts": 16},
                               {"a": "student", "b": "base_student", "metric": "pass@1", "diff": 0.42, "se": 0.04,
                                "ci95": [0.34, 0.5], "prompts": 16}],
               "budget_sweep": {"student": [{"max_thinking_tokens": b, "pass@1": 0.2 + 0.3 * i / 3, "pass@1_se": 0.04,
                                             "mean_tokens": 12 + b * 0.8} for i, b in enumerate((8, 16, 32, 64))]},
               "promotion": {"promoted": True, "margin": 0.06, "se": 0.02, "threshold": 0.04, "best_before": None,
                             "best": student, "reason": "first student: no best before"}}
    eschema = pa.schema([("role", pa.string()), ("prompt_id", pa.string()), ("sample_index", pa.int32()),
                         ("verdict", pa.string())])
    erows = [{"role": r, "prompt_id": p["prompt_id"], "sample_index": k, "verdict": "correct"}
             for r in ("teacher", "student") for p in prow[:16] for k in range(n)]
    evs = ds("evaluate", "evaluate", _fp(9), "samples", erows, eschema, {"prompts": {"uri": ev}})
    stage("evaluate", "evaluate", _fp(9), {"prompts": "toy_task.eval", "train": "decontaminate.clean",
                                           "student": "student_sft.model", "teacher": "teacher_sft.model"},
          "done", 58.0, {"samples": evs}, {"samples": len(erows)}, metrics)
    manifest = {"format": "distill.run/1", "run_id": RUN_ID, "pipeline": "demo", "config_file": "configs/demo.yaml",
                "storage_root": st.uri(st.root), "config_hash": "f00dfeedc0ffee123456", "git_commit": None,
                "started": "2026-01-01T00:00:00+00:00", "status": "done", "stages": stages,
                "finished": now_iso(), "seconds": round(sum(s["seconds"] for s in stages if s["status"] == "done"), 1)}
    st.write_json(layout.run_manifest(st, RUN_ID), manifest)
    st.put_bytes(layout.latest_run(st), RUN_ID.encode())
    return st, RUN_ID
