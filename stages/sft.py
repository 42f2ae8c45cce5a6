"""sft: fine-tune a student with TRL's ``SFTTrainer`` on chat rows; loss on assistant tokens only.

Inputs: ``data`` (a dataset with a ``messages`` column) and the starting model,
as ``params.model`` (a local folder or URI) or an input ``model``.
Output ``model``: the Hugging Face checkpoint (weights + tokenizer) in storage.

Each row becomes TRL's conversational prompt/completion form (all turns but the
last as the prompt, the final assistant turn as the completion), so TRL masks
the loss to the completion whatever the tokenizer's chat template is.

Training runs as one Ray task holding ``num_cpus`` (``num_gpus`` on a GPU
cluster). TRL's ``SFTConfig`` defaults are tuned for large models on GPUs
(batch 8, gradient checkpointing, bf16 autocast); on a small model on a CPU they
roughly halve throughput without saving memory that matters there, so gradient
checkpointing and bf16 are config fields that default off here and the batch
size is set by the config; ``benchmarks/sft.py`` measures both settings against
a plain PyTorch loop.
"""
from __future__ import annotations

import json
import os
import time
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from pipeline import resources
from pipeline.stage import Stage, StageContext, StageError

NO_FP = {"fingerprint": False}


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="starting model folder or URI (or wire input 'model')")
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="overrides epochs when > 0")
    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=8)
    seed: int = 0
    gradient_checkpointing: bool = False
    bf16: bool = False
    num_cpus: float = Field(2, gt=0, json_schema_extra=NO_FP)
    num_gpus: float = Field(0, ge=0, json_schema_extra=NO_FP)
    logging_steps: int = Field(25, ge=1, json_schema_extra=NO_FP)


def to_prompt_completion(messages: list[dict]) -> dict | None:
    """Split chat turns into TRL's conversational prompt/completion; None if the last turn isn't the assistant's."""
    if not messages or messages[-1].get("role") != "assistant" or len(messages) < 2:
        return None
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}


def sft_config(p: Params, output_dir: str):
    import torch
    from trl import SFTConfig

    return SFTConfig(
        output_dir=output_dir,
        num_train_epochs=p.epochs,
        max_steps=p.max_steps,
        learning_rate=p.learning_rate,
        lr_scheduler_type=p.lr_scheduler,
        warmup_steps=p.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        weight_decay=p.weight_decay,
        per_device_train_batch_size=p.batch_size,
        gradient_accumulation_steps=p.grad_accum,
        max_length=p.max_length,
        seed=p.seed,
        data_seed=p.seed,
        gradient_checkpointing=p.gradient_checkpointing,
        bf16=p.bf16,
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=p.logging_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        completion_only_loss=True,
    )


def build_trainer(model_dir: str, rows: list[dict], p: Params, output_dir: str):
    """The SFTTrainer for ``rows`` (dicts with ``messages``); rows that are not chat turns ending
    with the assistant raise."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    examples = []
    for i, r in enumerate(rows):
        ex = to_prompt_completion(r["messages"])
        if ex is None:
            raise StageError(f"row {i} of the training data does not end with an assistant turn")
        examples.append(ex)
    if not examples:
        raise StageError("no training rows")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    return SFTTrainer(model=model, args=sft_config(p, output_dir), train_dataset=Dataset.from_list(examples),
                      processing_class=tok)


def train_task(storage, data_path: str, model_uri: str, out_path: str, lineage: dict, params: dict) -> dict:
    """Runs on a Ray worker: train, then write the checkpoint to storage (manifest last)."""
    import tempfile

    import torch

    p = Params.model_validate(params)
    torch.manual_seed(p.seed)
    if p.num_gpus == 0:
        torch.set_num_threads(max(1, int(p.num_cpus)))
    model_dir = resources.localize_model(model_uri)
    rows = storage.read_dataset(data_path, columns=["messages"]).to_pylist()
    work = tempfile.mkdtemp(prefix="distill-sft-")
    trainer = build_trainer(model_dir, rows, p, work)

    tokens = {"n": 0}
    orig = trainer.training_step

    def counting_step(model, inputs, *a, **kw):
        mask = inputs.get("attention_mask")
        tokens["n"] += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        return orig(model, inputs, *a, **kw)

    trainer.training_step = counting_step
    t0 = time.time()
    result = trainer.train()
    seconds = time.time() - t0
    final = os.path.join(work, "final")
    trainer.save_model(final)
    trainer.processing_class.save_pretrained(final)
    storage.put_tree(final, out_path, lineage)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "train_seconds": round(seconds, 2),
        "train_tokens": tokens["n"],
        "tokens_per_second": round(tokens["n"] / seconds, 1) if seconds else 0.0,
        "steps": trainer.state.global_step,
        "train_loss": round(result.training_loss, 4),
        "final_loss": round(losses[-1], 4) if losses else None,
        "rows": len(rows),
    }


class SFT(Stage):
    kind: ClassVar[str] = "sft"
    version: ClassVar[str] = "1"
    Params = Params
    inputs: ClassVar[dict] = {"data": "dataset", "model": "model"}
    optional_inputs: ClassVar[frozenset] = frozenset({"model"})
    outputs: ClassVar[dict] = {"model": "model"}

    def check(self) -> list[tuple[str, str]]:
        return resources.model_params_problems(self.params, ("model",))

    def external_fingerprint(self) -> dict:
        return resources.model_params_fingerprint(self.params, ("model",))

    def run(self, ctx: StageContext) -> None:
        import ray

        p: Params = self.params
        model_uri = ctx.model_uri("model", p.model)
        data = ctx.inputs["data"]
        out_path = ctx.output_path("model")
        bar = ctx.progress("training", None)
        task = ray.remote(num_cpus=p.num_cpus, num_gpus=p.num_gpus)(train_task)
        metrics = ray.get(task.remote(ctx.storage, data.path, model_uri, out_path, ctx.lineage("model"),
                                      p.model_dump(mode="json")))
        bar.close()
        ctx.adopt("model", "model")
        ctx.metrics.update(metrics)
        ctx.log(json.dumps(metrics))
