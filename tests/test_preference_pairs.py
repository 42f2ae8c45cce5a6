"""preference_pairs on hand-built verified samples: each policy gives the pairs it promises, an
errored sample is never used, and every prompt is paired or dropped with a reason."""
import pytest
from conftest import run_stage_on_rows

from stages.preference_pairs import PreferencePairs, pair_rows


def _s(pid, idx, verdict, text, tokens, reason=None):
    return {"prompt_id": pid, "sample_index": idx, "prompt": f"question {pid}", "completion": text,
            "completion_tokens": tokens, "verdict": verdict,
            "reason": reason or {"correct": "ok", "rejected": "wrong_answer", "error": "checker_timeout"}[verdict],
            "source": "toy"}


SAMPLES = [
    # a: two correct (the shorter is chosen), a format failure and a wrong answer (preferred as rejected)
    _s("a", 0, "rejected", "no think", 5, "missing_think"), _s("a", 1, "correct", "a long right", 30),
    _s("a", 2, "rejected", "a wrong one", 12), _s("a", 3, "correct", "short right", 8),
    _s("b", 0, "correct", "b1", 10), _s("b", 1, "correct", "b2", 10),  # all correct, equal lengths
    _s("c", 0, "rejected", "c1", 4), _s("c", 1, "rejected", "c2", 6),  # none correct
    _s("d", 0, "error", "d1", 3), _s("d", 1, "correct", "d2", 9),  # one usable sample: the error is unused
    _s("e", 0, "error", "e1", 3), _s("e", 1, "error", "e2", 3),  # only errors
    # f: one correct, its wrong answer split across the input (rows far apart are still paired)
    _s("f", 0, "correct", "f right", 7),
    _s("g", 0, "correct", "g short", 5), _s("g", 1, "correct", "g mid", 9), _s("g", 2, "correct", "g long", 20),
    _s("g", 3, "error", "g err", 1), _s("g", 4, "rejected", "g wrong", 11),
    _s("f", 1, "rejected", "f wrong", 9),
]


def _run(tmp_path, **params):
    ctx, _ = run_stage_on_rows(tmp_path / params["policy"], PreferencePairs, params, {"samples": SAMPLES},
                               rows_per_shard=5)  # several shards: pass 2 meets halves in different ones
    pairs = ctx.storage.read_dataset(ctx.written["pairs"].path).to_pylist()
    return pairs, ctx


def test_correct_vs_incorrect(tmp_path):
    pairs, ctx = _run(tmp_path, policy="correct_vs_incorrect", max_pairs_per_prompt=2)
    got = {(p["chosen_id"], p["rejected_id"]) for p in pairs}
    # a: shortest correct with the wrong answer first, then the next correct with the format failure
    assert got == {("a/3", "a/2"), ("a/1", "a/0"), ("f/0", "f/1"), ("g/0", "g/4")}
    a = next(p for p in pairs if p["chosen_id"] == "a/3")
    assert a["prompt"] == [{"role": "user", "content": "question a"}]
    assert a["chosen"] == [{"role": "assistant", "content": "short right"}]
    assert a["rejected"] == [{"role": "assistant", "content": "a wrong one"}]
    assert (a["chosen_length"], a["rejected_length"], a["length_unit"]) == (8, 12, "tokens")
    assert a["rejected_reason"] == "wrong_answer" and a["policy"] == "correct_vs_incorrect" and a["source"] == "toy"
    assert all("err" not in p["rejected"][0]["content"] for p in pairs)  # an errored sample is never used
    assert ctx.dropped == {"removed": {"no_incorrect": 1, "no_correct": 1, "single_sample": 1, "only_errors": 1}}
    m = ctx.metrics
    assert m["prompts"] == 7 and m["prompts_paired"] == 3 and m["pairs"] == 4
    assert m["prompts_paired"] + sum(ctx.dropped["removed"].values()) == m["prompts"]  # every prompt accounted for
    assert m["errored_samples_unused"] == 4


def test_short_vs_long(tmp_path):
    pairs, ctx = _run(tmp_path, policy="short_vs_long", max_pairs_per_prompt=1)
    assert {(p["chosen_id"], p["rejected_id"]) for p in pairs} == {("a/3", "a/1"), ("g/0", "g/2")}
    assert all(p["chosen_length"] < p["rejected_length"] for p in pairs)
    assert ctx.dropped == {"removed": {"equal_lengths": 1, "no_correct": 1, "single_sample": 1, "only_errors": 1,
                                       "single_correct": 1}}
    assert ctx.metrics["prompts_paired"] + sum(ctx.dropped["removed"].values()) == ctx.metrics["prompts"] == 7


@pytest.mark.parametrize("policy, lengths, want", [
    ("short_vs_long", [5, 9, 20, 30], [(0, 3), (1, 2)]),  # outermost first, then inwards
    ("short_vs_long", [5, 9, 9, 9], [(0, 3)]),  # the next would not be strictly shorter
    ("correct_vs_incorrect", [5, 9, 20, 30], [(0, 2), (1, 3)]),
])
def test_pairing_rule(policy, lengths, want):
    verdicts = ["correct"] * 4 if policy == "short_vs_long" else ["correct", "correct", "rejected", "rejected"]
    pairs, reason = pair_rows(policy, verdicts, lengths, ["ok"] * 4, [0, 1, 2, 3], max_pairs=3)
    assert (pairs, reason) == (want, None)


def test_chars_when_there_are_no_token_counts(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "completion_tokens"} for r in SAMPLES if r["prompt_id"] == "a"]
    ctx, _ = run_stage_on_rows(tmp_path, PreferencePairs, {"policy": "short_vs_long"}, {"samples": rows})
    [pair] = ctx.storage.read_dataset(ctx.written["pairs"].path).to_pylist()
    assert (pair["chosen_length"], pair["rejected_length"], pair["length_unit"]) == (11, 12, "chars")
