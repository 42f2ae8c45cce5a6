"""Driver for tests/test_streaming.py's cluster test, run in its own process (the test session has
a Ray of its own): a head and two worker nodes on 127.0.0.1 (``ray.cluster_utils.Cluster``).

1. verify, dedupe and decontaminate run on many small pieces; each reports the rows each node
   processed (``rows_per_node``).
2. verify and dedupe run again, and a worker node is removed once the first output shard is
   written; the committed rows are compared with the input.

Usage: python tests/streaming_cluster_driver.py WORKDIR RESULT_JSON
"""
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["DISTILL_PIECE_BYTES"] = "1"  # one row group (one shard here) per piece


def _ctx(st, kind, stage_cls, src, out):
    from pipeline.core.stage import Artifact, StageContext

    return StageContext(name=kind, kind=kind, fingerprint="f", run_id="r", storage=st,
                        inputs={"samples": Artifact("dataset", src, st.uri(src), "f0")},
                        output_root=st.path(out), output_types=dict(stage_cls.outputs))


def _samples(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 17, i % 5
        right = (i % 3) != 0
        rows.append({"prompt_id": f"p{i // 4:04d}", "sample_index": i % 4, "prompt": f"What is {a} + {b}? ({i // 4})",
                     "answer": str(a + b), "source": "synthetic",
                     "completion": f"<think> {a} plus {b} </think> The answer is \\boxed{{{a + b if right else a + b + 1}}}"
                                   + (" padding words to make rows longer" * (i % 7))})
    return rows


def _run_with_loss(cluster, victim, st, run, watch: str) -> dict:
    """``run()`` in a thread; ``victim`` removed once a shard appears under ``watch``."""
    out: dict = {}

    def target():
        try:
            out["result"] = run()
        except Exception as e:  # reported, the test fails on it
            out["error"] = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=target)
    t.start()
    deadline = time.time() + 600  # hang guard
    removed = False
    while t.is_alive() and time.time() < deadline:
        if any(p.rsplit("/", 1)[-1].startswith("piece-") for p in st.ls(watch)):
            cluster.remove_node(victim, allow_graceful=False)
            removed = True
            break
        time.sleep(0.05)
    out["removed_while_running"] = removed and t.is_alive()
    t.join(600)
    return out


def main(workdir: str, result_path: str) -> None:
    import pyarrow as pa
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.store.storage import Storage
    from stages.decontaminate import Decontaminate
    from stages.decontaminate import Params as DParams
    from stages.dedupe import Dedupe
    from stages.dedupe import Params as DedupeParams
    from stages.verify import Params as VParams
    from stages.verify import Verify

    temp_dir = tempfile.mkdtemp(prefix="rsc-", dir="/tmp")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 100 * 2**20, "temp_dir": temp_dir,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    with open(result_path + ".address", "w") as f:
        f.write(cluster.address)
    report: dict = {}
    try:
        workers = [cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20) for _ in range(2)]
        ray.init(address=cluster.address, log_to_driver=False)
        report["nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        st = Storage(workdir)
        rows = _samples(480)
        src = st.path("in", "samples")
        w = st.dataset_writer(src, rows_per_shard=20)
        w.write(pa.Table.from_pylist(rows))
        w.commit()
        keys = sorted((r["prompt_id"], r["sample_index"]) for r in rows)

        def verify(out):
            ctx = _ctx(st, "verify", Verify, src, out)
            Verify("verify", VParams(actors=3, num_cpus=0.5, workers=1, chunk_size=16)).run(ctx)
            return ctx

        def dedupe(out, src_path):
            ctx = _ctx(st, "dedupe", Dedupe, src_path, out)
            Dedupe("dedupe", DedupeParams(partitions=2, max_per_prompt=2)).run(ctx)
            return ctx

        eval_file = Path(workdir) / "eval.jsonl"
        eval_file.write_text("".join(json.dumps({"question": f"What is {a} + 1? ({q})"}) + "\n"
                                     for a, q in ((3, 7), (5, 11))))

        def decontaminate(out, src_path):
            ctx = _ctx(st, "decontaminate", Decontaminate, src_path, out)
            Decontaminate("decontaminate", DParams(eval_files=[{"path": str(eval_file), "field": "question"}],
                                                   ngram=5)).run(ctx)
            return ctx

        v = verify("out/verify")
        vpath = v.written["verified"].path
        d = dedupe("out/dedupe", vpath)
        c = decontaminate("out/decon", vpath)
        verified = st.read_dataset(vpath)
        report["verify"] = {"nodes": v.metrics["rows_per_node"], "rows": verified.num_rows, "pieces": v.metrics["pieces"],
                            "keys_match": sorted(zip(verified.column("prompt_id").to_pylist(),
                                                     verified.column("sample_index").to_pylist())) == keys}
        sft = st.read_dataset(d.written["sft"].path)
        gone = st.read_dataset(d.written["dropped"].path)
        ref_kept = sorted(zip(sft.column("prompt_id").to_pylist(), sft.column("sample_index").to_pylist()))
        ref_gone = sorted(zip(*(gone.column(k).to_pylist() for k in ("prompt_id", "sample_index", "reason"))))
        report["dedupe"] = {"nodes": d.metrics["rows_per_node"], "kept": len(ref_kept), "dropped": len(ref_gone)}
        report["decontaminate"] = {"nodes": c.metrics["rows_per_node"], "removed": c.metrics["removed"],
                                   "clean": c.rows["clean"]}

        # a worker node lost in the middle of verify, then of dedupe
        lv = _run_with_loss(cluster, workers[0], st, lambda: verify("out/verify-loss"),
                            st.path("out/verify-loss/verified"))
        if "result" in lv:
            t = st.read_dataset(lv["result"].written["verified"].path)
            lv["keys_match"] = sorted(zip(t.column("prompt_id").to_pylist(), t.column("sample_index").to_pylist())) == keys
            lv["verdicts_match"] = (sorted(zip(t.column("prompt_id").to_pylist(), t.column("sample_index").to_pylist(),
                                               t.column("verdict").to_pylist()))
                                    == sorted(zip(verified.column("prompt_id").to_pylist(),
                                                  verified.column("sample_index").to_pylist(),
                                                  verified.column("verdict").to_pylist())))
            lv["rows"] = t.num_rows
            lv["manifest_rows"] = st.dataset_manifest(lv["result"].written["verified"].path)["rows"]
            del lv["result"]
        report["verify_loss"] = lv
        ld = _run_with_loss(cluster, workers[1], st, lambda: dedupe("out/dedupe-loss", vpath),
                            st.path("out/dedupe-loss/sft"))
        if "result" in ld:
            res = ld.pop("result")
            s2 = st.read_dataset(res.written["sft"].path)
            g2 = st.read_dataset(res.written["dropped"].path)
            ld["kept_match"] = sorted(zip(s2.column("prompt_id").to_pylist(), s2.column("sample_index").to_pylist())) == ref_kept
            ld["dropped_match"] = sorted(zip(*(g2.column(k).to_pylist() for k in ("prompt_id", "sample_index", "reason")))) == ref_gone
        report["dedupe_loss"] = ld
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    with open(result_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
