"""benchmark `sft`: sft-stage training tok/s ÷ a plain PyTorch loop, same model and batches.

The batches are the ones TRL's own data loader makes for the stage (same seed),
so both sides process identical tensors; tokens are non-padding tokens. The
plain loop is forward with labels, backward, AdamW step. The stage runs through
the DAG runner on Ray. `sft-trl-stock` measures a stock `SFTTrainer` (every
`SFTConfig` default but `use_cpu`: batch 8, gradient checkpointing, bf16
autocast): where the slowdown seen with default settings comes from.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_model, emit, toy_rows  # noqa: E402

STEPS, BATCH, LR = 60, 32, 1e-3


def messages(rows):
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["solution"]}]}
            for r in rows]


def trl_batches(model: str, rows: list[dict]):
    from stages.sft import Params, build_trainer

    p = Params(model=model, max_steps=STEPS, batch_size=BATCH, learning_rate=LR, max_length=256)
    trainer = build_trainer(model, rows, p, tempfile.mkdtemp())
    batches = []
    for b in trainer.get_train_dataloader():
        batches.append({k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "labels")})
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
        tokens += int(b["attention_mask"].sum())
    return tokens / (time.time() - t0)


def trl_stock(model: str, rows: list[dict]) -> float:
    """A stock ``SFTTrainer``: every SFTConfig default (batch 8, gradient checkpointing, bf16)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from stages.sft import to_prompt_completion

    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=STEPS // 2, report_to="none", save_strategy="no", use_cpu=True,
                     disable_tqdm=True)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model), args=args,
                         train_dataset=Dataset.from_list([to_prompt_completion(r["messages"]) for r in rows]),
                         processing_class=AutoTokenizer.from_pretrained(model))
    tokens = {"n": 0}
    orig = trainer.training_step

    def step(m, inputs, *a, **kw):
        tokens["n"] += int(inputs["attention_mask"].sum())
        return orig(m, inputs, *a, **kw)

    trainer.training_step = step
    t0 = time.time()
    trainer.train()
    return tokens["n"] / (time.time() - t0)


def main() -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_model(tmp / "model")
        rows = messages(toy_rows(STEPS * BATCH, seed=3))
        batches = trl_batches(model, rows)
        baseline = plain_loop(model, batches)
        ours = run_stage(model, rows, tmp)
        emit("sft", ours["tokens_per_second"], baseline, "tok/s", steps=ours["steps"], batch_size=BATCH)
        emit("sft-trl-stock", trl_stock(model, rows), baseline, "tok/s",
             note="SFTTrainer with every SFTConfig default: batch 8, gradient checkpointing, bf16")


def run_stage(model: str, rows: list[dict], tmp: Path) -> dict:
    """The sft stage on Ray, given a committed chat dataset as its input."""
    import pyarrow as pa
    import ray

    from pipeline.stage import Artifact, StageContext
    from pipeline.storage import Storage
    from stages.sft import SFT, Params

    st = Storage(str(tmp / "root"))
    path = st.path("chat")
    w = st.dataset_writer(path)
    w.write(pa.Table.from_pylist(rows))
    w.commit()
    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    stage = SFT("sft", Params(model=model, max_steps=STEPS, batch_size=BATCH, learning_rate=LR, max_length=256))
    ctx = StageContext(name="sft", kind="sft", fingerprint="bench", run_id="bench", storage=st,
                       inputs={"data": Artifact("dataset", path, st.uri(path), "bench")},
                       output_root=st.path("out"), output_types={"model": "model"})
    stage.run(ctx)
    return ctx.metrics


if __name__ == "__main__":
    main()
