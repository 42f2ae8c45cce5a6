"""Fencing epochs on published pointers: a zombie run (an older lease epoch) that finishes after
a newer run cannot move ``latest/`` or ``runs/_latest`` back; its refused writes are in the
schedule's history and in its manifest."""
from __future__ import annotations

import json

from pipeline.core.config import load_config
from pipeline.core.runner import Runner
from pipeline.ops.schedule import Schedule, add_schedule, read_history
from pipeline.store import layout
from pipeline.store.lease import acquire
from pipeline.store.storage import Storage


def _run(cfg, run_id: str, root: str, epoch: int, monkeypatch) -> None:
    """A run as its scheduled job starts it: ``DISTILL_FENCE`` set, the run id given. In this
    process, on the session's Ray: the fencing is the runner's own, read from the environment at
    the run's end, and a ``distill run`` child would only add a Ray start of its own (~10 s)."""
    monkeypatch.setenv("DISTILL_FENCE", json.dumps({"root": root, "lease": "z", "epoch": epoch, "run_id": run_id}))
    result = Runner(load_config(cfg)).run(run_id=run_id)
    assert result.ok, result.error


def test_a_zombie_cannot_move_latest_back(ray_local, tmp_path, monkeypatch):
    root = str(tmp_path / "root")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
name: fenced
storage: {{root: {root}}}
ray: {{num_cpus: 1}}
stages:
  clock: {{uses: "slow_clock_stage:SlowClock", params: {{seconds: 0}}}}
""")
    st = Storage(root)
    add_schedule(st, Schedule("z", "0 3 * * *", str(cfg)))
    old = acquire(st, "z", "run-old", ttl=30)  # epoch 1: its holder froze, the lease was taken over
    old.release()
    new = acquire(st, "z", "run-new", ttl=30)
    assert (old.epoch, new.epoch) == (1, 2)
    _run(cfg, "run-new", root, new.epoch, monkeypatch)
    pointer_path = layout.latest_pointer(st, "fenced", "clock", "ticks")
    after_new = st.read_json(pointer_path)
    assert after_new["run_id"] == "run-new" and after_new["fence"]["epoch"] == 2
    _run(cfg, "run-old", root, old.epoch, monkeypatch)  # the zombie finishes last
    assert st.read_json(pointer_path) == after_new  # latest/ did not move back
    with st.fs.open(layout.latest_run(st), "rb") as f:
        assert f.read().decode().strip() == "run-new"  # nor runs/_latest
    zombie = st.read_json(layout.run_manifest(st, "run-old"))
    assert {r["newer"]["run_id"] for r in zombie["fencing_refused"]} == {"run-new"}
    (fenced,) = [e for e in read_history(st, "z") if e["event"] == "fenced"]
    assert fenced["run_id"] == "run-old" and fenced["epoch"] == 1
    refused = {r["pointer"] for r in fenced["refused"]}
    assert st.uri(pointer_path) in refused and st.uri(layout.latest_run(st)) in refused


def test_a_zombie_cannot_replace_the_promoted_best(tmp_path, monkeypatch):
    """The promotion pointer: a run of an older epoch is refused even when it scores better."""
    from stages.common.promotion import promote, read_best

    st = Storage(str(tmp_path / "root"))
    per = {f"p{i}": 0.0 for i in range(20)}
    monkeypatch.setenv("DISTILL_FENCE", json.dumps({"lease": "z", "epoch": 2, "run_id": "run-new"}))
    assert promote(st, "pipe", {"model": "new", "run_id": "run-new", "per_prompt": per, "score": 0.0})["promoted"]
    monkeypatch.setenv("DISTILL_FENCE", json.dumps({"lease": "z", "epoch": 1, "run_id": "run-old"}))
    better = {k: 1.0 for k in per}
    d = promote(st, "pipe", {"model": "old", "run_id": "run-old", "per_prompt": better, "score": 1.0})
    assert not d["promoted"] and d["fenced"] and read_best(st, "pipe")["model"] == "new"
    monkeypatch.setenv("DISTILL_FENCE", json.dumps({"lease": "z", "epoch": 3, "run_id": "run-next"}))
    assert promote(st, "pipe", {"model": "next", "run_id": "run-next", "per_prompt": better, "score": 1.0})["promoted"]
    assert read_best(st, "pipe")["fence"]["epoch"] == 3
