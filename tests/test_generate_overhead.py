"""The generate stage's overhead metric: the CPU its driver and engine actors spend outside the
engine, next to the engine's busy time; and an engine kept from an earlier run reports no start-up."""
import pytest
from conftest import generate_config, output_rows, run_stages, write_jsonl

from stages.generate import overhead


def test_overhead_arithmetic():
    engine = {"engine_s": 10.0, "cpu_s": 0.2, "engine_cpu_s": 1.0, "process_cpu_s": 1.5, "steps": 40}
    o = overhead(0.3, 0.4, engine)
    assert o["fraction"] == pytest.approx((0.3 + 0.2) / 10.0)
    assert o["actor_process_cpu_s"] == pytest.approx(0.5)  # the process less its engine calls
    assert o["engine_steps"] == 40
    assert o["fraction_upper"] == pytest.approx((0.4 + 0.5) / 10.0)
    assert overhead(0.3, 0.4, {**engine, "engine_s": 0.0})["fraction"] is None  # nothing generated


def test_usage_since_counts_a_restarted_replica_from_its_restart():
    from stages.common.engine import EnginePool

    before = [{"engine_s": 5.0, "cpu_s": 1.0, "engine_cpu_s": 2.0, "process_cpu_s": 9.0, "steps": 50, "pid": 1},
              {"engine_s": 5.0, "cpu_s": 1.0, "engine_cpu_s": 2.0, "process_cpu_s": 9.0, "steps": 50, "pid": 2}]
    after = [{"engine_s": 7.0, "cpu_s": 1.5, "engine_cpu_s": 3.0, "process_cpu_s": 10.0, "steps": 70, "pid": 1},
             {"engine_s": 1.0, "cpu_s": 0.25, "engine_cpu_s": 0.5, "process_cpu_s": 4.0, "steps": 5, "pid": 3}]  # restarted
    d = EnginePool.usage_since(before, after)
    assert d == {"engine_s": 3.0, "cpu_s": 0.75, "engine_cpu_s": 1.5, "process_cpu_s": 5.0, "steps": 25}
    assert EnginePool.usage_since(before, [after[0], None])["engine_s"] == 2.0  # a replica that did not answer


@pytest.mark.engine
def test_generate_reports_overhead(ray_local, tiny_model, tmp_path):
    src = write_jsonl(tmp_path / "src.jsonl", [{"prompt": f"Compute {i} * 3.", "answer": str(3 * i)} for i in range(24)])
    sampling = "{n: 2, max_tokens: 24, ignore_eos: true, seed: 1}"
    engine = "{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 4}"
    records, st = run_stages(generate_config(tmp_path, "overhead", src, tiny_model, sampling, engine))
    m = records["generate"]["metrics"]
    o = m["overhead"]
    assert set(o) == {"driver_cpu_s", "actor_cpu_s", "driver_process_cpu_s", "actor_process_cpu_s", "engine_s",
                      "engine_steps", "fraction", "fraction_upper"}
    assert o["engine_s"] > 0  # 48 samples of 24 tokens went through the engine
    assert 24 <= o["engine_steps"] <= 48 * 24  # at least one step per token of a sample, at most one per token
    assert o["actor_cpu_s"] > 0 and o["driver_cpu_s"] > 0  # prompts templated and tokenized; rows, checkpoints
    assert o["driver_process_cpu_s"] >= o["driver_cpu_s"] - 1e-3  # the thread is part of its process
    # The seconds are rounded to 3 decimals (each off by up to 5e-4), the fractions to 4 (5e-5). A ratio
    # f = a / e read from rounded parts is off by up to (|da| + f * |de|) / e: the denominator's rounding
    # scales with the fraction itself (CI once saw 5.9088 against 5.8927 read back with e = 0.177 s).
    def rounding(f):
        return (2 * 5e-4 + f * 5e-4) / (o["engine_s"] - 5e-4) + 5e-5 + 1e-9

    lower = (o["driver_cpu_s"] + o["actor_cpu_s"]) / o["engine_s"]
    upper = (o["driver_process_cpu_s"] + o["actor_process_cpu_s"]) / o["engine_s"]
    assert o["fraction"] == pytest.approx(lower, abs=rounding(lower))
    assert o["fraction_upper"] == pytest.approx(upper, abs=rounding(upper))
    assert len(output_rows(st, records["generate"], "samples")) == 48

    # a second run in another root reuses the kept engine, no start-up, though it commits in
    # batches of another size (a client's setting, not the engine's)
    other = tmp_path / "again"
    other.mkdir()
    records2, st2 = run_stages(generate_config(other, "overhead", src, tiny_model, sampling,
                                               engine.replace("batch_size: 4", "batch_size: 6")))
    m2 = records2["generate"]["metrics"]
    assert m2["engine_reused"] is True and "engine_startup_seconds" not in m2  # not started again
    assert len(output_rows(st2, records2["generate"], "samples")) == 48
    assert m2["overhead"]["engine_s"] > 0
    # each run counts its own share of the engine's lifetime (deltas of the actor's counters)
    import ray

    from stages.common.engine import _KEPT

    pool = next(p for p in _KEPT.values() if p.model_uri == tiny_model and p.spec.batch_size == 6)
    assert ray.get(pool.actors[0].window.remote()) == 6 * pool.spec.chunks_in_flight  # the last client's
    usage = [u for u in pool.usage() if u]
    lifetime = _engine_seconds(usage)
    assert o["engine_s"] + m2["overhead"]["engine_s"] <= lifetime + 1e-2
    # the parts are CPU outside the engine: the actor's own CPU and its CPU inside the engine calls
    # are disjoint parts of its process's CPU (counting the engine's CPU as overhead too would
    # overlap them), and a thread's CPU inside the engine calls is at most their wall time
    for u in usage:
        assert u["cpu_s"] > 0 and u["engine_cpu_s"] > 0, u
        assert u["cpu_s"] + u["engine_cpu_s"] <= u["process_cpu_s"] + 1e-3, u
        assert u["engine_cpu_s"] <= u["engine_s"] + 1e-3, u
    assert o["actor_cpu_s"] + m2["overhead"]["actor_cpu_s"] <= sum(u["cpu_s"] for u in usage) + 2e-3
    for run in (o, m2["overhead"]):  # per run: the actor's own CPU is within its process's CPU less the engine calls'
        assert run["actor_cpu_s"] <= run["actor_process_cpu_s"] + 1e-3, run


def _engine_seconds(usage: list) -> float:
    return sum(u["engine_s"] for u in usage if u)
