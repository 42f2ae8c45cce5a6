"""Driver for tests/test_node_loss.py, run in its own process (the test session already has a
Ray of its own): a Ray cluster of a head and two worker nodes on 127.0.0.1, the generate stage
with its engine on a worker node, and that node removed once some chunks are committed.

Usage: python tests/node_loss_driver.py CONFIG STORAGE_ROOT RESULT_JSON
"""
import json
import shutil
import sys
import tempfile
import threading
import time


def main(cfg_path: str, root: str, result_path: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    # A temp dir of its own keeps the cluster's session folders and logs apart. It does NOT keep
    # the address file out of /tmp/ray: ray.cluster_utils writes /tmp/ray/ray_current_cluster
    # (the file a later ray.init() or `ray` command without an address reads to find a cluster)
    # whatever temp_dir says, and only Cluster.shutdown() removes it. So the address goes to
    # RESULT_JSON.address first, and the test removes /tmp/ray/ray_current_cluster if it still names this
    # cluster after a driver that was killed before it could shut down.
    temp_dir = tempfile.mkdtemp(prefix="rnl-", dir="/tmp")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": 150 * 2**20, "temp_dir": temp_dir,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    address = cluster.address  # None once the cluster is shut down
    with open(result_path + ".address", "w") as f:
        f.write(address)
    try:
        workers = [cluster.add_node(num_cpus=1, resources={"engine": 1}, object_store_memory=100 * 2**20)
                   for _ in range(2)]
        ray.init(address=cluster.address, log_to_driver=False)
        report = _run(cluster, workers, cfg_path, root)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    from ray._private.utils import read_ray_address

    report["address"] = address
    report["address_file_after_shutdown"] = read_ray_address()  # ray_current_cluster, once shut down
    with open(result_path, "w") as f:
        json.dump(report, f)


def _engine_nodes(alive_only: bool = False) -> list[str]:
    """Nodes of the engine actors, from the GCS (the state API needs the dashboard)."""
    from ray._private import state

    return [a["Address"]["NodeID"] for a in state.actors().values()
            if a["ActorClassName"] == "EngineActor" and (a["State"] == "ALIVE" or not alive_only)]


def _run(cluster, workers, cfg_path: str, root: str) -> dict:
    import os

    from pipeline.core.config import load_config
    from pipeline.core.runner import Runner
    from pipeline.store.storage import Storage
    from stages.common import engine

    os.environ["DISTILL_KEEP_ENGINES"] = "1"  # the pool outlives the stage, so its re-queue count can be read
    out: dict = {}
    run = threading.Thread(target=lambda: out.setdefault("result", Runner(load_config(cfg_path)).run()))
    run.start()
    st = Storage(root)
    removed = None
    deadline = time.time() + 400
    while time.time() < deadline and run.is_alive():
        parts = st.fs.glob(st.path("cache/generate/*/checkpoints/*/_manifest.json"))
        engines = _engine_nodes(alive_only=True)
        if len(parts) >= 2 and engines:
            node = next(w for w in workers if w.node_id == engines[0])
            cluster.remove_node(node, allow_graceful=False)
            removed = {"node_id": node.node_id, "parts_before": len(parts)}
            break
        time.sleep(0.1)
    run.join(600)
    res = out["result"]
    report = {"removed": removed, "ok": res.ok, "error": res.error,
              "requeued_chunks": sum(p.requeued_chunks for p in engine._KEPT.values())}
    engine.shutdown_kept()
    if res.ok:
        gen = {s["name"]: s for s in res.manifest["stages"]}["generate"]
        rows = st.read_dataset(st.strip(gen["output"]["samples"])).to_pylist()
        report["keys"] = [[r["prompt_id"], r["sample_index"]] for r in rows]
        report["errors"] = [r["error"] for r in rows if r["error"]]
        report["engine_nodes"] = _engine_nodes()
    return report


if __name__ == "__main__":
    main(*sys.argv[1:4])
