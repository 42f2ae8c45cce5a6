"""generate's output assembled from its checkpoints a slice at a time (bounded memory): the rows,
their order and the figures are those of one in-memory pass over every checkpoint."""
import random

import pyarrow as pa
import pytest

import stages.generate as gen
from pipeline.core.stage import StageContext
from pipeline.store.storage import Storage


def _sample(pid: str, i: int, rng: random.Random, tag: str) -> dict:
    err = "prompt_too_long: 900 > 512" if rng.random() < 0.1 else None
    return {"prompt_id": pid, "sample_index": i, "prompt": f"p {pid}", "answer": "1", "source": "s",
            "completion": None if err else f"{tag} {pid}/{i} " + "x" * rng.randint(0, 40),
            "prompt_tokens": 3, "completion_tokens": 0 if err else rng.randint(1, 50),
            "finish_reason": None if err else "stop", "error": err, "thinking_tokens": rng.randint(0, 9),
            "waits": rng.randint(0, 2), "forced_answer": rng.random() < 0.3}


def _reference(checkpoints: list[list[dict]], order: dict[str, int]) -> list[dict]:
    """The old assembly, in Python: the first committed row of each key (checkpoint listing
    order, then row) of this input's prompts, sorted by input order, then sample index."""
    first: dict = {}
    for rows in checkpoints:
        for r in rows:
            if r["prompt_id"] in order:
                first.setdefault((r["prompt_id"], r["sample_index"]), r)
    return sorted(first.values(), key=lambda r: (order[r["prompt_id"]], r["sample_index"]))


@pytest.mark.parametrize("gather_rows,open_checkpoints", [(7, 2), (8192, 8)])
def test_output_is_gathered_from_checkpoints_in_input_order(tmp_path, monkeypatch, gather_rows, open_checkpoints):
    monkeypatch.setattr(gen, "GATHER_ROWS", gather_rows)  # many slices, and checkpoints evicted and read again
    monkeypatch.setattr(gen, "OPEN_CHECKPOINTS", open_checkpoints)
    rng = random.Random(0)
    n = 3
    prompts = [f"q{i:03d}" for i in range(60)]
    order = {pid: i for i, pid in enumerate(rng.sample(prompts, 50))}  # input order is not id order; 10 left out
    st = Storage(str(tmp_path))
    ctx = StageContext(name="generate", kind="generate", fingerprint="f", run_id="r", storage=st, inputs={},
                       output_root=st.path("out"), output_types=dict(gen.Generate.outputs),
                       checkpoint_root=st.path("ckpt"))
    # batches of finished prompts, out of input order; a resumed run committed some keys twice
    # (with other text) and prompts of another input sit in the checkpoints too
    batches = [prompts[i:i + 7] for i in range(0, 60, 7)]
    rng.shuffle(batches)
    batches.append(rng.sample(prompts, 9))
    for b, pids in enumerate(batches):
        rows = [_sample(pid, i, rng, f"b{b}") for pid in pids for i in rng.sample(range(n), n)]
        w = ctx.checkpoint_writer(f"part-{rng.getrandbits(48):012x}")
        w.write(pa.Table.from_pylist(rows, schema=gen.SAMPLES_SCHEMA))
        w.commit(gen.SAMPLES_SCHEMA)
    written = [st.read_dataset(p).to_pylist() for p in ctx.committed_checkpoints()]
    assert sum(map(len, written)) > len(order) * n  # duplicates and other prompts to leave out

    stage = gen.Generate("generate", gen.Params(model="unused", sampling={"n": n, "max_tokens": 64},
                                                 max_error_rate=1.0))
    stage._write(ctx, order, {}, generated=0, resumed=0)
    out = st.read_dataset(ctx.output_path("samples"))
    want = _reference(written, order)
    assert out.to_pylist() == want
    assert out.schema.equals(gen.SAMPLES_SCHEMA)
    m = ctx.metrics
    assert m["samples"] == len(want) == len(order) * n
    assert m["completion_tokens"] == sum(r["completion_tokens"] for r in want)
    assert m["errored_samples"] == sum(r["error"] is not None for r in want) > 0
    stats = {r["prompt_id"]: r for r in st.read_dataset(ctx.output_path("prompt_stats")).to_pylist()}
    assert list(stats) == list(order)
    for pid in order:
        mine = [r for r in want if r["prompt_id"] == pid]
        assert stats[pid]["samples"] == n and stats[pid]["completion_tokens"] == sum(r["completion_tokens"] for r in mine)


def test_missing_samples_fail_before_anything_is_written(tmp_path):
    st = Storage(str(tmp_path))
    ctx = StageContext(name="generate", kind="generate", fingerprint="f", run_id="r", storage=st, inputs={},
                       output_root=st.path("out"), output_types=dict(gen.Generate.outputs),
                       checkpoint_root=st.path("ckpt"))
    rng = random.Random(1)
    w = ctx.checkpoint_writer("part-a")
    w.write(pa.Table.from_pylist([_sample("a", 0, rng, "t")], schema=gen.SAMPLES_SCHEMA))
    w.commit(gen.SAMPLES_SCHEMA)
    stage = gen.Generate("generate", gen.Params(model="unused", sampling={"n": 2, "max_tokens": 64}))
    with pytest.raises(gen.StageError, match="expected 4 samples, assembled 1"):
        stage._write(ctx, {"a": 0, "b": 1}, {}, generated=0, resumed=0)
    assert not st.exists(f"{ctx.output_path('samples')}/_manifest.json")
