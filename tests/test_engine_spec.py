"""Engine resources as data: what Ray is asked for, per replica, from the config alone."""
import pytest
from pydantic import ValidationError

from stages.common.engine import BudgetSpec, EngineSpec, SamplingSpec, actor_options, placement_bundles


def test_single_gpu_replica_takes_its_gpu_on_the_actor():
    spec = EngineSpec(num_gpus=1, num_cpus=4, resources={"node_type_h100": 0.01})
    opts = actor_options(spec)
    assert (opts["num_gpus"], opts["num_cpus"], opts["resources"]) == (1, 4, {"node_type_h100": 0.01})
    assert "distributed_executor_backend" not in spec.llm_kwargs()


def test_a_cpu_replica_runs_its_engine_in_the_actors_process():
    """vLLM's engine core and worker stay in the actor on CPU (no two more processes importing vLLM);
    a GPU or tensor-parallel replica keeps vLLM's processes; the choice can be forced either way."""
    assert EngineSpec().runs_in_process() and EngineSpec().llm_kwargs()["distributed_executor_backend"] == "uni"
    assert EngineSpec().llm_kwargs()["enable_chunked_prefill"] is False  # a seeded request in one process needs it
    assert not EngineSpec(num_gpus=1).runs_in_process()
    assert EngineSpec(num_gpus=1, in_process=True).llm_kwargs()["distributed_executor_backend"] == "uni"
    assert "distributed_executor_backend" not in EngineSpec(in_process=False).llm_kwargs()
    assert EngineSpec(num_gpus=1, tensor_parallel_size=2).llm_kwargs()["distributed_executor_backend"] == "ray"
    with pytest.raises(ValidationError, match="tensor_parallel_size 1"):
        EngineSpec(in_process=True, tensor_parallel_size=2)


def test_tensor_parallel_replica_gets_one_bundle_per_rank():
    spec = EngineSpec(num_gpus=1, num_cpus=2, tensor_parallel_size=4, gpu_memory_utilization=0.85,
                      max_num_seqs=256, options={"enable_prefix_caching": True})
    opts = actor_options(spec)
    assert opts["num_gpus"] == 0 and opts["num_cpus"] == 0  # the TP workers hold the GPUs
    assert placement_bundles(spec) == [{"CPU": 2, "GPU": 1}] * 4
    kw = spec.llm_kwargs()
    assert kw["tensor_parallel_size"] == 4 and kw["distributed_executor_backend"] == "ray"
    assert kw["gpu_memory_utilization"] == 0.85 and kw["max_num_seqs"] == 256 and kw["enable_prefix_caching"]


def test_actor_options_allow_chunks_in_flight_and_restarts():
    opts = actor_options(EngineSpec(chunks_in_flight=6, max_restarts=3))
    assert opts["max_concurrency"] > 6 and opts["max_restarts"] == 3
    assert opts["max_task_retries"] == 0  # a lost call is re-queued by the pool, never retried by Ray too


def test_budget_spec_is_validated():
    s = SamplingSpec(budget={"max_thinking_tokens": 100, "min_thinking_tokens": 20, "max_waits": 1})
    assert isinstance(s.budget, BudgetSpec) and s.budget.wait_text == "Wait" and s.budget.think_close == "</think>"
    with pytest.raises(ValidationError, match="max_thinking_token"):
        SamplingSpec(budget={"max_thinking_token": 100})  # a typo is an error, not ignored


@pytest.mark.engine
def test_streaming_keeps_chunks_in_flight_on_a_threaded_actor(ray_local, tiny_model):
    """Two replicas, chunks of one prompt, four chunks in flight per replica: on each replica the
    requests of four chunks are in the actor's engine loop at the same time (one continuous
    batch), seen from inside the actors while the pool streams; both replicas serve."""
    import threading
    import time

    import ray

    from stages.common.engine import EnginePool, SamplingSpec

    spec = EngineSpec(replicas=2, max_model_len=128, kv_cache_gb=0.25, batch_size=1, chunks_in_flight=4, max_num_seqs=8)
    rows = [{"prompt_id": f"p{i}", "prompt": f"Compute {i} + 1."} for i in range(16)]
    sampling = SamplingSpec(n=1, max_tokens=100, ignore_eos=True, seed=1)
    with EnginePool(tiny_model, spec) as pool:
        assert len(pool.actors) == 2 and len({ray.get(a.pid.remote()) for a in pool.actors}) == 2
        results: list = []
        t = threading.Thread(target=lambda: results.extend(pool.generate(rows, sampling)))
        t.start()
        peak = [0, 0]
        deadline = time.time() + 300
        while t.is_alive() and time.time() < deadline:  # a liveness bound, not a timing assertion
            queued = ray.get([a.__ray_call__.remote(lambda actor: len(actor._pending) + len(actor._inbox))
                              for a in pool.actors])
            peak = [max(p, q) for p, q in zip(peak, queued)]
            time.sleep(0.05)
        t.join(300)
        served = ray.get([a.__ray_call__.remote(lambda actor: next(actor._ids)) for a in pool.actors])
    assert len(results) == 16 and all(len(chunk) == 1 for chunk in results)  # 16 chunks of one sample
    assert sorted(r[0]["prompt_id"] for r in results) == sorted(r["prompt_id"] for r in rows)
    # four chunks' requests queued in each actor at once, never more than chunks_in_flight
    assert peak == [4, 4]
    assert all(n >= 2 for n in served)  # both replicas took requests


@pytest.mark.engine
def test_seeded_prompts_past_one_steps_token_budget_generate_in_process(ray_local, tiny_model):
    """A CPU engine runs in its actor's process. There vLLM 0.32 crashes when it discards the token
    of a partly prefilled seeded request (it rewinds a CPU generator); prompts are prefilled whole,
    so prompts that overflow one step's token budget all generate (the demo-rl crash)."""
    from stages.common.engine import EnginePool

    spec = EngineSpec(max_model_len=128, kv_cache_gb=0.25, batch_size=8, max_inflight=32,
                      options={"max_num_batched_tokens": 128})  # 2-3 of these prompts per step
    assert spec.runs_in_process()
    words = "add the numbers and explain each step"
    rows = [{"prompt_id": f"p{i}", "prompt": f"{words} {i} + {i}."} for i in range(24)]
    with EnginePool(tiny_model, spec) as pool:
        out = [r for chunk in pool.generate(rows, SamplingSpec(n=2, max_tokens=8, seed=5)) for r in chunk]
        assert sorted((r["prompt_id"], r["sample_index"]) for r in out) == sorted(
            (f"p{i}", k) for i in range(24) for k in range(2))
        assert all(r["error"] is None for r in out), [r["error"] for r in out if r["error"]][:3]
        assert min(r["prompt_tokens"] for r in out) > 128 // 4  # 3 prompts or fewer fit in one step
