"""sft: fine-tune a student with TRL's ``SFTTrainer`` on chat rows, on Ray Train; loss on assistant tokens only.

Inputs: ``data`` (a dataset with a ``messages`` column) and the starting model,
as ``params.model`` (a local folder or URI) or an input ``model``.
Output ``model``: the Hugging Face checkpoint (weights + tokenizer) in storage,
committed (manifest last) only once training has finished. Its lineage lists
the exact dataset manifests it trained on (URI, fingerprint, manifest sha256).

Each row becomes TRL's conversational prompt/completion form (all turns but the
last as the prompt, the final assistant turn as the completion), so TRL masks
the loss to the completion whatever the tokenizer's chat template is.

Distribution. A ``ray.train.torch.TorchTrainer`` runs ``num_workers`` workers
(each ``num_cpus`` / ``num_gpus`` / ``resources``); Ray Train sets up the process
group (gloo on CPU, NCCL on GPU) and TRL's trainer runs DDP on it. ``batch_size``
is the *global* batch per optimizer step, split over workers and ``grad_accum``,
so the same config trains the same model on 1 worker or 8 (``num_workers`` is not
part of the fingerprint).

Checkpoints. Every ``checkpoint_every`` optimizer steps (and at the end) each
worker reports its part of the Hugging Face checkpoint (weights, optimizer,
scheduler, RNG states, trainer state) through ``ray.train.report``; Ray Train
writes them under the stage's checkpoint folder in the project's storage (local
or S3, through fsspec), in a run named after the stage fingerprint. A worker
group restarted after a failure (``max_failures``), or a rerun of the stage after
the driver was killed, finds the last reported checkpoint through
``ray.train.get_checkpoint()`` and passes it to ``trainer.train(resume_from_checkpoint=...)``:
training continues at the checkpoint's step + 1, with the same data order.

Batching (``batching``): ``padded`` (each batch padded to its longest row),
``group_by_length`` (length-grouped batches: less padding, a different batch
order), ``padding_free`` (rows concatenated with position ids; correct with
sdpa/eager attention through a block-diagonal mask, fast with FlashAttention; TRL does
not truncate rows to ``max_length`` in this mode).
``benchmarks/sft.py`` measures them; on a CPU ``padded`` is the default (see README).

Progress: workers push step, loss and tokens to a small actor the driver polls,
so the terminal shows step/total, loss, tokens/s, ETA and the checkpoint training
resumed from. The stage record holds the loss curve, tokens/s and, on GPU, MFU.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.core.stage import KEYED_WHEN_SET, NOT_OUTPUT, StageContext, StageError
from pipeline.sizing import fit
from stages.common.chat import TextRenderer, template_rewrites_reasoning
from stages.common.train_recipe import without_printer
from stages.common.training import (  # noqa: F401 (the training names tests and benchmarks read from here)
    PEAK_FLOPS,
    SNAPSHOT,
    TrainingStage,
    TrainParams,
    TrainResources,
    TrainState,
    count_tokens,
    local_dataset_files,
    registered_checkpoint_step,
    run_training,
    state_actor_name,
)

NO_FP = NOT_OUTPUT  # the params marker "does not change output" (``pipeline.core.stage``)

# lm_head: auto takes the model's own forward when one micro-batch's float32 logits fit in this
FULL_LOGITS_BYTES = 256 * 2**20


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    merge: bool = Field(True, description="merge the adapters into the saved weights (a plain checkpoint vLLM loads)")


class Params(TrainParams):
    model_config = ConfigDict(extra="forbid")
    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1, description="global batch per optimizer step (all workers, all accumulation steps)")
    max_length: int = Field(1024, ge=8)
    gradient_checkpointing: bool = False
    batching: Literal["padded", "group_by_length", "padding_free"] = "padded"
    lm_head: Literal["auto", "fused", "full"] = Field(
        "auto", description="auto: full when a micro-batch's float32 logits (batch_size / grad_accum x "
        "max_length x vocabulary) take at most 256 MiB, fused otherwise (and with padding_free, whose rows are not "
        "truncated); fused: TRL's chunked LM head computes the loss without materializing the "
        "[batch, length, vocab] logits (what large vocabularies need); full: the model's own forward with labels, "
        "faster for small vocabularies (same loss value, other float rounding)")
    lora: LoraSpec | None = None
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict, json_schema_extra=KEYED_WHEN_SET,
                                                 description="template variables, as generation used them "
                                                             "(e.g. {enable_thinking: true} for Qwen3)")
    # model, epochs, max_steps, grad_accum, seed, bf16: TrainParams
    # where and how it runs (num_workers, num_cpus, ..., checkpoint_every): TrainResources

    def resolved_lm_head(self, vocab_size: int) -> str:
        """``lm_head`` with ``auto`` decided. The bound takes the whole global micro-batch (not the
        per-worker share), so the choice depends only on fingerprinted settings and the model."""
        if self.lm_head != "auto":
            return self.lm_head
        if self.batching == "padding_free":
            return "fused"
        micro = -(-self.batch_size // self.grad_accum)
        return "full" if micro * self.max_length * vocab_size * 4 <= FULL_LOGITS_BYTES else "fused"


def to_prompt_completion(messages: list[dict]) -> dict | None:
    """Split chat turns into TRL's conversational prompt/completion; None if the last turn isn't the assistant's."""
    if not messages or messages[-1].get("role") != "assistant" or len(messages) < 2:
        return None
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}


def rendered_prompt_completion(tok, kwargs: dict | None = None) -> Callable[[list[dict]], dict | None]:
    """Rows as text for a template that rewrites reasoning (``stages.common.chat``): the
    prompt rendered with the generation prompt, the completion the assistant turn as it is;
    TRL trains on the whole completion, think block included, then EOS."""
    render = TextRenderer(tok, kwargs)

    def convert(messages: list[dict]) -> dict | None:
        ex = to_prompt_completion(messages)
        if ex is None:
            return None
        prompt = render.prompt(ex["prompt"])
        return {"prompt": prompt, "completion": render.completion(prompt, ex["completion"][0]["content"])}

    return convert


def _converter(tokenizer_dir: str | None, kwargs: dict | None = None):
    """How chat rows become TRL examples for this model's template (with ``kwargs``, the
    template variables generation used): conversational by default, rendered text where the
    template would drop the trained reasoning."""
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        if template_rewrites_reasoning(tok, kwargs):
            return rendered_prompt_completion(tok, kwargs)
    if kwargs:  # TRL passes an example's own chat_template_kwargs to the template
        return lambda messages: (None if (ex := to_prompt_completion(messages)) is None
                                 else {**ex, "chat_template_kwargs": dict(kwargs)})
    return to_prompt_completion


def sft_config(p: Params, output_dir: str, save: bool = False):
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
        per_device_train_batch_size=p.per_device_batch(),
        gradient_accumulation_steps=p.grad_accum,
        # TRL does not truncate padding-free batches (without packing): rows keep their full length
        max_length=None if p.batching == "padding_free" else p.max_length,
        seed=p.seed,
        data_seed=p.seed,
        gradient_checkpointing=p.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if p.gradient_checkpointing else None,
        bf16=p.bf16,
        fp16=False,
        use_cpu=p.num_gpus == 0 or not torch.cuda.is_available(),
        logging_steps=p.logging_steps,
        save_strategy="steps" if save else "no",
        save_steps=p.checkpoint_every,
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        completion_only_loss=True,
        padding_free=p.batching == "padding_free",
        train_sampling_strategy="group_by_length" if p.batching == "group_by_length" else "random",
        ddp_find_unused_parameters=False,
    )


def training_dataset(files: list[str], cache_dir: str, tokenizer_dir: str | None = None,
                     template_kwargs: dict | None = None):
    """The training rows of a dataset's shards (local Parquet files, in order) as TRL's
    conversational prompt/completion, Arrow-backed and memory-mapped from ``datasets``' cache
    files under ``cache_dir``: a worker streams the shards through, never holding the rows as
    Python objects. A row that is not chat turns ending with the assistant raises. With
    ``tokenizer_dir`` whose template rewrites reasoning, rows are rendered as text instead
    (``rendered_prompt_completion``)."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    ds = Dataset.from_parquet(files, columns=["messages"], cache_dir=cache_dir)
    split = _converter(tokenizer_dir, template_kwargs)

    def convert(batch: dict, idx: list[int]) -> dict:
        out: dict[str, list] = {}
        for i, msgs in zip(idx, batch["messages"]):
            ex = split(msgs or [])
            if ex is None:
                raise StageError(f"row {i} of the training data does not end with an assistant turn")
            for k, v in ex.items():
                out.setdefault(k, []).append(v)
        return out

    return ds.map(convert, batched=True, batch_size=1024, with_indices=True, remove_columns=ds.column_names,
                  cache_file_name=os.path.join(cache_dir, "prompt-completion.arrow"))


def build_trainer(model_dir: str, rows, p: Params, output_dir: str, save: bool = False):
    """The SFTTrainer for ``rows``: a ``datasets.Dataset`` of prompt/completion
    (``training_dataset``), or dicts with ``messages``; rows that are not chat turns ending with
    the assistant raise."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if isinstance(rows, Dataset):
        train = rows
    else:
        examples = []
        split = _converter(model_dir, p.chat_template_kwargs)
        for i, r in enumerate(rows):
            ex = split(r["messages"])
            if ex is None:
                raise StageError(f"row {i} of the training data does not end with an assistant turn")
            examples.append(ex)
        train = Dataset.from_list(examples)
    if not len(train):
        raise StageError("no training rows")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    peft_config = None
    if p.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=p.lora.r, lora_alpha=p.lora.alpha, lora_dropout=p.lora.dropout,
                                 target_modules=p.lora.target_modules, task_type="CAUSAL_LM")
    trainer = trainer_class()(model=model, args=sft_config(p, output_dir, save),
                              train_dataset=train, processing_class=tok, peft_config=peft_config)
    trainer.lm_head = p.resolved_lm_head(model.get_output_embeddings().weight.shape[0])
    return without_printer(trainer)


@functools.cache
def trainer_class():
    """TRL's ``SFTTrainer``; with ``lm_head`` set to ``full`` on an instance, its
    training loss is taken from the model's own forward with labels, the loss a plain PyTorch
    loop computes (summed over completion tokens, divided by the batch's completion tokens
    across ranks, as TRL's), instead of TRL's chunked fused LM head, which also yields per-token
    entropy and top-1 hits on every step. Then ``entropy`` and ``mean_token_accuracy`` are
    computed from the logits on logging steps only (the logged value is that step's, not an
    average since the last log), and the token count is gathered across ranks there too.
    Evaluation, label smoothing, DFT and MoE auxiliary losses always keep TRL's own path."""
    import torch
    from transformers import Trainer
    from trl import SFTTrainer

    class StageSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if (getattr(self, "lm_head", "fused") != "full" or return_outputs or not self.model.training
                    or self.compute_loss_func is not None
                    or self.label_smoother is not None or self.args.loss_type != "nll" or self.aux_loss_enabled):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False
            loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            metrics, gather = self._metrics["train"], self.accelerator.gather_for_metrics
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:  # padding-free: one row of packed sequences
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            self._pending_tokens = getattr(self, "_pending_tokens", 0) + local.detach()
            if (self.state.global_step + 1) % max(1, int(self.args.logging_steps)) == 0:  # the step that is logged
                with torch.no_grad():  # every rank reaches here on the same steps: the gathers match
                    logits = outputs.logits[:, :-1].float()
                    labels = inputs["labels"][:, 1:]
                    mask = labels != -100
                    logp = torch.log_softmax(logits, dim=-1)
                    entropy = -(logp.exp() * logp).sum(-1)
                    n = gather(mask.sum()).sum()
                    ent = gather((entropy * mask).sum()).sum()
                    hit = gather(((logits.argmax(-1) == labels) & mask).sum()).sum()
                    metrics["entropy"].append((ent / n).item() if n > 0 else 0.0)
                    metrics["mean_token_accuracy"].append((hit / n).item() if n > 0 else 0.0)
                    self._total_train_tokens += gather(self._pending_tokens).sum().item() // self._tp_size
                    self._pending_tokens = 0
                    metrics["num_tokens"] = [self._total_train_tokens]
            return loss

    return StageSFTTrainer


def worker_trainer(model_dir: str, files: list[str], params: dict, work: str):
    """The recipe ``stages.common.training.train_loop`` calls on each worker: the SFTTrainer
    over the dataset's local shards."""
    p = Params.model_validate(params)
    trainer = build_trainer(model_dir, training_dataset(files, os.path.join(work, "datasets-cache"), model_dir,
                                                        p.chat_template_kwargs), p, work, save=True)
    trainer.merge_adapters = p.lora is not None and p.lora.merge
    trainer.stage_metrics = {"lm_head": trainer.lm_head}
    return trainer


class SFT(TrainingStage):
    kind: ClassVar[str] = "sft"
    version: ClassVar[str] = "2"  # keyed by this version, bumped by hand, not by a hash of the code
    Params = Params
    requires: ClassVar[tuple] = ("torch", "transformers", "trl", "peft", "ray.train")
    input_columns: ClassVar[dict] = {"data": {"messages": "messages"}}

    def more_problems(self) -> list[tuple[str, str]]:
        return fit.training_problems(self.params.model, self.params)

    def run(self, ctx: StageContext) -> None:
        run_training(ctx, self.params, "stages.sft:worker_trainer")
