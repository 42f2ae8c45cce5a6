"""scale: the streaming data plane at growing input sizes, with the driver's memory beside it.

Runs ``samples -> verify -> dedupe -> decontaminate`` (with ``prompts`` over a JSONL of the same
prompts beside them) over synthetic long rows at 1x, 4x and 16x a base size, each size in a
fresh child process that is the run's driver. ``samples`` is ``PregeneratedSamplesDouble``: a
stand-in for ``generate`` (which needs a teacher on GPUs at this size) that commits a samples
dataset written beforehand by another process, hard-linking its shards. Rows are R1-like: a
prompt, a gold answer and a long completion (``--row-bytes``, default 4 KiB) ending in a boxed
answer; 25% are wrong, 5% are exact duplicates after normalisation, 1% of prompts are copies of
eval items.

Prints one JSON line per size:
``{"benchmark": "scale", "size": "4x", "rows": ..., "input_gb": ... (Arrow bytes of the samples),
"parquet_gb": ..., "wall_s": ..., "rows_per_s": ..., "driver_peak_rss_gb": ...,
"run_peak_rss_gb": ... (driver + every Ray process, summed, sampled every 0.2 s),
"rows_in": ..., "rows_out": ..., "rows_dropped": ..., "ratio": driver peak at 1x / here}``;
``ratio`` is higher-is-better (1.0: the driver did not grow at all).

Usage::

    python benchmarks/scale.py                                  # 1x, 4x, 16x of 16k rows (4 GB at 16x)
    python benchmarks/scale.py --base-rows 2000 --sizes 1,4     # a quick look
    # larger than this machine's memory (31 GB of rows; ~30 GB free disk under --root):
    python benchmarks/scale.py --base-rows 1900000 --sizes 1 --root /big/disk/scale

Measured with that command on a 2-core, 24 GiB machine (2026-12-02, other work beside it):
1,900,000 rows of 16 KiB, 31.13 GB of input (9.27 GB of Parquet), wall 1,199 s (verify 733 s,
dedupe 338 s, decontaminate 108 s), 1,584 rows/s; driver peak RSS 0.762 GB, whole run 4.23 GB;
rows in 1,900,000 = rows out 106,970 + rows dropped 1,793,030 (the synthetic completions are
slices of one 4 MB text, so at this size most are near-duplicates of each other).

Needs ~3x the input's Parquet size free on disk under ``--root`` (default a temp folder).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import ClassVar

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import pyarrow as pa  # noqa: E402
from pydantic import BaseModel, ConfigDict  # noqa: E402

from pipeline.core.stage import Stage, StageContext  # noqa: E402

SAMPLES_SCHEMA = pa.schema([("prompt_id", pa.string()), ("sample_index", pa.int32()), ("prompt", pa.string()),
                            ("answer", pa.string()), ("source", pa.string()), ("completion", pa.string()),
                            ("finish_reason", pa.string()), ("error", pa.string())])
PER_PROMPT = 8


class SourceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str


class PregeneratedSamplesDouble(Stage):
    """A test double of ``generate`` for the benchmark: commits the samples dataset at ``path``
    (written beforehand) as its output, hard-linking the shards (copying off local disk)."""

    kind: ClassVar[str] = "pregenerated_samples"
    Params = SourceParams
    outputs: ClassVar[dict] = {"samples": "dataset"}
    output_columns: ClassVar[dict] = {"samples": SAMPLES_SCHEMA}

    def external_fingerprint(self) -> dict:
        return {"path": self.params.path, "mtime": os.path.getmtime(f"{self.params.path}/_manifest.json")}

    def run(self, ctx: StageContext) -> None:
        manifest = json.loads(Path(self.params.path, "_manifest.json").read_text())
        out = ctx.output_path("samples")
        os.makedirs(out, exist_ok=True)
        for s in manifest["shards"]:
            try:
                os.link(f"{self.params.path}/{s['path']}", f"{out}/{s['path']}")
            except OSError:
                shutil.copyfile(f"{self.params.path}/{s['path']}", f"{out}/{s['path']}")
        ctx.commit_shards("samples", manifest["shards"], SAMPLES_SCHEMA)


# -- data --------------------------------------------------------------------------------------

def write_samples(path: str, rows: int, row_bytes: int, eval_path: str, prompts_path: str, seed: int = 0) -> dict:
    """The synthetic samples as a committed dataset (in batches: bounded memory), the eval file and
    the prompts JSONL."""
    import random

    from pipeline.store.storage import Storage

    rng = random.Random(seed)
    vocab = [f"{w}{i}" for i in range(400) for w in ("so", "then", "step", "add", "carry", "check")]
    corpus = " ".join(rng.choice(vocab) for _ in range(4 * 2**20 // 6))  # ~4 MB of words to slice from
    st = Storage(str(Path(path).parent))
    w = st.dataset_writer(st.path(Path(path).name))
    prompts = max(1, rows // PER_PROMPT)
    evals = []
    with open(prompts_path, "w") as pf:
        for lo in range(0, prompts, 4096):
            batch = []
            for q in range(lo, min(prompts, lo + 4096)):
                a, b = rng.randint(10, 999), rng.randint(10, 999)
                prompt = f"Problem {q}: a shop sells {a} apples on Monday and {b} on Tuesday. How many in total?"
                if q % 100 == 7:
                    evals.append({"question": prompt})
                pf.write(json.dumps({"prompt": prompt, "answer": str(a + b)}) + "\n")
                for s in range(PER_PROMPT):
                    if len(batch) and rng.random() < 0.05:  # a duplicate after normalising
                        dup = dict(batch[-1], sample_index=s, completion="  " + batch[-1]["completion"].upper())
                        batch.append(dup)
                        continue
                    start = rng.randrange(0, len(corpus) - row_bytes)
                    ans = a + b if rng.random() > 0.25 else a + b + 1
                    text = f"<think> {corpus[start:start + row_bytes - 40]} </think> so \\boxed{{{ans}}}"
                    batch.append({"prompt_id": f"q{q:08d}", "sample_index": s, "prompt": prompt, "answer": str(a + b),
                                  "source": "synthetic", "completion": text, "finish_reason": "stop", "error": None})
            w.write(pa.Table.from_pylist(batch, schema=SAMPLES_SCHEMA))
    manifest = w.commit(SAMPLES_SCHEMA)
    with open(eval_path, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in evals or [{"question": "nothing matches this"}])
    return {"rows": manifest["rows"], "parquet_bytes": manifest["bytes"]}


# -- memory --------------------------------------------------------------------------------------

def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _ray_pids(driver: int) -> list[int]:
    """The driver and its descendants: the local Ray it started (GCS, raylet, workers, actors)."""
    from pipeline.ops.supervise import descendants

    return [driver, *descendants(driver)]


class Sampler(threading.Thread):
    """Peak RSS of the driver, and of the driver plus every Ray process, every 0.2 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.driver, self.whole, self.stop = pid, 0, 0, threading.Event()

    def run(self) -> None:  # noqa: D102
        while not self.stop.is_set():
            self.driver = max(self.driver, _rss(self.pid))
            self.whole = max(self.whole, sum(_rss(p) for p in _ray_pids(self.pid)))
            self.stop.wait(0.2)


# -- one size, in a child process -----------------------------------------------------------------

def child(root: str, samples: str, eval_path: str, prompts_path: str) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from pipeline.core.config import load_config
    from pipeline.core.runner import Runner

    cfg = Path(root) / "scale.yaml"
    cfg.write_text(f"""
name: scale
storage: {{root: {root}/store}}
ray: {{num_cpus: {os.cpu_count() or 2}}}
stages:
  prompts: {{params: {{path: {prompts_path}}}}}
  samples: {{uses: "scale:PregeneratedSamplesDouble", params: {{path: {samples}}}}}
  verify: {{inputs: {{samples: samples.samples}}, params: {{actors: {max(1, (os.cpu_count() or 2) // 2)}}}}}
  dedupe: {{inputs: {{samples: verify.verified}}}}
  decontaminate:
    inputs: {{samples: dedupe.sft}}
    params: {{eval_files: [{{path: {eval_path}, field: question}}]}}
""")
    t0 = time.time()
    result = Runner(load_config(str(cfg))).run()
    wall = time.time() - t0
    stages = {s["name"]: s for s in result.manifest["stages"]}
    if not result.ok:
        print(json.dumps({"error": result.error}), flush=True)
        sys.exit(1)
    dropped = sum(n for s in ("dedupe", "decontaminate") for by in stages[s]["dropped"].values() for n in by.values())
    print(json.dumps({"wall_s": round(wall, 1), "rows_in": stages["verify"]["rows"]["verified"],
                      "rows_out": stages["decontaminate"]["rows"]["clean"], "rows_dropped": dropped,
                      "stage_s": {k: v["seconds"] for k, v in stages.items()}}), flush=True)


def measure(root: Path, size: int, base_rows: int, row_bytes: int) -> dict:
    work = root / f"{size}x"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = base_rows * size
    data = subprocess.run([sys.executable, __file__, "--write", str(work / "samples"), str(rows), str(row_bytes),
                           str(work / "eval.jsonl"), str(work / "prompts.jsonl")],
                          check=True, capture_output=True, text=True)
    info = json.loads(data.stdout.strip().splitlines()[-1])
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(work), str(work / "samples"),
                             str(work / "eval.jsonl"), str(work / "prompts.jsonl")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    sampler.stop.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{size}x failed:\n{err[-3000:]}\n{out[-2000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    input_bytes = rows * row_bytes  # about: the completions dominate
    shutil.rmtree(work, ignore_errors=True)
    return {"benchmark": "scale", "size": f"{size}x", "rows": info["rows"], "input_gb": round(input_bytes / 1e9, 3),
            "parquet_gb": round(info["parquet_bytes"] / 1e9, 3), "wall_s": res["wall_s"],
            "rows_per_s": round(info["rows"] / res["wall_s"], 1),
            "driver_peak_rss_gb": round(sampler.driver / 1e9, 3), "run_peak_rss_gb": round(sampler.whole / 1e9, 3),
            "rows_in": res["rows_in"], "rows_out": res["rows_out"], "rows_dropped": res["rows_dropped"],
            "stage_s": res["stage_s"], "unit": "driver GB"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-rows", type=int, default=16_000)
    ap.add_argument("--sizes", default="1,4,16")
    ap.add_argument("--row-bytes", type=int, default=16_384)
    ap.add_argument("--root", default=None)
    args = ap.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="distill-scale-"))
    base = None
    for size in [int(s) for s in args.sizes.split(",")]:
        line = measure(root, size, args.base_rows, args.row_bytes)
        base = base or line["driver_peak_rss_gb"]
        line["ratio"] = round(base / line["driver_peak_rss_gb"], 3) if line["driver_peak_rss_gb"] else None
        line["baseline"], line["ours"] = base, line["driver_peak_rss_gb"]
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--write":
        print(json.dumps(write_samples(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])))
    elif len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
    else:
        main()
