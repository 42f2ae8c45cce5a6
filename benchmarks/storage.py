"""benchmarks `storage-local` and `storage-s3`: dataset shard-write throughput (MB/s of
Parquet written, manifest commit included) ÷ raw `pyarrow.parquet.write_table` with the
same codec (zstd) to the same filesystem, in one run, through pyarrow's own filesystems (a
local path; ``pyarrow.fs.S3FileSystem`` for S3: what a user's ``pq.write_table`` to S3 uses).
S3 is moto's server on 127.0.0.1 in another process (``python -m moto.server``), so the
server's work does not share this process's interpreter. ``s3fs_serial_mb_s``: the earlier
baseline (serial writes through s3fs), for reference.
After one warm-up write per side, each side runs ``BENCH_RUNS`` (default 3) times, interleaved;
the lines give the ratio of medians with its spread (``_common.emit_medians``).
The table is ``BENCH_STORAGE_ROWS`` rows (default 40,000) of trace-like completions of about
2 KB drawn from a 2,000-word vocabulary (so zstd compresses them as it does text: 77 MB to 31.5 MB), in
shards of an eighth of the rows: about 77 MB of text per write, enough that a few percent of
difference is larger than the run-to-run spread (the earlier 1.5 MB table took ~30 ms a write,
mostly fixed costs).
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

ROWS = int(os.environ.get("BENCH_STORAGE_ROWS", "40000"))
SHARD_ROWS = max(1, ROWS // 8)
WORDS_PER_ROW = 320


def table():
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(0)
    vocab = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9)))
                      for _ in range(2000)])
    words = vocab[rng.integers(0, len(vocab), size=(ROWS, WORDS_PER_ROW))]
    completions = [f"<think>{' '.join(w)}</think> \\boxed{{{i}}}" for i, w in enumerate(words)]
    return pa.table({
        "prompt_id": [f"{i:016x}" for i in range(ROWS)],
        "completion": completions,
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


def raw_arrow(fs, base: str, t) -> float:
    """``pq.write_table`` through a pyarrow filesystem (``base`` without a scheme)."""
    import pyarrow.parquet as pq

    folder = f"{base}/raw-{uuid.uuid4().hex}"
    fs.create_dir(folder, recursive=True)
    t0 = time.perf_counter()
    for i in range(0, ROWS, SHARD_ROWS):
        pq.write_table(t.slice(i, SHARD_ROWS), f"{folder}/part-{i}.parquet", filesystem=fs, compression="zstd")
    return time.perf_counter() - t0


def ours(st, t) -> tuple[float, int]:
    t0 = time.perf_counter()
    w = st.dataset_writer(st.path(f"ours-{uuid.uuid4().hex}"), rows_per_shard=SHARD_ROWS)
    w.write(t)
    m = w.commit()
    return time.perf_counter() - t0, m["bytes"]


def measure(name: str, root: str, arrow_fs, arrow_base: str) -> None:
    from pipeline.store.storage import Storage

    st = Storage(root)
    t = table()
    _, nbytes = ours(st, t)  # warm up every path once
    raw_arrow(arrow_fs, arrow_base, t)
    raw(st.fs, st.root, t)
    mb = nbytes / 2**20  # the same data on every side
    r = interleaved({"raw": lambda: mb / raw_arrow(arrow_fs, arrow_base, t), "ours": lambda: mb / ours(st, t)[0],
                     "fsspec": lambda: mb / raw(st.fs, st.root, t)}, alternate=True)
    emit_medians(name, r["ours"], r["raw"], "MB/s", rows=ROWS, shards=ROWS // SHARD_ROWS, codec="zstd",
                 mb=round(mb, 1), baseline_is=f"pq.write_table through pyarrow's {type(arrow_fs).__name__}",
                 fsspec_serial_mb_s=round(r["fsspec"]["median"], 2))


def main() -> None:
    import subprocess

    import pyarrow.fs as pafs

    with tempfile.TemporaryDirectory() as tmp:
        measure("storage-local", f"{tmp}/root", pafs.LocalFileSystem(), f"{tmp}/arrow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:  # the server answers on its port
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("moto server did not start")
                time.sleep(0.2)
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        s3 = pafs.S3FileSystem(access_key="bench", secret_key="bench", region="us-east-1", scheme="http",
                               endpoint_override=f"127.0.0.1:{port}")
        measure("storage-s3", "s3://bench/root", s3, "bench/arrow")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
