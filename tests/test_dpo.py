"""The dpo stage: TRL's DPOTrainer on Ray Train over preference pairs. max_length is explicit:
pairs it would cut fail the stage before any worker starts, naming the setting; with room,
it trains and records the truncation figures and the reward curves."""
import pytest
from conftest import REPO, write_jsonl

from pipeline.core.config import load_config
from pipeline.core.runner import Runner
from pipeline.store.storage import Storage


def _pairs(n: int) -> list[dict]:
    out = []
    for i in range(n):
        a, b = i % 9 + 1, (3 * i) % 7 + 1
        turn = [{"role": "user", "content": f"Compute {a} + {b}."}]
        good = f"<think>\n{a} + {b} = {a + b}\n</think>\nThe answer is \\boxed{{{a + b}}}."
        bad = f"<think>\n{a} + {b} = {a + b + 1}\n</think>\nThe answer is \\boxed{{{a + b + 1}}}."
        out.append({"prompt_id": f"p{i}", "source": "toy", "prompt": turn,
                    "chosen": [{"role": "assistant", "content": good}],
                    "rejected": [{"role": "assistant", "content": bad}],
                    "chosen_id": f"p{i}/0", "rejected_id": f"p{i}/1", "chosen_length": 20, "rejected_length": 20,
                    "length_unit": "tokens", "rejected_reason": "wrong_answer", "policy": "correct_vs_incorrect"})
    return out


def _config(tmp_path, model: str, max_length: int):
    src = write_jsonl(tmp_path / "pairs.jsonl", _pairs(8))
    cfg = tmp_path / f"dpo-{max_length}.yaml"
    cfg.write_text(f"""
name: dpo-test
storage: {{root: {tmp_path}/root}}
stages:
  pairs_double: {{uses: "fixture_rows_stage:FixtureRowsDouble", params: {{path: {src}, schema_name: pairs}}}}
  dpo:
    inputs: {{data: pairs_double.samples}}
    params: {{model: {model}, max_length: {max_length}, max_steps: 4, batch_size: 8, learning_rate: 5.0e-4,
             beta: 0.1, loss_type: sigmoid, logging_steps: 1, checkpoint_every: 2, num_cpus: 1, seed: 0}}
""")
    return cfg


@pytest.fixture
def on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tests"))


def test_too_short_max_length_fails_before_training_naming_the_setting(ray_local, tiny_model, tmp_path, on_path):
    result = Runner(load_config(_config(tmp_path, tiny_model, 16))).run()
    assert not result.ok
    message = result.stage_errors["dpo"]
    assert "8/8 preference pairs (100.0%) are longer than max_length 16 tokens" in message, message
    assert "params.max_length" in message and "params.max_truncated_fraction" in message


def test_dpo_trains_with_room_and_records_rewards(ray_local, tiny_model, tmp_path, on_path):
    result = Runner(load_config(_config(tmp_path, tiny_model, 96))).run()
    assert result.ok, result.error
    rec = {s["name"]: s for s in result.manifest["stages"]}["dpo"]
    m = rec["metrics"]
    assert m["truncation"]["truncated"] == 0 and m["truncation"]["pairs"] == 8
    assert 20 < m["truncation"]["longest_tokens"] <= 96
    assert m["steps"] == 4 and [s for s, _ in m["loss_curve"]] == [1, 2, 3, 4]
    margins = m["curves"]["rewards/margins"]
    assert [s for s, _ in margins] == [1, 2, 3, 4]
    assert margins[-1][1] > margins[0][1]  # the same batch each step: it learns to prefer the chosen answers
    assert m["checkpoints"] == [2, 4]
    st = Storage(str(tmp_path / "root"))
    lineage = st.tree_manifest(st.strip(rec["output"]["model"]))["lineage"]
    assert lineage["trained_on"][0]["rows"] == 8
