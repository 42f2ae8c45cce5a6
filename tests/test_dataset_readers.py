"""A committed dataset reads the same in `datasets`, `pyarrow.dataset` and `polars`, local and on
S3 (moto), when each is given the shard list of the manifest (`Storage.dataset_files`).

A stray but valid Parquet file sits in the dataset folder (as a killed writer's flushed shard
would): readers handed the manifest's list never see it; a folder glob would.
"""
import os
import uuid

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.store.storage import Storage

ROWS = 23


@pytest.fixture(params=["local", "s3"])
def committed(request, tmp_path):
    """(storage, dataset path, manifest) of a 4-shard dataset with a stray shard beside it."""
    if request.param == "local":
        st = Storage(str(tmp_path / "root"))
    else:
        st = Storage(f"s3://{request.getfixturevalue('moto_s3_bucket')}/{uuid.uuid4().hex[:8]}")
    path = st.path("cache", "verify", "fp", "att", "verified")
    w = st.dataset_writer(path, {"stage": "verify", "output": "verified"}, rows_per_shard=6)
    for start in range(0, ROWS, 5):
        n = min(5, ROWS - start)
        w.write(pa.table({"id": list(range(start, start + n)), "text": [f"row {i} é ✓" for i in range(start, start + n)],
                          "completion_tokens": pa.array([i * 3 for i in range(start, start + n)], pa.int32())}))
    manifest = w.commit()
    stray = pa.table({"id": [1000, 1001], "text": ["stray", "stray"], "completion_tokens": pa.array([0, 0], pa.int32())})
    with st.fs.open(f"{path}/part-00004-deadbeef.parquet", "wb") as f:
        pq.write_table(stray, f)
    return st, path, manifest


def _ids(values) -> list[int]:
    return sorted(int(v) for v in values)


def test_every_reader_sees_exactly_the_manifest_rows(committed, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants
    import polars as pl

    st, path, manifest = committed
    assert manifest["rows"] == ROWS and len(manifest["shards"]) == 4
    urls = st.dataset_files(path)
    assert [u.rsplit("/", 1)[-1] for u in urls] == [s["path"] for s in manifest["shards"]]
    assert all(u.startswith("s3://") for u in urls) != st.is_local
    want = list(range(ROWS))

    # pyarrow.dataset: full URIs stripped to the filesystem's paths
    paths = urls if st.is_local else [st.strip(u) for u in urls]
    ds = pads.dataset(paths, format="parquet", filesystem=None if st.is_local else st.fs)
    assert ds.count_rows() == ROWS and _ids(ds.to_table(columns=["id"]).column("id").to_pylist()) == want

    # datasets: the hub is never asked; offline mode allows local files, and S3 files when streamed
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    hf_opts = None if st.is_local else {"client_kwargs": {"endpoint_url": endpoint}}
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    streamed = datasets.load_dataset("parquet", data_files=urls, split="train", streaming=True,
                                     storage_options=hf_opts)
    assert _ids(r["id"] for r in streamed) == want
    if not st.is_local:  # a map-style (downloaded) load of s3:// files needs offline mode off
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    loaded = datasets.load_dataset("parquet", data_files=urls, split="train", storage_options=hf_opts,
                                   cache_dir=str(tmp_path / "hf-cache"))
    assert len(loaded) == ROWS and _ids(loaded["id"]) == want
    assert loaded.features["completion_tokens"].dtype == "int32" and "row 0 é ✓" in loaded["text"]

    # polars: object_store keys; credentials come from the standard AWS environment
    pl_opts = None if st.is_local else {"aws_endpoint_url": endpoint, "aws_region": "us-east-1", "aws_allow_http": "true"}
    lazy = pl.scan_parquet(urls, storage_options=pl_opts)
    assert lazy.select(pl.len()).collect().item() == ROWS
    assert _ids(lazy.select("id").collect()["id"].to_list()) == want

    # our own reader agrees, and a folder glob would have read the stray shard too
    assert st.read_dataset(path, columns=["id"]).num_rows == ROWS
    assert pads.dataset(path, format="parquet", filesystem=st.fs).count_rows() == ROWS + 2
