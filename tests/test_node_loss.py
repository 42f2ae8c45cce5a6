"""Losing the worker node that runs the teacher engine mid-stage: Ray restarts the engine on
the other node, the chunks in flight are re-run, and every (prompt_id, sample_index) comes
out exactly once. Runs a multi-node Ray cluster on 127.0.0.1 in a child process, since the
test session has its own Ray; no process of it may survive."""
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, generate_config, write_jsonl
from test_resume import _survivors

N_PROMPTS, N = 48, 2


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
    try:
        log, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert _survivors(proc.pid, wait=30) == []  # no engine, raylet or worker of the cluster is left
    assert proc.returncode == 0, log[-3000:]
    report = json.loads(result.read_text())
    assert report["removed"], "generation finished before the node could be removed"
    assert report["ok"], report["error"]
    keys = [tuple(k) for k in report["keys"]]
    assert len(keys) == len(set(keys)) == N_PROMPTS * N
    assert report["errors"] == []
    assert report["engine_nodes"] and report["removed"]["node_id"] not in report["engine_nodes"]  # restarted elsewhere
