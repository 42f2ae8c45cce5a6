"""generate's budget cap (issue 24): no request is sent that could pass the cap; what was made
is committed with ``budget_exhausted`` and its figures; a larger cap resumes from the
checkpoints and generates only what is missing."""
import time

import pytest
from conftest import generate_config, output_rows, run_stages, write_jsonl

from stages.generate import BudgetCap, _BudgetGate

ENGINE = "{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 4}"


def test_gate_reserves_n_times_max_tokens_and_waits_for_returns():
    gate = _BudgetGate(BudgetCap(max_tokens=50), spent_tokens=0, n=2, per_sample=10, devices=1)
    reqs = [{"prompt_id": f"p{i}"} for i in range(4)]
    out = gate.gate(reqs)
    assert next(out) == reqs[0] and next(out) == reqs[1]  # 2 x 20 reserved
    assert next(out) is None  # a third would reserve 60 > 50: wait for those in flight
    gate.returned([{"prompt_id": "p0", "completion_tokens": 3}, {"prompt_id": "p0", "completion_tokens": 4}])
    assert next(out) == reqs[2]  # 7 spent + 20 + 20 = 47
    assert next(out) is None
    gate.returned([{"prompt_id": p, "completion_tokens": 10} for p in ("p1", "p1", "p2", "p2")])
    assert list(out) == []  # 47 spent, nothing in flight, 20 more would pass 50: the cap is reached
    assert gate.exhausted == "max_tokens"
    assert gate.figures(4, 3) == {"reason": "max_tokens", "max_tokens": 50, "spent_tokens": 47, "max_gpu_hours": None,
                                  "gpu_hours": 0.0, "prompts_done": 3, "prompts_left": 1}


def test_gate_stops_at_gpu_hours_counting_every_device():
    gate = _BudgetGate(BudgetCap(max_gpu_hours=1.0), spent_tokens=0, n=1, per_sample=10, devices=4)
    gate.t0 = time.monotonic() - 600  # 10 minutes x 4 devices: 0.67 GPU-hours
    out = gate.gate([{"prompt_id": "a"}, {"prompt_id": "b"}])
    assert next(out) == {"prompt_id": "a"}
    gate.t0 = time.monotonic() - 1000  # 1.11 GPU-hours
    assert next(out) is None  # "a" is still out
    gate.returned([{"prompt_id": "a", "completion_tokens": 1}])
    assert list(out) == [] and gate.exhausted == "max_gpu_hours"


@pytest.mark.engine
def test_generation_stops_at_the_cap_then_a_larger_cap_resumes(ray_local, tiny_model, tmp_path):
    prompts = [{"prompt": f"Compute {i} * 4.", "answer": str(4 * i)} for i in range(10)]
    src = write_jsonl(tmp_path / "src.jsonl", prompts)
    sampling = "{n: 2, max_tokens: 10, ignore_eos: true, seed: 6}"  # exactly 20 tokens a prompt
    cfg = generate_config(tmp_path, "budget", src, tiny_model, sampling, ENGINE)
    plain = cfg.read_text()

    def capped(tokens: int):
        cfg.write_text(plain.replace(f"engine: {ENGINE}}}", f"engine: {ENGINE}, budget: {{max_tokens: {tokens}}}}}"))
        return run_stages(cfg)

    records, st = capped(130)  # 6 prompts fit (120 tokens); a 7th could take 140
    gen = records["generate"]
    assert gen["status"] == "done"
    figures = dict(gen["metrics"]["budget_exhausted"])
    assert 0 < figures.pop("gpu_hours") < 1  # the engine's wall hours (one CPU replica counts as one device)
    assert figures == {"reason": "max_tokens", "max_tokens": 130, "spent_tokens": 120, "max_gpu_hours": None,
                       "prompts_done": 6, "prompts_left": 4}
    rows = output_rows(st, gen, "samples")
    first = {(r["prompt_id"], r["sample_index"]): r["completion"] for r in rows}
    assert len(first) == len(rows) == 12 and sum(r["completion_tokens"] for r in rows) == 120
    ids = list(dict.fromkeys(r["prompt_id"] for r in rows))
    by_text = {r["prompt"]: r["prompt_id"] for r in rows}
    assert [by_text.get(p["prompt"]) for p in prompts[:6]] == ids  # the first six, in input order
    # nothing lost: every committed checkpoint row is in the output
    kept = set()
    for path in st.fs.glob(st.path("cache/generate/*/checkpoints/*/_manifest.json")):
        t = st.read_dataset(path.rsplit("/", 1)[0], columns=["prompt_id", "sample_index"])
        kept.update(zip(t.column("prompt_id").to_pylist(), t.column("sample_index").to_pylist()))
    assert kept == set(first)
    stats = {r["prompt_id"]: r["samples"] for r in output_rows(st, gen, "prompt_stats")}
    assert len(stats) == 10 and sorted(stats.values()) == [0] * 4 + [2] * 6

    records, st = capped(1000)  # a larger cap: a new fingerprint, the samples resumed
    gen2 = records["generate"]
    assert gen2["fingerprint"] != gen["fingerprint"] and "budget_exhausted" not in gen2["metrics"]
    assert gen2["metrics"]["resumed_prompts"] == 6
    assert gen2["metrics"]["generated_tokens_this_attempt"] == 4 * 20  # only what was missing
    rows2 = output_rows(st, gen2, "samples")
    assert len(rows2) == 20 and all(first[k] == c for k, c in
                                    (((r["prompt_id"], r["sample_index"]), r["completion"]) for r in rows2) if k in first)
