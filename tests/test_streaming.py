"""The streaming data plane: stages cut their inputs into pieces, workers write the output shards,
and the committed datasets hold the same rows as the whole-table form did.

The reference below is the in-memory dedupe that this project shipped before streaming (the whole
input in one process), kept here as the oracle: the streaming stage, with its input cut into
many pieces and its global steps into several hash partitions, must keep and drop the same rows.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import run_dedupe_stage

# a 3-node Ray cluster of its own (one test): Ray bounds a node's start at a fixed 30 s, and a
# second shard's load beside it can pass that; tools/run_tests.py runs this file alone
pytestmark = pytest.mark.alone


def reference_dedupe(table: pa.Table, p) -> tuple[set, set]:
    """The pre-streaming algorithm: kept (prompt_id, sample_index) and dropped (prompt_id, sample_index, reason)."""
    from stages.common.textnorm import first_occurrences, normalize_texts, text_keys
    from stages.dedupe import near_duplicates, pick_diverse, shingles

    n = table.num_rows
    pids = table.column("prompt_id").to_pylist()
    idx = table.column("sample_index").to_pylist()
    reasons: dict[int, str] = {}
    alive = np.ones(n, bool)
    if p.require_verdict:
        ok = pc.fill_null(pc.equal(table.column("verdict"), p.require_verdict), False).to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(~ok).tolist():
            reasons[i] = f"verdict:{table.column('reason')[i].as_py() or table.column('verdict')[i].as_py()}"
        alive &= ok
    comps = table.column(p.completion_field)
    has = pc.fill_null(pc.greater(pc.binary_length(comps.cast(pa.string())), 0), False).to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(alive & ~has).tolist():
        reasons[i] = "empty_completion"
    alive &= has
    rows = np.flatnonzero(alive)
    take = pa.array(rows)
    first = first_occurrences(*text_keys(table.column("prompt").take(take), comps.take(take)))
    for i in rows[~first].tolist():
        reasons[i] = "duplicate"
    rows = rows[first]
    if p.near_dup.enabled and len(rows):
        take = pa.array(rows)
        joined = pc.binary_join_element_wise(normalize_texts(table.column("prompt").take(take)),
                                             normalize_texts(comps.take(take)), pa.scalar(" ", pa.large_string()))
        near = near_duplicates(joined, p.near_dup)
        for i in rows[near].tolist():
            reasons[i] = "near_duplicate"
        rows = rows[~near]
    raw_c = comps.cast(pa.string()).to_pylist()
    groups: dict[str, list[int]] = {}
    for i in rows.tolist():
        groups.setdefault(pids[i], []).append(i)
    kept = set()
    dropped = {(pids[i], idx[i], r) for i, r in reasons.items()}
    for pid, group in groups.items():
        k = p.max_per_prompt or len(group)
        keys = [(len(raw_c[i]), idx[i], i) for i in group]
        if p.prefer == "first":
            order = group
        elif p.prefer == "diverse" and len(group) > k:
            norm = normalize_texts(pa.array([raw_c[i] for i in group])).to_pylist()
            picked = pick_diverse(keys, [shingles(t, p.near_dup.ngram) for t in norm], k)
            order = [group[q] for q in picked] + [group[q] for q in sorted(set(range(len(group))) - set(picked))]
        else:
            order = [i for *_, i in sorted(keys)]
        kept |= {(pid, idx[i]) for i in order[:k]}
        dropped |= {(pid, idx[i], "over_max_per_prompt") for i in order[k:]}
    return kept, dropped


def _samples(n_prompts: int = 40, per_prompt: int = 6, seed: int = 0) -> list[dict]:
    """Samples with exact duplicates (after normalising), near duplicates, rejected and empty rows,
    and prompts whose samples are spread over the input (so over many pieces)."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(60)]
    rows = []
    for s in range(per_prompt):
        for q in range(n_prompts):
            base = " ".join(rng.choice(words) for _ in range(30))
            kind = rng.random()
            if kind < 0.15 and s:
                text = "  " + rows[-n_prompts]["completion"].upper()  # an exact duplicate of this prompt's previous
            elif kind < 0.3 and s and len(rows[-n_prompts]["completion"].split()) > 5:
                prev = rows[-n_prompts]["completion"].split()
                prev[3] = "edited"
                text = " ".join(prev)  # a near duplicate
            elif kind < 0.35:
                text = ""
            else:
                text = base + " " * rng.randint(0, 3) + "x" * rng.randint(0, 40)
            verdict = "correct" if rng.random() > 0.2 else "rejected"
            rows.append({"prompt_id": f"p{q:03d}", "prompt": f"question {q % (n_prompts - 3)}?", "sample_index": s,
                         "completion": text, "verdict": verdict, "reason": "ok" if verdict == "correct" else "wrong"})
    return rows


def _run_dedupe(tmp_path, rows, rows_per_shard: int, **params):
    return run_dedupe_stage(tmp_path / f"root-{rows_per_shard}-{params.get('partitions')}", rows, rows_per_shard, **params)


@pytest.mark.parametrize("params", [
    {"max_per_prompt": 2, "prefer": "shortest"},
    {"max_per_prompt": 2, "prefer": "first", "near_dup": {"enabled": True, "threshold": 0.7, "ngram": 3}},
    {"max_per_prompt": 3, "prefer": "diverse", "near_dup": {"enabled": True, "threshold": 0.8, "ngram": 2}},
], ids=["shortest", "first+near", "diverse+near"])
def test_streaming_dedupe_keeps_the_rows_of_the_in_memory_form(ray_local, tmp_path, params):
    rows = _samples()
    sft, dropped, ctx, p = _run_dedupe(tmp_path, rows, rows_per_shard=17, partitions=3, **params)
    assert ctx.metrics["pieces"] >= 10 and ctx.metrics["partitions"] == 3  # the work was really cut up
    kept = set(zip(sft.column("prompt_id").to_pylist(), sft.column("sample_index").to_pylist()))
    gone = set(zip(*(dropped.column(c).to_pylist() for c in ("prompt_id", "sample_index", "reason"))))
    want_kept, want_gone = reference_dedupe(pa.Table.from_pylist(rows), p)
    assert kept == want_kept
    assert gone == want_gone
    assert sft.num_rows == len(kept) and dropped.num_rows == len(gone)  # nothing twice
    assert sft.num_rows + dropped.num_rows == len(rows)  # rows in = rows out + rows dropped
    assert {"duplicate", "over_max_per_prompt"} <= {r for *_, r in gone}
    if p.near_dup.enabled:
        assert "near_duplicate" in {r for *_, r in gone}
    if p.prefer != "diverse":
        return
    # one piece and one partition: the same rows as many pieces
    sft1, dropped1, ctx1, _ = _run_dedupe(tmp_path, rows, rows_per_shard=50_000, partitions=1, **params)
    assert ctx1.metrics["pieces"] == 1
    assert set(zip(sft1.column("prompt_id").to_pylist(), sft1.column("sample_index").to_pylist())) == kept


def test_pieces_cover_every_row_once(tmp_path, monkeypatch):
    from pipeline.core.streaming import plan_pieces, read_piece
    from pipeline.store.storage import Storage

    st = Storage(str(tmp_path / "root"))
    path = st.path("d")
    w = st.dataset_writer(path, rows_per_shard=300)
    w.write(pa.table({"i": list(range(1000)), "s": ["x" * 50] * 1000}))
    w.commit()
    monkeypatch.setenv("DISTILL_PIECE_BYTES", "1")  # one row group per piece
    pieces = plan_pieces(st, path)
    assert len(pieces) == 4 and [p.offset for p in pieces] == [0, 300, 600, 900]
    got = [read_piece(st, p, ["i"]).column("i").to_pylist() for p in pieces]
    assert sum(got, []) == list(range(1000))
    assert all(g[0] == p.offset and len(g) == p.rows for g, p in zip(got, pieces))


def test_stages_spread_over_three_nodes_and_survive_losing_one(tmp_path):
    """verify, dedupe and decontaminate on a 3-node cluster (a child process, since the session has
    its own Ray): every node processes rows of each stage; a worker node removed mid-verify and
    mid-dedupe loses and duplicates nothing."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO, ProcessWatch
    from test_node_loss import forget_dead_cluster

    result = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "streaming_cluster_driver.py"),
                             str(tmp_path / "root"), str(result)], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watch = ProcessWatch(proc.pid)
    try:
        log, _ = proc.communicate(timeout=900)  # hang guard
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        forget_dead_cluster(Path(str(result) + ".address"))
    assert watch.survivors(wait=90) == []
    assert proc.returncode == 0, log[-3000:]
    r = json.loads(result.read_text())
    assert len(r["nodes"]) == 3
    for stage in ("verify", "dedupe", "decontaminate"):
        assert set(r[stage]["nodes"]) == set(r["nodes"]), (stage, r[stage]["nodes"])  # work on every node
    assert r["verify"]["keys_match"] and r["verify"]["rows"] == 480
    assert r["dedupe"]["kept"] + r["dedupe"]["dropped"] == 480
    for loss in ("verify_loss", "dedupe_loss"):
        assert "error" not in r[loss], r[loss]
        assert r[loss]["removed_while_running"], f"{loss}: the stage finished before the node could be removed"
    assert r["verify_loss"]["keys_match"] and r["verify_loss"]["rows"] == r["verify_loss"]["manifest_rows"] == 480
    assert r["verify_loss"]["verdicts_match"]
    assert r["dedupe_loss"]["kept_match"] and r["dedupe_loss"]["dropped_match"]


def test_small_stages_stream_the_same_rows(ray_local, tmp_path):
    """subsample draws its rows from the manifest's count and keeps them while streaming; concat
    appends its inputs batch by batch: the rows the whole-table forms gave."""
    from conftest import run_stages, write_jsonl

    src = write_jsonl(tmp_path / "src.jsonl", [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}
                                               for i in range(20_000)])
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: small-stream
storage: {{root: {tmp_path}/root}}
stages:
  prompts: {{params: {{path: {src}}}}}
  pick: {{uses: subsample, inputs: {{data: prompts.prompts}}, params: {{n: 777, seed: 3}}}}
  both: {{uses: concat, inputs: {{a: pick.data, b: prompts.prompts}}}}
""")
    records, st = run_stages(cfg)
    prompts = st.read_dataset(st.strip(records["prompts"]["output"]["prompts"]))
    pick = st.read_dataset(st.strip(records["pick"]["output"]["data"]))
    both = st.read_dataset(st.strip(records["both"]["output"]["data"]))
    want = np.sort(np.random.default_rng(3).choice(prompts.num_rows, size=777, replace=False))
    assert pick.column("prompt_id").to_pylist() == prompts.take(pa.array(want)).column("prompt_id").to_pylist()
    assert both.column("prompt_id").to_pylist() == pick.column("prompt_id").to_pylist() + prompts.column(
        "prompt_id").to_pylist()
    assert records["pick"]["dropped"] == {"removed": {"subsampled": 20_000 - 777}}


def test_sft_workers_read_the_data_memory_mapped(tmp_path):
    """sft's workers build their training set from the shards through datasets' memory-mapped cache:
    the same prompt/completion rows, in the same order, as the list the trainer used to get."""
    from datasets import Dataset

    from pipeline.core.stage import StageError
    from pipeline.store.storage import Storage
    from stages.dedupe import SFT_SCHEMA
    from stages.sft import local_dataset_files, to_prompt_completion, training_dataset

    st = Storage(str(tmp_path / "root"))
    path = st.path("sft")
    rows = [{"prompt_id": f"p{i}", "source": "s", "sample_index": 0,
             "messages": ([{"role": "system", "content": "be brief"}] if i % 3 == 0 else [])
             + [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(2500)]
    w = st.dataset_writer(path, rows_per_shard=700)
    w.write(pa.Table.from_pylist(rows, schema=SFT_SCHEMA))
    w.commit()
    files = local_dataset_files(st, path, str(tmp_path / "dl"))
    assert len(files) == 4
    ds = training_dataset(files, str(tmp_path / "cache"))
    assert ds.cache_files  # memory-mapped from disk, not built in memory
    want = Dataset.from_list([to_prompt_completion(r["messages"]) for r in rows])
    assert ds.features == want.features and ds.to_list() == want.to_list()
    bad = st.path("bad")
    w = st.dataset_writer(bad)
    w.write(pa.Table.from_pylist(rows[:5] + [{**rows[5], "messages": rows[5]["messages"][:-1]}], schema=SFT_SCHEMA))
    w.commit()
    with pytest.raises(StageError, match="row 5 of the training data does not end with an assistant turn"):
        training_dataset(local_dataset_files(st, bad, str(tmp_path / "dl2")), str(tmp_path / "cache2"))
