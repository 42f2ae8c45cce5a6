"""Datasets in storage: sharded Parquet + a manifest written last, locally and on S3 (moto)."""
import json
import os
import uuid

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from pipeline.store.storage import AlreadyCommitted, Storage, StorageError, redact_uri


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    bucket = request.getfixturevalue("moto_s3_bucket")
    return Storage(f"s3://{bucket}/{uuid.uuid4().hex[:8]}")


def _table(n, start=0):
    return pa.table({"id": list(range(start, start + n)), "text": [f"row {i}" for i in range(start, start + n)]})


def test_sharded_dataset_roundtrip_and_readers(storage, monkeypatch):
    path = storage.path("ds")
    w = storage.dataset_writer(path, lineage={"run_id": "r1"}, rows_per_shard=40)
    w.write(_table(50))
    w.write(_table(50, 50))
    m = w.commit()
    assert m["rows"] == 100 and [s["rows"] for s in m["shards"]] == [40, 40, 20]
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    assert storage.read_dataset(path).column("id").to_pylist() == list(range(100))

    files = storage.dataset_files(path)
    fs = None if storage.is_local else storage.fs
    paths = files if storage.is_local else [storage.strip(f) for f in files]
    assert pads.dataset(paths, format="parquet", filesystem=fs).count_rows() == 100

    import datasets

    # a map-style load of s3:// files is a download, which datasets refuses in offline mode; a test
    # that set HF_HUB_OFFLINE before datasets was first imported in this process leaves it on
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    opts = None if storage.is_local else {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
    ds = datasets.load_dataset("parquet", data_files=files, split="train", storage_options=opts)
    assert len(ds) == 100 and ds[0]["text"] == "row 0"


def test_readers_trust_only_the_manifest(storage):
    path = storage.path("ds")
    w = storage.dataset_writer(path)
    w.write(_table(3))
    w.commit()
    storage.put_bytes(f"{path}/part-99999-stray.parquet", b"not even parquet")
    assert storage.read_dataset(path).num_rows == 3
    assert len(storage.dataset_files(path)) == 1


class WriterCrashed(Exception):
    """The crash of the test's own writer (no other error can match it)."""


def test_failed_writer_publishes_nothing(storage):
    """Shards already flushed and uploaded by a writer that then fails are in storage, but
    nothing is published: no manifest, no reader and no listing sees them."""
    from typer.testing import CliRunner

    from pipeline.cli.main import app

    path = storage.path("ds")
    w = storage.dataset_writer(path, rows_per_shard=2)
    with pytest.raises(WriterCrashed):
        w.write(_table(5))  # two shards flushed
        raise WriterCrashed("writer crashed before commit")
    w.close()  # the two shards handed to the upload thread are stored
    storage.fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in storage.fs.ls(path, detail=False))
    assert [n[:10] for n in names] == ["part-00000", "part-00001"] and all(n.endswith(".parquet") for n in names)
    assert not storage.exists(f"{path}/_manifest.json")
    with pytest.raises(StorageError, match="no committed dataset"):
        storage.read_dataset(path)
    with pytest.raises(StorageError, match="no committed dataset"):
        storage.dataset_files(path)
    listed = CliRunner().invoke(app, ["datasets", "ls", storage.root_uri, "--json"])
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.output) == []


def test_failed_shard_upload_fails_the_commit(storage, monkeypatch):
    """Shards upload on a background thread; an upload error surfaces at commit, which then
    publishes nothing."""
    real = storage.put_bytes

    def failing_put_bytes(path, data, exclusive=False):  # a test double: the second shard's upload fails
        if "part-00001" in path:
            raise OSError("injected upload failure")
        return real(path, data, exclusive)

    monkeypatch.setattr(storage, "put_bytes", failing_put_bytes)
    path = storage.path("ds")
    w = storage.dataset_writer(path, rows_per_shard=2)
    w.write(_table(6))
    with pytest.raises(OSError, match="injected upload failure"):
        w.commit()
    assert not storage.fs.exists(f"{path}/_manifest.json")
    with pytest.raises(StorageError, match="no committed dataset"):
        storage.read_dataset(path)


def test_concurrent_commit_has_one_winner(storage, monkeypatch):
    """Two writers of one path commit at the same moment, from two threads, both inside the
    manifest's conditional create together: exactly one wins and readers see only its rows."""
    import threading

    real_write_json = storage.write_json
    barrier = threading.Barrier(2, timeout=30)

    def write_json_after_barrier(path, obj, exclusive=False):  # a test double: both manifests go out together
        if path.endswith("/_manifest.json"):
            barrier.wait()
        return real_write_json(path, obj, exclusive)

    monkeypatch.setattr(storage, "write_json", write_json_after_barrier)
    for round_ in range(3):
        path = storage.path(f"ds{round_}")
        writers = {2: storage.dataset_writer(path), 3: storage.dataset_writer(path)}
        for rows, w in writers.items():
            w.write(_table(rows))
        outcome: dict = {}

        def commit(rows):
            try:
                writers[rows].commit()
                outcome[rows] = "won"
            except AlreadyCommitted:
                outcome[rows] = "lost"
            except Exception as e:  # anything else is a failure of the test
                outcome[rows] = repr(e)

        threads = [threading.Thread(target=commit, args=(rows,)) for rows in writers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(outcome.values()) == ["lost", "won"], outcome
        winner = next(rows for rows, o in outcome.items() if o == "won")
        storage.fs.invalidate_cache()
        assert storage.read_dataset(path).num_rows == winner
        assert storage.dataset_manifest(path)["rows"] == winner


def test_empty_dataset_keeps_schema(storage):
    path = storage.path("empty")
    schema = pa.schema([("prompt_id", pa.string()), ("n", pa.int32())])
    w = storage.dataset_writer(path)
    w.write(schema.empty_table())
    m = w.commit(schema)
    assert m["rows"] == 0
    t = storage.read_dataset(path)
    assert t.num_rows == 0 and t.schema == schema


def test_tree_artifact_roundtrip(storage, tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\0" * 1000)
    path = storage.path("model")
    storage.put_tree(src, path, {"run_id": "r"})
    local = storage.localize_tree(path, cache_dir=str(tmp_path / "cache"))
    assert open(os.path.join(local, "sub", "w.bin"), "rb").read() == b"\0" * 1000


def test_redact_uri():
    assert redact_uri("s3://KEY:SECRET@bucket/prefix") == "s3://bucket/prefix"
    assert redact_uri("/local/path") == "/local/path"


# -- a writer killed part-way (SIGKILL, so no cleanup code runs) ---------------------------

_KILLED_WRITER = r"""
import os, sys, time
import pyarrow as pa
from pipeline.store.storage import Storage

root, path, marker = sys.argv[1:4]
st = Storage(root)

# Test doubles (fake_hanging_*) for a slow disk or network: the parent SIGKILLs us while we wait in them.
if st.is_local:
    real_fsync = os.fsync
    def fake_hanging_fsync(fd):  # the shard's bytes are in the temp file; the rename has not happened
        real_fsync(fd)
        open(marker, "w").close()
        time.sleep(600)
    os.fsync = fake_hanging_fsync
else:
    import asyncio
    import s3fs
    real_call = s3fs.S3FileSystem._call_s3
    async def fake_hanging_call_s3(self, method, *args, **kwargs):
        if method == "upload_part" and kwargs.get("PartNumber", 1) > 1:
            open(marker, "w").close()
            await asyncio.sleep(600)  # part 1 goes up (parts run concurrently), part 2 never does
        return await real_call(self, method, *args, **kwargs)
    s3fs.S3FileSystem._call_s3 = fake_hanging_call_s3

w = st.dataset_writer(path, rows_per_shard=1000)
w.write(pa.table({"blob": [os.urandom(2**20) for _ in range(11)]}))  # one incompressible 11 MiB shard
w.commit()
"""


def test_killed_writer_leaves_nothing_visible(storage, tmp_path):
    """SIGKILL during a shard upload: no manifest, no shard object, readers and `datasets ls`
    see nothing; on S3 the upload stays pending until `datasets gc` aborts it, locally a
    ``.tmp-*`` file is left that readers ignore and gc deletes."""
    import json
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import boto3
    from typer.testing import CliRunner

    from pipeline.cli.main import app

    root = Path(__file__).resolve().parents[1]
    other = storage.path("cache", "prompts", "f1", "a1", "prompts")  # a committed stage output beside it
    w = storage.dataset_writer(other)
    w.write(_table(3))
    w.commit()
    storage.write_json(storage.path("cache", "prompts", "f1", "_stage.json"),
                       {"outputs": {"prompts": {"type": "dataset", "path": other, "uri": storage.uri(other)}}})
    path = storage.path("cache", "prompts", "f2", "a2", "prompts")
    marker = tmp_path / "hanging"
    env = {**os.environ, "PYTHONPATH": str(root), "DISTILL_S3_PART_SIZE": str(5 * 2**20)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, storage.root_uri, path, str(marker)], env=env, cwd=root)
    try:
        s3 = None if storage.is_local else boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        bucket, _, prefix = storage.root.partition("/")
        key = path[len(bucket) + 1:]
        deadline = time.time() + 60
        while True:  # wait until the writer hangs with (on S3) part 1 of its upload stored
            assert proc.poll() is None, "the writer exited before it was killed"
            assert time.time() < deadline, "the writer never reached the upload"
            if marker.exists():
                if storage.is_local:
                    break
                ups = s3.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
                if ups and s3.list_parts(Bucket=bucket, Key=ups[0]["Key"], UploadId=ups[0]["UploadId"]).get("Parts"):
                    break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    storage.fs.invalidate_cache()
    assert not storage.exists(f"{path}/_manifest.json")
    with pytest.raises(StorageError, match="no committed dataset"):
        storage.read_dataset(path)
    with pytest.raises(StorageError, match="no committed dataset"):
        storage.dataset_files(path)
    cli = CliRunner()
    listed = cli.invoke(app, ["datasets", "ls", storage.root_uri, "--json"])
    assert listed.exit_code == 0, listed.output
    assert [d["uri"] for d in json.loads(listed.output)] == [storage.uri(other)]
    shown = cli.invoke(app, ["datasets", "show", storage.uri(path)])
    assert shown.exit_code == 1 and ("no committed dataset" in shown.output or "nothing at" in shown.output)

    if storage.is_local:
        left = sorted(p.name for p in Path(path).iterdir())
        assert len(left) == 1 and left[0].startswith(".tmp-")  # the whole shard, never renamed into place
        assert (Path(path) / left[0]).stat().st_size > 10 * 2**20
        # even a reader that globs the folder (which ours never do) skips dot files
        assert pads.dataset(path, format="parquet").count_rows() == 0
    else:
        assert s3.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount", 0) == 0  # no shard object
        ups = s3.list_multipart_uploads(Bucket=bucket, Prefix=key)["Uploads"]
        assert len(ups) == 1 and ups[0]["Key"].startswith(key + "/part-00000-")
        assert [p["PartNumber"] for p in s3.list_parts(Bucket=bucket, Key=ups[0]["Key"], UploadId=ups[0]["UploadId"])["Parts"]] == [1]

    gc = cli.invoke(app, ["datasets", "gc", storage.root_uri, "--older-than-hours", "0", "--json"])
    assert gc.exit_code == 0, gc.output
    result = json.loads(gc.output)
    if storage.is_local:
        assert [f["path"].rsplit("/", 1)[-1] for f in result["files"]] == left
        assert list(Path(path).iterdir()) == []
    else:
        assert result["files"] == [] and [u["key"] for u in result["multipart_uploads"]] == [ups[0]["Key"]]
        assert s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []) == []
    assert storage.read_dataset(other).num_rows == 3  # the committed neighbour is untouched


def test_multipart_shard_commits_and_reads(moto_s3_bucket, monkeypatch):
    """A shard of 2 x part size or more goes up to S3 (moto) as a multipart upload, in parts of
    DISTILL_S3_PART_SIZE, and commits and reads back byte for byte. (S3 only: a local folder
    has no multipart uploads.)"""
    import boto3

    monkeypatch.setenv("DISTILL_S3_PART_SIZE", str(5 * 2**20))
    st = Storage(f"s3://{moto_s3_bucket}/{uuid.uuid4().hex[:8]}")
    blobs = [os.urandom(2**20) for _ in range(11)]
    path = st.path("big")
    w = st.dataset_writer(path)
    w.write(pa.table({"blob": blobs}))
    m = w.commit()
    assert m["rows"] == 11 and m["shards"][0]["bytes"] > 2 * st.part_size
    key = f"{path.split('/', 1)[1]}/{m['shards'][0]['path']}"
    head = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).head_object(Bucket=moto_s3_bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-3")  # a multipart object's ETag: md5-of-part-md5s "-" parts (5+5+1 MiB)
    assert st.read_dataset(path).column("blob").to_pylist() == blobs
