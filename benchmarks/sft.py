"""benchmark `sft`: training tok/s of the sft stage ÷ a plain PyTorch loop, same model and batches.

The batches are the ones TRL's own data loader makes for the stage (same seed),
so every side processes identical tensors; tokens are non-padding tokens. The
plain loop is forward with labels, backward, AdamW step, on 2 threads.

- `sft`: the stage's TRL trainer (as the stage configures it, 1 process; `lm_head: auto`
  takes the model's own forward for this 384-token vocabulary) ÷ the plain loop.
- `sft-ray-train`: the whole stage through Ray Train with 1 worker ÷ the plain loop; the
  stage's own tokens/s (first to last optimizer step, as its stage record reports it).
  `ray_train_wall_s` gives the wall time of the stage, start-up of the worker group included.
- `sft-scaling`: the stage with 2 workers (1 CPU each) ÷ 1 worker (2 CPUs), equal global batch.
  No target on a 2-core machine: two DDP workers share the same two cores.
- `sft-fused-head`: the stage's trainer with `lm_head: fused` (TRL's chunked fused LM head,
  what `auto` picks for large vocabularies, which never materializes the logits) ÷ the plain loop.
- `sft-padding-free`, `sft-group-by-length`: the stage's trainer with that `batching` ÷ the
  plain loop on the same batches (the trainer's own, with that batching); ``vs_plain_padded``
  gives it ÷ the plain loop on padded batches: which batching is fastest here (the stage's
  default is `padded`).

Each side runs `RUNS` times, interleaved; lines carry the ratio of medians with min/max.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_model, emit_medians, interleaved, toy_rows  # noqa: E402

STEPS, BATCH, LR, RUNS = 30, 32, 1e-3, 3


def messages(rows):
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["solution"]}]}
            for r in rows]


def params(model: str, **kw):
    from stages.sft import Params

    return Params(model=model, max_steps=STEPS, batch_size=BATCH, learning_rate=LR, max_length=256,
                  checkpoint_every=10_000, **kw)


def trl_batches(model: str, rows: list[dict], batching: str = "padded"):
    """The batches the stage's trainer makes with that ``batching`` (padding-free ones carry
    ``position_ids`` and no padding), for the plain loop to train on the same batches."""
    from stages.sft import build_trainer

    trainer = build_trainer(model, rows, params(model, batching=batching), tempfile.mkdtemp())
    batches = []
    for b in trainer.get_train_dataloader():
        batches.append({k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "labels", "position_ids")})
        if len(batches) == STEPS:
            break
    return batches


def plain_loop(model_dir: str, batches) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    tokens = 0
    t0 = time.time()
    for b in batches:
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum()) if "attention_mask" in b else int(b["input_ids"].numel())
    return tokens / (time.time() - t0)


def stage_trainer(model: str, rows: list[dict], batching: str = "padded", lm_head: str = "auto") -> float:
    """The stage's own TRL trainer in this process: tokens over the time of ``train()``."""
    from stages.sft import build_trainer, count_tokens

    trainer = build_trainer(model, rows, params(model, batching=batching, lm_head=lm_head), tempfile.mkdtemp())
    tokens = count_tokens(trainer)
    t0 = time.time()
    trainer.train()
    return tokens["n"] / (time.time() - t0)


def ray_train(model: str, chat_path: str, st, workers: int, walls: list) -> float:
    """The sft stage through Ray Train (a fresh checkpoint folder, so nothing resumes)."""
    import uuid

    from pipeline.core.stage import Artifact, StageContext
    from stages.sft import SFT

    run = uuid.uuid4().hex[:8]
    stage = SFT("sft", params(model, num_workers=workers, num_cpus=2 / workers))
    ctx = StageContext(name="sft", kind="sft", fingerprint=f"bench{run}", run_id="bench", storage=st,
                       inputs={"data": Artifact("dataset", chat_path, st.uri(chat_path), "bench")},
                       output_root=st.path("out", run), checkpoint_root=st.path("ckpt", run),
                       output_types={"model": "model"})
    t0 = time.time()
    stage.run(ctx)
    walls.append(round(time.time() - t0, 1))
    return ctx.metrics["tokens_per_second"]


def main() -> None:
    import pyarrow as pa
    import ray
    import torch

    from pipeline.store.storage import Storage

    torch.set_num_threads(2)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_model(tmp / "model")
        rows = messages(toy_rows(STEPS * BATCH, seed=3))
        batches = trl_batches(model, rows)
        pf_batches = trl_batches(model, rows, "padding_free")
        gbl_batches = trl_batches(model, rows, "group_by_length")
        st = Storage(str(tmp / "root"))
        chat = st.path("chat")
        w = st.dataset_writer(chat)
        w.write(pa.Table.from_pylist(rows))
        w.commit()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        walls: dict[str, list] = {"1": [], "2": []}
        r = interleaved({
            "plain": lambda: plain_loop(model, batches),
            "trainer": lambda: stage_trainer(model, rows),
            "ray1": lambda: ray_train(model, chat, st, 1, walls["1"]),
            "ray2": lambda: ray_train(model, chat, st, 2, walls["2"]),
            "fused_head": lambda: stage_trainer(model, rows, lm_head="fused"),
            "padding_free": lambda: stage_trainer(model, rows, "padding_free"),
            "group_by_length": lambda: stage_trainer(model, rows, "group_by_length"),
            "plain_padding_free": lambda: plain_loop(model, pf_batches),
            "plain_group_by_length": lambda: plain_loop(model, gbl_batches),
        }, runs=RUNS)
        ray.shutdown()
        common = {"steps": STEPS, "batch_size": BATCH}
        emit_medians("sft", r["trainer"], r["plain"], "tok/s", **common)
        emit_medians("sft-ray-train", r["ray1"], r["plain"], "tok/s", ray_train_wall_s=walls["1"], **common)
        emit_medians("sft-scaling", r["ray2"], r["ray1"], "tok/s", ray_train_wall_s=walls["2"],
                     note="2 workers x 1 CPU vs 1 worker x 2 CPUs on a 2-core machine", **common)
        emit_medians("sft-fused-head", r["fused_head"], r["plain"], "tok/s",
                     note="lm_head: fused (TRL's chunked LM head) instead of the model's own forward", **common)
        # each batching mode against the plain loop on that mode's own batches
        emit_medians("sft-padding-free", r["padding_free"], r["plain_padding_free"], "tok/s",
                     baseline_is="the plain loop on the same padding-free batches",
                     vs_plain_padded=round(r["padding_free"]["median"] / r["plain"]["median"], 4), **common)
        emit_medians("sft-group-by-length", r["group_by_length"], r["plain_group_by_length"], "tok/s",
                     baseline_is="the plain loop on the same length-grouped batches",
                     vs_plain_padded=round(r["group_by_length"]["median"] / r["plain"]["median"], 4), **common)


if __name__ == "__main__":
    main()
