"""An engine actor that crashes mid-generation is restarted; its in-flight chunks are re-queued
by the pool (counted in ``requeued_chunks``; Ray retries no call) and the output still has every
(prompt_id, sample_index) exactly once."""
import threading
import time

import pytest
import ray
from conftest import generate_config, process_tree, still_running, write_jsonl

from pipeline.core.config import load_config
from pipeline.core.runner import Runner
from pipeline.store.storage import Storage
from stages.common import engine

N_PROMPTS, N = 40, 2


@pytest.mark.engine
def test_engine_actor_crash_is_survived(ray_local, tiny_model, tmp_path):
    src = write_jsonl(tmp_path / "src.jsonl", [{"prompt": f"Compute {i} * 2.", "answer": str(2 * i)}
                                               for i in range(N_PROMPTS)])
    # four sequences in the engine at once, set by the client's max_inflight rather than the
    # engine's max_num_seqs: the same engine as the other tiny-model tests', kept across tests
    # (each start costs ~30 s), and generation still paced to be running at the kill
    cfg = generate_config(tmp_path, "crash", src, tiny_model,
                          f"{{n: {N}, max_tokens: 100, ignore_eos: true, seed: 9}}",
                          "{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 2, max_inflight: 4}")
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", Runner(load_config(cfg)).run()))
    t.start()
    st = Storage(str(tmp_path / "root"))
    deadline = time.time() + 300
    killed = None
    while time.time() < deadline and t.is_alive():
        pools = [p for p in engine._KEPT.values() if p.model_uri == tiny_model and p.spec.batch_size == 2]
        parts = st.fs.glob(st.path("cache/generate/*/checkpoints/*/_manifest.json"))
        if pools and len(parts) >= 2:
            killed = pools[0].actors[0]
            old_pid = ray.get(killed.pid.remote())
            old_tree = process_tree(old_pid)  # the actor (on CPU its vLLM engine runs inside it) and any children
            ray.kill(killed, no_restart=False)  # like a crash: Ray restarts the actor
            break
        time.sleep(0.1)
    t.join(600)
    assert killed is not None, "generation finished before the engine could be killed"
    res = result["r"]
    assert res.ok, res.error
    gen = {s["name"]: s for s in res.manifest["stages"]}["generate"]
    rows = st.read_dataset(st.strip(gen["output"]["samples"])).to_pylist()
    keys = [(r["prompt_id"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == N_PROMPTS * N
    assert all(r["error"] is None and r["completion_tokens"] == 100 for r in rows)
    assert ray.get(killed.pid.remote(), timeout=120) != old_pid  # a restarted engine served the rest
    # the pool's own re-queue recovered the chunks lost with the actor (Ray retries no call)
    assert pools[0].requeued_chunks >= 1 and gen["metrics"]["samples"] == N_PROMPTS * N
    assert old_pid in old_tree and still_running(old_tree) == set()  # nothing of the crashed engine survives
