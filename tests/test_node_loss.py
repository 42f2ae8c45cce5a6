"""Losing the worker node that runs the teacher engine mid-stage: Ray restarts the engine on
the other node, the chunks in flight are re-queued by the pool (Ray retries no call), and every
(prompt_id, sample_index) comes out exactly once. Runs a multi-node Ray cluster on 127.0.0.1 in
a child process, since the test session has its own Ray; no process of it may survive (its whole
process tree is watched, whatever process group each runs in), and the cluster's address must
not be left in /tmp/ray/ray_current_cluster for a later ray.init() to join."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, ProcessWatch, generate_config, write_jsonl

# a 2-node Ray cluster of its own: Ray bounds a node's start at a fixed 30 s, and a
# second shard's load beside it can pass that; tools/run_tests.py runs this file alone
pytestmark = pytest.mark.alone

# the node goes once 2 checkpoints (2 prompts each) are committed, with 12 of the 16 prompts (6 more
# windows of 4 sequences) still to generate: mid-stage, with half the generation of 32 prompts
N_PROMPTS, N = 16, 2


@pytest.mark.engine
def test_worker_node_loss(tiny_model, tmp_path):
    src = write_jsonl(tmp_path / "src.jsonl", [{"prompt": f"Compute {i} + 7.", "answer": str(i + 7)}
                                               for i in range(N_PROMPTS)])
    cfg = generate_config(tmp_path, "nodeloss", src, tiny_model,
                          f"{{n: {N}, max_tokens: 100, ignore_eos: true, seed: 4}}",
                          "{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 2, max_num_seqs: 4, "
                          "chunks_in_flight: 2, resources: {engine: 1}}")
    result = tmp_path / "result.json"
    env = {**os.environ, "DISTILL_KEEP_ENGINES": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "node_loss_driver.py"), str(cfg),
                             str(tmp_path / "root"), str(result)], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watch = ProcessWatch(proc.pid)
    address_file = Path(str(result) + ".address")
    try:
        log, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        forget_dead_cluster(address_file)
    left = watch.survivors(wait=90)
    assert any("EngineActor" in c for c in watch.seen.values()), f"no engine actor seen: {list(watch.seen.values())}"
    assert left == []  # no engine, engine core, raylet or worker of the cluster is left
    assert proc.returncode == 0, log[-3000:]
    report = json.loads(result.read_text())
    assert report["removed"], "generation finished before the node could be removed"
    assert report["ok"], report["error"]
    keys = [tuple(k) for k in report["keys"]]
    assert len(keys) == len(set(keys)) == N_PROMPTS * N
    assert report["errors"] == []
    assert report["engine_nodes"] and report["removed"]["node_id"] not in report["engine_nodes"]  # restarted elsewhere
    assert report["requeued_chunks"] >= 1  # the chunks lost with the node were sent again by the pool
    assert report["address"] and report["address_file_after_shutdown"] != report["address"]


def forget_dead_cluster(address_file: Path) -> None:
    """ray.cluster_utils writes /tmp/ray/ray_current_cluster whatever temp dir the cluster has; a
    driver killed before Cluster.shutdown() leaves it naming a dead cluster, which a later
    ray.init() without an address would try to join. Remove it if it still names ours."""
    from ray._common.utils import get_ray_address_file

    current = Path(get_ray_address_file(None))
    if address_file.exists() and current.exists() and current.read_text().strip() == address_file.read_text().strip():
        current.unlink(missing_ok=True)
