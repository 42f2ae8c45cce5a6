"""Engine resources as data: what Ray is asked for, per replica, from the config alone."""
import pytest
from pydantic import ValidationError

from stages.common.engine import BudgetSpec, EngineSpec, SamplingSpec, actor_options, placement_bundles


def test_single_gpu_replica_takes_its_gpu_on_the_actor():
    spec = EngineSpec(num_gpus=1, num_cpus=4, resources={"node_type_h100": 0.01})
    opts = actor_options(spec)
    assert (opts["num_gpus"], opts["num_cpus"], opts["resources"]) == (1, 4, {"node_type_h100": 0.01})
    assert "distributed_executor_backend" not in spec.llm_kwargs()


def test_tensor_parallel_replica_gets_one_bundle_per_rank():
    spec = EngineSpec(num_gpus=1, num_cpus=2, tensor_parallel_size=4, gpu_memory_utilization=0.85,
                      max_num_seqs=256, options={"enable_prefix_caching": True})
    opts = actor_options(spec)
    assert opts["num_gpus"] == 0 and opts["num_cpus"] == 0  # the TP workers hold the GPUs
    assert placement_bundles(spec) == [{"CPU": 2, "GPU": 1}] * 4
    kw = spec.llm_kwargs()
    assert kw["tensor_parallel_size"] == 4 and kw["distributed_executor_backend"] == "ray"
    assert kw["gpu_memory_utilization"] == 0.85 and kw["max_num_seqs"] == 256 and kw["enable_prefix_caching"]


def test_streaming_keeps_chunks_in_flight_on_a_threaded_actor():
    opts = actor_options(EngineSpec(chunks_in_flight=6, max_restarts=3))
    assert opts["max_concurrency"] > 6 and opts["max_restarts"] == 3 and opts["max_task_retries"] == 3


def test_budget_spec_is_validated():
    s = SamplingSpec(budget={"max_thinking_tokens": 100, "min_thinking_tokens": 20, "max_waits": 1})
    assert isinstance(s.budget, BudgetSpec) and s.budget.wait_text == "Wait" and s.budget.think_close == "</think>"
    with pytest.raises(ValidationError, match="max_thinking_token"):
        SamplingSpec(budget={"max_thinking_token": 100})  # a typo is an error, not ignored
