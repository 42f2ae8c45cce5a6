"""`distill datasets gc` removes only what no committed record references; --dry-run removes nothing."""
import json
import uuid

import pyarrow as pa
import pytest
from conftest import write_jsonl
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.core.config import load_config
from pipeline.core.runner import Runner
from pipeline.store.storage import Storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return f"s3://{request.getfixturevalue('moto_s3_bucket')}/{uuid.uuid4().hex[:8]}"


def _gc(root, *flags):
    result = CliRunner().invoke(app, ["datasets", "gc", root, "--older-than-hours", "0", "--json", *flags])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_gc(ray_local, root, tmp_path):
    src = write_jsonl(tmp_path / "src.jsonl", [{"prompt": f"q{i}", "answer": "1"} for i in range(5)])
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"name: gc\nstorage: {{root: {root}}}\nstages:\n  prompts: {{params: {{path: {src}}}}}\n")
    run = Runner(load_config(cfg)).run()
    assert run.ok
    st = Storage(root)
    prompts_path = st.strip(run.manifest["stages"][0]["output"]["prompts"])

    # garbage: a failed attempt's shard (no manifest), a stray shard beside a committed one
    failed = st.path("cache", "prompts", run.manifest["stages"][0]["fingerprint"], "deadbeef", "prompts")
    w = st.dataset_writer(failed, rows_per_shard=1)
    w.write(pa.table({"x": [1, 2]}))  # flushes two shards, never commits
    w.close()  # their uploads are done
    st.put_bytes(f"{prompts_path}/part-00042-stray.parquet", b"junk")
    uploads = []
    if not st.is_local:
        bucket, _, prefix = st.root.partition("/")
        up = st.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=f"{prefix}/cache/prompts/x/killed.parquet")
        st.fs.call_s3("upload_part", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 100)
        uploads.append(up["UploadId"])

    dry = _gc(root, "--dry-run")
    names = sorted(f["path"].rsplit("/", 1)[-1] for f in dry["files"])
    assert len(names) == 3 and "part-00042-stray.parquet" in names
    assert sum(n.startswith("part-0000") for n in names) == 2
    assert [u["upload_id"] for u in dry["multipart_uploads"]] == uploads
    assert len(_gc(root, "--dry-run")["files"]) == 3  # the dry run deleted nothing

    done = _gc(root)
    assert done["files"] == dry["files"] and not done["dry_run"]
    again = _gc(root)
    assert again["files"] == [] and again["multipart_uploads"] == []
    # committed data is untouched and a re-run is still fully cached
    assert st.read_dataset(prompts_path).num_rows == 5
    assert [s["status"] for s in Runner(load_config(cfg)).run().manifest["stages"]] == ["cached"]

    # young files are left alone by default
    w2 = st.dataset_writer(failed + "2", rows_per_shard=1)
    w2.write(pa.table({"x": [1]}))
    w2.close()
    result = CliRunner().invoke(app, ["datasets", "gc", root, "--json"])
    assert json.loads(result.output)["files"] == []


def test_gc_deletes_only_garbage_beside_live_checkpoints_and_attempts(ray_local, tmp_path):
    """A root with committed datasets, live generation checkpoints, an attempt in progress
    and true garbage: gc (paths from pipeline.store.layout, as the runner writes them) deletes the
    garbage and nothing else."""
    import os
    import time

    from pipeline.store import layout

    root = str(tmp_path / "root")
    src = write_jsonl(tmp_path / "src.jsonl", [{"prompt": f"q{i}", "answer": "1"} for i in range(5)])
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"name: gc\nstorage: {{root: {root}}}\nstages:\n  prompts: {{params: {{path: {src}}}}}\n")
    run = Runner(load_config(cfg)).run()
    assert run.ok
    st = Storage(root)
    prompts = run.manifest["stages"][0]
    committed = [st.strip(u) for u in prompts["output"].values()]

    def dataset(path, rows, commit=True):
        w = st.dataset_writer(path, rows_per_shard=1)
        w.write(pa.table({"x": list(range(rows))}))
        if commit:
            w.commit()
        else:
            w.close()  # shards uploaded, never committed (a killed or still running writer)

    ckpt = layout.checkpoint_root(st, "generate", "k0123456789abcdef012")
    for i in range(2):  # live checkpoints of an earlier (failed or finished) attempt
        dataset(f"{ckpt}/part-{i}", 2)
    # garbage: a failed attempt's shards, a killed checkpoint writer's shard, a stray shard
    # beside a committed dataset, a temporary file of a killed small write
    failed = layout.output_path(st, "prompts", prompts["fingerprint"], "deadbeef", "prompts")
    dataset(failed, 2, commit=False)
    dataset(f"{ckpt}/part-killed", 1, commit=False)
    st.put_bytes(f"{committed[0]}/part-00042-stray.parquet", b"junk")
    st.put_bytes(layout.stage_dir(st, "verify", "f" * 20) + "/.tmp-abc", b"{}")
    garbage = {p for p in st.fs.find(st.path("cache")) if "deadbeef" in p or "part-killed" in p
               or p.endswith(("-stray.parquet", ".tmp-abc"))}
    assert len(garbage) == 5

    old = time.time() - 3 * 24 * 3600
    for p in st.fs.find(root):
        os.utime(p, (old, old))  # everything so far is days old
    # work in flight now: an attempt writing its output, and its next checkpoint chunk
    running = layout.output_path(st, "generate", "a" * 20, "cafef00d", "samples")
    dataset(running, 2, commit=False)
    dataset(f"{ckpt}/part-running", 1, commit=False)

    everything = set(st.fs.find(root))
    result = CliRunner().invoke(app, ["datasets", "gc", root, "--older-than-hours", "24", "--json"])
    assert result.exit_code == 0, result.output
    done = json.loads(result.output)
    deleted = {st.strip(f["path"]) for f in done["files"]}
    assert deleted == garbage
    assert set(st.fs.find(root)) == everything - garbage
    # what is live still reads: committed outputs, checkpoints, the run; the stage stays cached
    assert [st.read_dataset(p).num_rows for p in committed] == [5, 0]
    assert [st.read_dataset(f"{ckpt}/part-{i}").num_rows for i in range(2)] == [2, 2]
    assert st.fs.find(layout.attempt_dir(st, "generate", "a" * 20, "cafef00d"))  # in progress, untouched
    assert st.read_json(layout.run_manifest(st, run.run_id))["status"] == "done"
    assert [s["status"] for s in Runner(load_config(cfg)).run().manifest["stages"]] == ["cached"]


def test_gc_keeps_training_checkpoints_until_the_stage_is_done(tmp_path):
    """A training run's checkpoints (Ray Train, under the stage's checkpoint root) are kept while
    the stage has no record, whatever their age: a rerun resumes from them. Once the stage is
    done they are garbage like any other unreferenced file."""
    from pipeline.store import layout
    from pipeline.store.gc import collect
    from pipeline.store.storage import STAGE_RECORD

    st = Storage(str(tmp_path / "root"))
    live = layout.checkpoint_root(st, "sft", "aaa") + "/train-aaa"
    done = layout.checkpoint_root(st, "sft", "bbb") + "/train-bbb"
    for run in (live, done):
        st.write_json(f"{run}/{layout.TRAIN_SNAPSHOT}", {"latest_checkpoint_result": None})
        st.put_bytes(f"{run}/checkpoint_00000025/checkpoint/model.safetensors", b"weights")
    st.write_json(f"{layout.stage_dir(st, 'sft', 'bbb')}/{STAGE_RECORD}", {"outputs": {}})
    doomed = {f["path"] for f in collect(st, older_than=0)["files"]}
    assert not any(p.startswith(live) for p in doomed)
    assert f"{done}/checkpoint_00000025/checkpoint/model.safetensors" in doomed
    assert f"{done}/{layout.TRAIN_SNAPSHOT}" in doomed
