"""Budget forcing (s1) in the generate stage, on the tiny random model.

The random model never writes ``</think>``, so the tests pick delimiters whose behaviour is
known: ``§§`` it never writes (thinking always runs into the cap), and ``e``, which it
writes often, early (the reasoning "ends" before ``min_thinking_tokens``).
"""
import pytest
from conftest import generate_config, write_jsonl

from pipeline.core.config import load_config
from pipeline.core.runner import Runner
from pipeline.store.storage import Storage

# no max_num_seqs (nothing here depends on it): the same engine as test_budget_cap's and the other
# tiny-model tests', kept across tests (each engine start costs ~30 s)
ENGINE = "{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 2}"


def _samples(tmp_path, model, name, sampling):
    src = write_jsonl(tmp_path / "src.jsonl", [{"prompt": f"Compute {i} + 3.", "answer": str(i + 3)} for i in range(12)])
    res = Runner(load_config(generate_config(tmp_path, name, src, model, sampling, ENGINE))).run()
    assert res.ok, res.error
    gen = {s["name"]: s for s in res.manifest["stages"]}["generate"]
    st = Storage(str(tmp_path / "root"))
    rows = st.read_dataset(st.strip(gen["output"]["samples"])).to_pylist()
    keys = [(r["prompt_id"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == 24
    return rows, gen["metrics"]


@pytest.mark.engine
def test_max_thinking_tokens_forces_the_answer(ray_local, tiny_model, tmp_path):
    rows, metrics = _samples(tmp_path, tiny_model, "forced", "{n: 2, max_tokens: 40, ignore_eos: true, seed: 5, "
                             "budget: {max_thinking_tokens: 15, think_close: '§§', answer_prefix: ' ANSWER:'}}")
    for r in rows:
        assert r["error"] is None
        assert (r["thinking_tokens"], r["forced_answer"], r["waits"]) == (15, True, 0)
        assert r["completion_tokens"] == 40  # 15 thinking + 25 answer tokens, the whole budget
        assert r["completion"].count("§§ ANSWER:") == 1
    assert metrics["budget_forcing"]["forced_answers"] == 24


@pytest.mark.engine
def test_min_thinking_tokens_appends_wait(ray_local, tiny_model, tmp_path):
    rows, metrics = _samples(tmp_path, tiny_model, "waits", "{n: 2, max_tokens: 60, seed: 1, "
                             "budget: {min_thinking_tokens: 30, max_waits: 2, think_close: e, wait_text: ' Wait'}}")
    assert sum(r["waits"] for r in rows) > 0
    for r in rows:
        assert r["error"] is None and not r["forced_answer"]
        assert 0 <= r["waits"] <= 2
        assert r["completion"].count(" Wait") == r["waits"]
        if r["waits"]:  # each Wait replaced a close of the reasoning that came too early
            assert r["completion"].split(" Wait")[0].count("e") == 0
        if "e" in r["completion"] and r["thinking_tokens"] < 30:
            assert r["waits"] == 2  # closed early only once the waits were spent
    assert metrics["budget_forcing"]["waits"] == sum(r["waits"] for r in rows)
