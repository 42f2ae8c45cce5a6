"""benchmarks `storage-local` and `storage-s3`: dataset shard-write throughput (MB/s of
Parquet written, manifest commit included) ÷ raw `pyarrow.parquet.write_table` with the
same codec (zstd) to the same filesystem, in one run. S3 is moto's server on 127.0.0.1.
After one warm-up write per side, each side runs ``BENCH_RUNS`` (default 3) times, interleaved;
the lines give the ratio of medians with its spread (``_common.emit_medians``).
"""
from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_medians, interleaved  # noqa: E402

ROWS, SHARD_ROWS = 200_000, 50_000


def table():
    import pyarrow as pa

    return pa.table({
        "prompt_id": [f"{i:016x}" for i in range(ROWS)],
        "completion": [f"<think>step {i} of the reasoning, with some words</think> \\boxed{{{i}}}" for i in range(ROWS)],
        "completion_tokens": list(range(ROWS)),
    })


def raw(fs, base: str, t) -> float:
    import pyarrow.parquet as pq

    folder = f"{base}/raw-{uuid.uuid4().hex}"
    fs.makedirs(folder, exist_ok=True)
    t0 = time.perf_counter()
    for i in range(0, ROWS, SHARD_ROWS):
        with fs.open(f"{folder}/part-{i}.parquet", "wb") as f:
            pq.write_table(t.slice(i, SHARD_ROWS), f, compression="zstd")
    return time.perf_counter() - t0


def ours(st, t) -> tuple[float, int]:
    t0 = time.perf_counter()
    w = st.dataset_writer(st.path(f"ours-{uuid.uuid4().hex}"), rows_per_shard=SHARD_ROWS)
    w.write(t)
    m = w.commit()
    return time.perf_counter() - t0, m["bytes"]


def measure(name: str, root: str) -> None:
    from pipeline.storage import Storage

    st = Storage(root)
    t = table()
    _, nbytes = ours(st, t)  # warm up both paths once
    raw(st.fs, st.root, t)
    mb = nbytes / 2**20  # the same data on both sides
    r = interleaved({"raw": lambda: mb / raw(st.fs, st.root, t), "ours": lambda: mb / ours(st, t)[0]},
                    alternate=True)
    emit_medians(name, r["ours"], r["raw"], "MB/s", rows=ROWS, shards=ROWS // SHARD_ROWS, codec="zstd",
                 mb=round(mb, 1))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        measure("storage-local", f"{tmp}/root")
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        measure("storage-s3", "s3://bench/root")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
