"""The sft stage on Ray Train: the same loss curve on 1 or 2 workers, and again after a torn Ray
Train snapshot was set aside; a SIGKILLed worker and a killed driver both resume from the last
reported checkpoint; checkpoints and the model in S3."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO, ProcessWatch, run_stages

from pipeline.core.config import load_config
from pipeline.core.runner import Runner
from pipeline.store.storage import Storage

LOSS_RTOL = 1e-3  # 1 vs 2 workers: same data order and global batch; only float summation order differs


def _config(tmp_path, root: str, name: str, model: str, **sft) -> "os.PathLike":
    params = {"model": model, "max_steps": 12, "batch_size": 32, "learning_rate": 1.0e-3, "max_length": 128,
              "seed": 0, "logging_steps": 1, "checkpoint_every": 4, "num_workers": 1, "num_cpus": 1, **sft}
    flow = ", ".join(f"{k}: {v}" for k, v in params.items())
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"""
name: {name}
storage: {{root: {root}}}
ray: {{num_cpus: 2}}
stages:
  toy_task: {{params: {{seed: 0, train_size: 512, distill_size: 1, eval_size: 1}}}}
  chat:
    uses: dedupe
    inputs: {{samples: toy_task.train}}
    params: {{completion_field: solution, require_verdict: null}}
  sft:
    inputs: {{data: chat.sft}}
    params: {{{flow}}}
""")
    return cfg


SNAPSHOTS = "cache/sft/*/checkpoints/train-*"


def _registered(st) -> int | None:
    """The last checkpoint step Ray Train has registered (and would resume from), if any."""
    from stages.sft import SNAPSHOT, registered_checkpoint_step

    st.fs.invalidate_cache()  # s3fs caches listings
    runs = [p.rsplit("/", 1)[0] for p in st.fs.glob(st.path(SNAPSHOTS, SNAPSHOT))]
    return registered_checkpoint_step(st, runs[0]) if runs else None


def _sft(records: dict) -> dict:
    return records["sft"]["metrics"]


def test_same_loss_curve_on_one_and_two_workers_and_after_a_torn_snapshot(ray_local, tiny_model, tmp_path):
    from stages.common.training import SNAPSHOT

    cfg = _config(tmp_path, f"{tmp_path}/r1", "w1", tiny_model)
    records, st = run_stages(cfg)
    one = _sft(records)
    _assert_model_lineage(records, st)
    two = _sft(run_stages(_config(tmp_path, f"{tmp_path}/r2", "w2", tiny_model, num_workers=2))[0])
    assert one["num_workers"] == 1 and two["num_workers"] == 2
    assert one["steps"] == two["steps"] == 12
    assert [s for s, _ in one["loss_curve"]] == [s for s, _ in two["loss_curve"]] == list(range(1, 13))
    assert one["loss_curve"][-1][1] < one["loss_curve"][0][1]  # it learns
    for (_, a), (_, b) in zip(one["loss_curve"], two["loss_curve"]):
        assert b == pytest.approx(a, rel=LOSS_RTOL)
    assert two["train_tokens"] == one["train_tokens"]  # both workers' tokens are counted, once

    # the first run again, in its own run folder, after its Ray Train snapshot was cut short (as if
    # the driver had been killed while Ray Train rewrote it): the torn file is set aside, training
    # starts over from step 1 (an intact snapshot would resume at step 12 and train nothing), and
    # the same seed and worker count give the same run
    [snap] = st.fs.glob(st.path(SNAPSHOTS, SNAPSHOT))
    st.put_bytes(snap, st.fs.cat(snap)[:40])
    [entry] = [e for e in Runner(load_config(cfg)).plan() if e.name == "sft"]
    st.fs.rm(entry.record_path)  # the stage is not cached any more: the rerun trains in the same run folder
    again = _sft(run_stages(cfg)[0])
    [start] = again["worker_starts"]
    assert start["resumed_from_step"] is None and start["first_step"] == 1, again["worker_starts"]
    assert st.exists(f"{snap}.torn")
    assert again["loss_curve"] == one["loss_curve"]


def _assert_model_lineage(records: dict, st) -> None:
    """README: the committed model's lineage lists the dataset manifest it trained on (URI,
    fingerprint, the manifest's sha256), as read from storage here."""
    import hashlib

    data_uri = records["chat"]["output"]["sft"]
    raw = st.fs.cat_file(f"{st.strip(data_uri)}/_manifest.json")
    lineage = st.tree_manifest(st.strip(records["sft"]["output"]["model"]))["lineage"]
    (trained_on,) = lineage["trained_on"]
    assert trained_on["uri"] == data_uri and trained_on["fingerprint"] == records["chat"]["fingerprint"]
    assert trained_on["manifest_sha256"] == hashlib.sha256(raw).hexdigest()
    assert trained_on["rows"] == records["chat"]["rows"]["sft"]


def _run_in_thread(cfg):
    # sft's fingerprint (it names the state actor) is known once its input is committed: it is
    # keyed by the content digest of that input, so it is taken from the runner's start event
    fps: dict = {}
    runner = Runner(load_config(cfg), on_stage=lambda name, event, info: fps.setdefault(name, info["fingerprint"])
                    if event == "start" else None)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=runner.run()), daemon=True)
    thread.start()
    return runner, fps, thread, out


# S3 only: a worker lost with checkpoints in object storage; resuming from a local root's
# checkpoints is test_driver_kill_then_rerun_resumes
@pytest.mark.parametrize("where", ["s3"])
def test_worker_sigkill_resumes_from_last_checkpoint(ray_local, tiny_model, tmp_path, where, request):
    import ray

    from stages.sft import state_actor_name

    root = f"{tmp_path}/root"
    if where == "s3":
        bucket = request.getfixturevalue("moto_s3_bucket")
        root = f"s3://{bucket}/sft-kill-{tmp_path.name}"
    # checkpoints every 20 steps: the kill comes a few steps past the first, inside the second
    # epoch (16 steps each), with 30+ steps still to go. A resume inside the first epoch did not
    # tell the data orders apart (make mutate's sft-data-order break survived at every 10)
    cfg = _config(tmp_path, root, f"kill-{where}", tiny_model, max_steps=60, checkpoint_every=20,
                  num_workers=2, max_failures=2)
    runner, fps, thread, out = _run_in_thread(cfg)
    killed = None
    deadline = time.time() + 600
    while time.time() < deadline and thread.is_alive() and killed is None:
        try:
            snap = ray.get(ray.get_actor(state_actor_name(fps.get("sft", "not-started"))).snapshot.remote())
        except ValueError:  # not created yet
            time.sleep(0.2)
            continue
        except ray.exceptions.RayActorError:  # training is over
            break
        registered = _registered(runner.storage) if snap["checkpoints"] else None
        # a few steps past the checkpoint, so the resumed group trains them again
        if registered is not None and snap["last_step"] >= registered + 3:
            rank1 = [s["pid"] for s in snap["starts"] if s["rank"] == 1 and s["attempt"] == 0]
            os.kill(rank1[0], signal.SIGKILL)
            killed = _registered(runner.storage)
        time.sleep(0.05)
    thread.join(600)
    assert killed is not None, "training finished before a worker could be killed"
    result = out["result"]
    assert result.ok, result.error
    m = {s["name"]: s for s in result.manifest["stages"]}["sft"]["metrics"]
    assert len(m["worker_starts"]) == 2
    first, second = m["worker_starts"]
    assert first["resumed_from_step"] is None and first["first_step"] == 1
    resumed = second["resumed_from_step"]
    assert resumed is not None and resumed >= killed and resumed % 20 == 0
    assert second["first_step"] == resumed + 1  # not step 1
    assert second["last_step"] == m["steps"] == m["planned_steps"] == 60  # the planned number of optimizer steps
    # the same data order after the resume: the steps both groups trained (from the checkpoint
    # to the kill) saw the same batches from the same weights, so they logged the same losses
    first_losses: dict = {}
    again = []
    for step, loss in m["loss_curve"]:
        if step in first_losses:
            again.append((step, first_losses[step], loss))
        first_losses.setdefault(step, loss)
    assert again and again[0][0] == resumed + 1, m["loss_curve"]
    for step, before, after in again:
        assert after == pytest.approx(before, rel=LOSS_RTOL), f"step {step}: {before} before the kill, {after} after"
    st = runner.storage
    model = st.strip(m["checkpoint_dir"])
    assert any(re.search(r"checkpoint_\d+$", p) for p in st.ls(model))
    out_uri = {s["name"]: s for s in result.manifest["stages"]}["sft"]["output"]["model"]
    assert out_uri.startswith("s3://" if where == "s3" else "/")
    files = {f["path"] for f in st.tree_manifest(st.strip(out_uri))["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files


def test_driver_kill_then_rerun_resumes(ray_local, tiny_model, tmp_path):
    root = tmp_path / "root"
    # killed once the first checkpoint (step 10) is registered, 70 steps before the end; the rerun
    # then trains the rest (it was 200 steps, every 25: ~100 steps more for the rerun to train)
    cfg = _config(tmp_path, str(root), "driver", tiny_model, max_steps=80, checkpoint_every=10)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(cfg)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    watch = ProcessWatch(proc.pid)  # the driver's whole tree: a Ray worker leads a process group of its own
    st = Storage(str(root))
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not _registered(st):
            time.sleep(0.1)
        assert proc.poll() is None, "the first run finished before its driver could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(30)
    # the train workers and controller outlive the driver's process group for a moment and may
    # still register a checkpoint: read what the rerun resumes from once none of them is left
    assert watch.survivors(wait=60) == []
    step = _registered(st)
    assert step and step % 10 == 0 and step < 80, f"registered step {step}"

    records, _ = run_stages(cfg)
    m = records["sft"]["metrics"]
    assert records["sft"]["status"] == "done"
    [start] = m["worker_starts"]
    seen = f"registered {step}, worker starts {m['worker_starts']}, checkpoints {m['checkpoints']}"
    assert start["resumed_from_step"] == step, seen  # the last checkpoint the killed run registered
    assert start["first_step"] == step + 1, seen
    assert m["steps"] == start["last_step"] == 80, seen


def test_a_snapshot_read_mid_write_is_retried_and_a_torn_one_named(tmp_path):
    from stages.common.training import SNAPSHOT, TornSnapshot, registered_checkpoint_step

    st = Storage(str(tmp_path))
    path = f"{tmp_path}/run/{SNAPSHOT}"
    whole = b'{"latest_checkpoint_result": {"metrics": {"step": 30}}}'
    st.put_bytes(path, whole[:17])  # what a reader sees while Ray Train rewrites the file in place
    writer = threading.Timer(0.3, lambda: st.put_bytes(path, whole))
    writer.start()
    assert registered_checkpoint_step(st, f"{tmp_path}/run") == 30  # the write finished within the retries
    writer.join()
    st.put_bytes(path, whole[:17])  # its writer killed mid-write: it never parses
    with pytest.raises(TornSnapshot, match=SNAPSHOT):
        registered_checkpoint_step(st, f"{tmp_path}/run", tries=2)
    assert registered_checkpoint_step(st, f"{tmp_path}/none") is None


def test_lora_trains_adapters_and_saves_merged_weights(ray_local, tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file

    records, st = run_stages(_config(tmp_path, f"{tmp_path}/lora", "lora", tiny_model, max_steps=4,
                                     lora="{r: 4, alpha: 8}"))
    out = st.strip(records["sft"]["output"]["model"])
    files = {f["path"] for f in st.tree_manifest(out)["files"]}
    assert "model.safetensors" in files and not any("adapter" in f for f in files)  # merged: a plain checkpoint
    base = load_file(f"{tiny_model}/model.safetensors")
    tuned = load_file(f"{out}/model.safetensors")
    assert set(tuned) == set(base)
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    # LoRA touches the linear layers' weights only (merged in); embeddings and norms stay as they were
    assert changed and all("proj" in k for k in changed)
