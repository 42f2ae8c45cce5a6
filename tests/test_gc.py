"""`distill datasets gc` removes only what no committed record references; --dry-run removes nothing."""
import json
import uuid

import pyarrow as pa
import pytest
from conftest import write_jsonl
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.runner import Runner
from pipeline.storage import Storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return f"s3://{request.getfixturevalue('s3_bucket')}/{uuid.uuid4().hex[:8]}"


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
