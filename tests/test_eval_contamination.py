"""evaluate refuses to score a held-out set that shares word n-grams with the training prompts,
before any engine starts (the student is the real tiny model: a check that ran after the
engines started would take the tens of seconds of a vLLM start-up, and its stage record says
how long the stage ran)."""

import pyarrow as pa
import pytest
from conftest import write_jsonl

from pipeline.core.config import load_config
from pipeline.core.runner import Runner
from pipeline.core.stage import StageError
from stages.evaluate import refuse_overlap

TRAIN = [
    {"q": "A baker fills 14 trays with 12 rolls each and then sells 97 of the rolls at the morning market. "
          "How many rolls are left?", "a": "71"},
    {"q": "Compute 3 + 4.", "a": "7"},
    {"q": "A train leaves the station at 9 and travels 60 miles per hour for 3 hours. How far does it go?",
     "a": "180"},
]
# a reworded copy of the first training prompt: another prompt_id, the same 13-word run
REWORDED = ("Please solve: a baker fills 14 trays with 12 rolls each and then sells 97 of the rolls "
            "at the evening market. How many rolls remain?")
EVAL = [
    {"q": "Compute 5 - 2.", "a": "3"},
    {"q": REWORDED, "a": "71"},
    {"q": "A farmer has 8 cows and buys 5 more cows at the fair. How many cows does the farmer have now?", "a": "13"},
]
SHARED = "a baker fills 14 trays with 12 rolls each and then sells 97"  # the first shared 13-gram


def _run(tmp_path, student: str, train_input: str, extra: str = ""):
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    held_out = write_jsonl(tmp_path / "eval.jsonl", EVAL)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: evalcheck
storage: {{root: {tmp_path}/root}}
stages:
  prompts: {{params: {{path: {train}, prompt_field: q, answer_field: a}}}}
  eval_prompts:
    uses: prompts
    params: {{path: {held_out}, prompt_field: q, answer_field: a}}
  sft_rows:
    uses: dedupe
    inputs: {{samples: prompts.prompts}}
    params: {{completion_field: answer, require_verdict: null}}
  evaluate:
    inputs: {{prompts: eval_prompts.prompts, train: {train_input}}}
    params: {{student: {student}{extra}}}
""")
    return Runner(load_config(cfg)).run()


@pytest.mark.parametrize("train_input", ["prompts.prompts", "sft_rows.sft"])  # prompt column / chat messages
def test_evaluate_refuses_ngram_overlap_before_engines(ray_local, tiny_model, tmp_path, train_input, monkeypatch):
    import stages.evaluate

    started = []  # any engine start: the refusal must come before it
    monkeypatch.setattr(stages.evaluate, "open_engines", lambda *a, **k: started.append(a) or pytest.fail("engine started"))
    result = _run(tmp_path, tiny_model, train_input)
    assert started == []
    assert not result.ok
    msg = result.stage_errors["evaluate"]
    assert "held-out prompts overlap the training data" in msg
    assert "1 of 3 eval prompt(s) share a 13-gram with a training prompt" in msg
    assert "please solve: a baker" in msg.lower() and repr(SHARED) in msg
    rec = result.manifest["stages"][-1]
    assert rec["name"] == "evaluate" and rec["status"] == "failed"


def test_evaluate_refuses_with_configured_ngram(ray_local, tiny_model, tmp_path):
    # the reworded prompt shares a run of 18 words with the training prompt
    result = _run(tmp_path, tiny_model, "prompts.prompts", extra=", overlap_ngram: 18")
    assert "1 of 3 eval prompt(s) share a 18-gram" in result.stage_errors["evaluate"]


def _train_table(prompts):
    return pa.table({"prompt_id": [f"t{i}" for i in range(len(prompts))], "prompt": prompts})


def test_check_passes_clean_sets_and_respects_n():
    train = _train_table([r["q"] for r in TRAIN])
    clean = [{"prompt_id": f"e{i}", "prompt": r["q"]} for i, r in enumerate(EVAL) if r["q"] != REWORDED]
    refuse_overlap(clean, train, 13)  # no error
    reworded = [{"prompt_id": "e1", "prompt": REWORDED}]
    refuse_overlap(reworded, train, 19)  # the longest shared run is 18 words
    with pytest.raises(StageError, match="1 of 1 eval prompt"):
        refuse_overlap(reworded, train, 18)


def test_check_short_prompts_match_only_exact_copies():
    train = _train_table(["Compute 3 + 4."])
    refuse_overlap([{"prompt_id": "e0", "prompt": "Compute 3 - 4."}], train, 13)
    with pytest.raises(StageError, match=r"share a 13-gram.*'compute 3 \+ 4 \.'"):
        refuse_overlap([{"prompt_id": "e0", "prompt": "compute  3 + 4."}], train, 13)


def test_check_shared_prompt_id_refused_first():
    train = _train_table(["Compute 3 + 4."])
    with pytest.raises(StageError, match="1 shared prompt_id"):
        refuse_overlap([{"prompt_id": "t0", "prompt": "anything"}], train, 13)
