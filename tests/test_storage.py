"""Datasets in storage: sharded Parquet + a manifest written last, locally and on S3 (moto)."""
import os
import uuid

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from pipeline.storage import AlreadyCommitted, Storage, StorageError, redact_uri


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    bucket = request.getfixturevalue("s3_bucket")
    return Storage(f"s3://{bucket}/{uuid.uuid4().hex[:8]}")


def _table(n, start=0):
    return pa.table({"id": list(range(start, start + n)), "text": [f"row {i}" for i in range(start, start + n)]})


def test_sharded_dataset_roundtrip_and_readers(storage):
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


def test_failed_writer_publishes_nothing(storage):
    path = storage.path("ds")
    w = storage.dataset_writer(path, rows_per_shard=2)
    with pytest.raises(RuntimeError):
        w.write(_table(5))  # two shards flushed
        raise RuntimeError("writer crashed before commit")
    with pytest.raises(StorageError, match="no committed dataset"):
        storage.read_dataset(path)


def test_concurrent_commit_has_one_winner(storage):
    path = storage.path("ds")
    a, b = storage.dataset_writer(path), storage.dataset_writer(path)
    a.write(_table(2))
    b.write(_table(3))
    a.commit()
    with pytest.raises(AlreadyCommitted):
        b.commit()
    assert storage.read_dataset(path).num_rows == 2


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
