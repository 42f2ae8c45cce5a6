"""dedupe: near duplicates (MinHash LSH) of a lightly edited trace are dropped with a reason."""
import pytest
from conftest import output_rows, prompts_then, run_dedupe_stage, run_stages

TRACE = ("<think> First we add the two numbers of apples that Janet has in her basket, which gives twelve, "
         "then we subtract the three she gave to her neighbour on Monday morning, leaving nine apples, "
         "and finally we double it because her sister brings the same amount again </think> \\boxed{18}")


def _run(tmp_path, rows, params):
    cfg = prompts_then(tmp_path, rows, "dedupe", params, prompts_params="answer_field: trace")
    records, st = run_stages(cfg)
    return output_rows(st, records["dedupe"], "sft"), output_rows(st, records["dedupe"], "dropped")


@pytest.mark.parametrize("near", [True, False])
def test_near_duplicate_of_a_lightly_edited_trace(ray_local, tmp_path, near):
    edited = TRACE.replace("Monday morning", "Tuesday morning")
    rows = [
        {"prompt": "Janet's apples, version A?", "trace": TRACE},
        {"prompt": "Janet's apples, version B?", "trace": edited},  # one word of the trace edited
        {"prompt": "Something else entirely?", "trace": "<think> 2 + 2 = 4 </think> \\boxed{4}"},
    ]
    params = ("{completion_field: answer, require_verdict: null, near_dup: {enabled: %s, threshold: 0.5, ngram: 3}}"
              % str(near).lower())
    kept, dropped = _run(tmp_path, rows, params)
    if near:
        assert len(kept) == 2
        assert [d["reason"] for d in dropped] == ["near_duplicate"]
    else:
        assert len(kept) == 3 and dropped == []



# -- which traces survive max_per_prompt ---------------------------------------------

def _run_stage(tmp_path, rows: list[dict], **params):
    sft, dropped, ctx, _ = run_dedupe_stage(tmp_path / "root", rows, **params)
    sft, dropped = sft.to_pylist(), dropped.to_pylist()
    stats = ctx.storage.dataset_manifest(ctx.written["sft"].path)["stats"]
    assert stats == {"input_rows": len(rows), "dropped": ctx.dropped}
    assert sum(ctx.dropped.get("removed", {}).values()) == len(dropped) and set(ctx.dropped) <= {"removed"}
    return sft, dropped, {**ctx.metrics, "dropped": ctx.dropped}


BASE = ("<think> Janet has 3 baskets with 4 apples in each basket so she has twelve apples in total "
        "before she gives three of them away to her neighbour which leaves nine apples for the pie </think> \\boxed{9}")
CANDIDATES = [
    {"sample_index": 0, "completion": BASE.replace("to her neighbour ", "")},                       # shortest
    {"sample_index": 1, "completion": BASE.replace("neighbour", "friend")},                       # a one-word edit of it
    {"sample_index": 2, "completion": "<think> 3 * 4 = 12 and 12 - 3 = 9, so after giving three apples away "
                                      "Janet keeps 9 apples, which is just enough for the large apple pie that she "
                                      "wants to bake for her family tonight </think> \\boxed{9}"},  # the longest
    {"sample_index": 3, "completion": "  " + BASE.replace("to her neighbour ", "").upper()},     # exact dup after normalising
    {"sample_index": 4, "completion": "<think> guess </think> \\boxed{8}", "verdict": "rejected", "reason": "wrong_answer"},
]


# the longest first in the input, so first, shortest and diverse keep three different pairs
INPUT_ORDER = [2, 1, 0, 3, 4]


@pytest.mark.parametrize("prefer, kept, over", [("shortest", [0, 1], [2]), ("diverse", [0, 2], [1]),
                                                 ("first", [1, 2], [0])])
def test_prefer_selects_which_traces_survive_the_cap(tmp_path, prefer, kept, over):
    rows = [{"prompt_id": "p1", "prompt": "Janet's apples?", "verdict": "correct", "reason": "ok", **CANDIDATES[i]}
            for i in INPUT_ORDER]
    rows.append({"prompt_id": "p2", "prompt": "Other?", "sample_index": 0, "completion": "<think> x </think> \\boxed{1}",
                 "verdict": "correct", "reason": "ok"})
    # 0 and 1 are close (Jaccard 0.70 on 5-word shingles) but under the 0.9 near-duplicate threshold
    sft, dropped, metrics = _run_stage(tmp_path, rows, max_per_prompt=2, prefer=prefer,
                                       near_dup={"enabled": True, "threshold": 0.9})
    by_prompt = {}
    for r in sft:
        by_prompt.setdefault(r["prompt_id"], []).append(r["sample_index"])
    assert sorted(by_prompt["p1"]) == kept and by_prompt["p2"] == [0]
    completions = {c["sample_index"]: c["completion"] for c in CANDIDATES}
    for r in sft:
        if r["prompt_id"] == "p1":
            assert r["messages"][-1] == {"role": "assistant", "content": completions[r["sample_index"]]}
    assert {(d["sample_index"], d["reason"]) for d in dropped} == {
        (3, "duplicate"), (4, "verdict:wrong_answer"), *((i, "over_max_per_prompt") for i in over)}
    assert metrics["dropped"] == {"removed": {"duplicate": 1, "verdict:wrong_answer": 1, "over_max_per_prompt": 1}}
    assert metrics["kept"] == 3 and metrics["input_rows"] == 6


def test_diverse_picks_greedy_max_min():
    from stages.dedupe import pick_diverse

    sets = [{1, 2, 3, 4}, {1, 2, 3, 5}, {7, 8}, {1, 2, 7, 8}]
    keys = [(10, 0), (11, 1), (30, 2), (12, 3)]
    assert pick_diverse(keys, sets, 2) == [0, 2]          # 2 shares nothing with 0
    assert pick_diverse(keys, sets, 3) == [0, 2, 3]       # worst similarity to {0, 2}: 1 -> 0.6, 3 -> 0.5
    assert pick_diverse(keys, [{1}, {2}, {3}, {4}], 3) == [0, 1, 3]  # all tie at 0: shortest first


def test_all_rows_dropped_before_dedupe(tmp_path):
    rows = [{"prompt_id": "p", "prompt": "Q?", "sample_index": i, "completion": c, "verdict": v}
            for i, (c, v) in enumerate([("a", "rejected"), ("", "correct"), (None, "correct")])]
    sft, dropped, _ = _run_stage(tmp_path, rows, near_dup={"enabled": True}, prefer="diverse", max_per_prompt=1)
    assert sft == [] and [d["reason"] for d in dropped] == ["verdict:rejected", "empty_completion", "empty_completion"]


# -- the column-wise cores match what they replace ------------------------------------

def test_minhash_signatures_and_lsh_match_datasketch():
    import random

    import numpy as np
    import pyarrow as pa
    from datasketch import MinHash, MinHashLSH

    from stages.dedupe import MinHasher, NearDupSpec, near_duplicates, shingles

    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(60)]
    docs = ["", "one", "two words"]
    for _ in range(400):
        if rng.random() < 0.3:
            words = rng.choice(docs[3:] or ["a b c d e f g h"]).split(" ")
            words[rng.randrange(len(words))] = rng.choice(vocab)
            docs.append(" ".join(words))
        else:
            docs.append(" ".join(rng.choices(vocab, k=rng.randint(5, 60))))
    spec = NearDupSpec(enabled=True, threshold=0.7, ngram=3, num_perm=64, seed=3)
    sigs = MinHasher(spec.num_perm, spec.seed, spec.ngram).signatures(pa.array(docs), chunk=100)
    lsh, want = MinHashLSH(threshold=spec.threshold, num_perm=spec.num_perm), []
    for i, (doc, sig) in enumerate(zip(docs, sigs)):
        m = MinHash(num_perm=spec.num_perm, seed=spec.seed)
        m.update_batch(list(shingles(doc, spec.ngram)))
        assert np.array_equal(m.hashvalues, sig)
        want.append(bool(lsh.query(m)))
        if not want[-1]:
            lsh.insert(i, m)
    assert sum(want) > 20
    assert near_duplicates(pa.array(docs), spec).tolist() == want
