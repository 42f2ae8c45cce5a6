"""dpo: TRL's ``DPOTrainer`` on Ray Train, on preference pairs (``preference_pairs.pairs``).

Inputs: ``data`` (``prompt``, ``chosen``, ``rejected`` in TRL's conversational form: lists of
turns) and the starting model (``params.model`` or an input ``model``), usually the SFT
student; the frozen reference is a copy of it. Output ``model``, committed as ``sft`` commits
its model, with the same workers, checkpoints, resume after a lost worker or a killed driver,
progress and stage record (``stages.common.training``); the record adds the trainer's reward
curves (``curves``: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies`` per logging step).

``max_length`` has no default: TRL's 1,024 tokens silently cut reasoning traces, and it drops a
pair whose prompt alone fills it. Before any worker starts, the stage measures every pair
(prompt + chosen, prompt + rejected, as the template renders them) and records
``truncated_fraction``: the share of pairs that would be cut. Past ``max_truncated_fraction``
(default 0) it fails, naming the setting and the longest pair.

``beta``, ``loss_type`` and ``precompute_ref_log_probs`` go to TRL as they are. A template that
drops reasoning from assistant turns (DeepSeek-R1-distill's) gets the pairs rendered as text, as
``sft`` does (``stages.common.chat``).
"""
from __future__ import annotations

import os
from typing import Any, ClassVar

from pydantic import ConfigDict, Field

from pipeline.core import resources
from pipeline.core.stage import KEYED_WHEN_SET, NOT_OUTPUT, StageContext, StageError
from stages.common.chat import TextRenderer, template_rewrites_reasoning
from stages.common.train_recipe import recipe_start, trl_args, without_printer
from stages.common.training import TrainingStage, TrainParams, run_training

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


class Params(TrainParams):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, json_schema_extra=NOT_OUTPUT,
                              description="starting model folder or URI (or wire input 'model'); also the reference")
    max_length: int = Field(..., ge=8, description="prompt + completion tokens; required: TRL's default of 1,024 "
                                                   "silently cuts reasoning traces")
    max_truncated_fraction: float = Field(0.0, ge=0, le=1, json_schema_extra=NOT_OUTPUT,
                                          description="fail when more pairs than this would be cut by max_length")
    beta: float = Field(0.1, gt=0)
    loss_type: str | list[str] = "sigmoid"
    precompute_ref_log_probs: bool = False
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict, json_schema_extra=KEYED_WHEN_SET,
                                                 description="template variables, as generation used them "
                                                             "(e.g. {enable_thinking: true} for Qwen3)")
    learning_rate: float = Field(1e-6, gt=0)
    lr_scheduler: str = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1, description="global batch of pairs per optimizer step")
    gradient_checkpointing: bool = False
    # epochs, max_steps, grad_accum, seed, bf16: TrainParams; where and how it runs: TrainResources


def _text_pairs(tok, kwargs: dict | None = None):
    """The pairs as text for a template that drops reasoning; None when TRL can render them."""
    if not template_rewrites_reasoning(tok, kwargs):
        return None
    render = TextRenderer(tok, kwargs)

    def convert(batch: dict) -> dict:
        out: dict[str, list] = {c: [] for c in PAIR_COLUMNS}
        for prompt, chosen, rejected in zip(*(batch[c] for c in PAIR_COLUMNS)):
            text = render.prompt(prompt)
            out["prompt"].append(text)
            out["chosen"].append(render.completion(text, chosen[-1]["content"]))
            out["rejected"].append(render.completion(text, rejected[-1]["content"]))
        return out

    return convert


def pair_lengths(tok, batch: dict, kwargs: dict | None = None) -> list[int]:
    """Per pair, the longer of prompt + chosen and prompt + rejected in tokens, as rendered for
    training (EOS included)."""
    text = _text_pairs(tok, kwargs)
    eos = 1 if tok.eos_token_id is not None else 0
    if text is not None:
        t = text(batch)
        chosen = tok([p + c for p, c in zip(t["prompt"], t["chosen"])], add_special_tokens=True)["input_ids"]
        rejected = tok([p + r for p, r in zip(t["prompt"], t["rejected"])], add_special_tokens=True)["input_ids"]
        return [max(len(a), len(b)) + eos for a, b in zip(chosen, rejected)]
    texts = [tok.apply_chat_template(list(prompt) + list(turn), tokenize=False, **(kwargs or {}))
             for prompt, chosen, rejected in zip(*(batch[c] for c in PAIR_COLUMNS)) for turn in (chosen, rejected)]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return [max(len(ids[i]), len(ids[i + 1])) for i in range(0, len(ids), 2)]


def dpo_config(p: Params, output_dir: str):
    from trl import DPOConfig

    return DPOConfig(
        **trl_args(p, output_dir), weight_decay=p.weight_decay, max_length=p.max_length, beta=p.beta,
        loss_type=p.loss_type, precompute_ref_log_probs=p.precompute_ref_log_probs,
        gradient_checkpointing=p.gradient_checkpointing,
    )


def worker_trainer(model_dir: str, files: list[str], params: dict, work: str):
    """The recipe ``stages.common.training.train_loop`` calls on each worker."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer

    p, tok, cache = recipe_start(Params, model_dir, params, work)
    data = Dataset.from_parquet(files, columns=list(PAIR_COLUMNS), cache_dir=cache)
    text = _text_pairs(tok, p.chat_template_kwargs)
    if text is not None:
        data = data.map(text, batched=True, batch_size=1024, remove_columns=data.column_names,
                        cache_file_name=os.path.join(cache, "pairs-text.arrow"))
    elif p.chat_template_kwargs:  # TRL passes an example's own chat_template_kwargs to the template
        kw = dict(p.chat_template_kwargs)
        data = data.map(lambda b: {"chat_template_kwargs": [kw] * len(b["prompt"])}, batched=True,
                        cache_file_name=os.path.join(cache, "pairs-kwargs.arrow"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    return without_printer(DPOTrainer(model=model, args=dpo_config(p, work), train_dataset=data,
                                      processing_class=tok))


class DPO(TrainingStage):
    kind: ClassVar[str] = "dpo"
    Params = Params
    requires: ClassVar[tuple] = ("torch", "transformers", "trl", "ray.train")
    input_columns: ClassVar[dict] = {"data": {"prompt": "messages", "chosen": "messages", "rejected": "messages"}}

    def run(self, ctx: StageContext) -> None:
        p: Params = self.params
        truncation = self._measure(ctx, p)
        run_training(ctx, p, "stages.dpo:worker_trainer", metrics={"truncation": truncation})

    @staticmethod
    def _measure(ctx: StageContext, p: Params) -> dict:
        """Every pair's length as trained, batch by batch: the share max_length would cut."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resources.localize_model(ctx.model_uri("model", p.model)))
        pairs = cut = longest = 0
        for t in ctx.iter_input("data", columns=list(PAIR_COLUMNS), batch_rows=1024):
            lengths = pair_lengths(tok, t.to_pydict(), p.chat_template_kwargs)
            pairs += len(lengths)
            cut += sum(n > p.max_length for n in lengths)
            longest = max([longest, *lengths])
        if not pairs:
            raise StageError("no preference pairs to train on")
        fraction = cut / pairs
        figures = {"pairs": pairs, "truncated": cut, "truncated_fraction": round(fraction, 4),
                   "longest_tokens": longest, "max_length": p.max_length}
        if fraction > p.max_truncated_fraction:
            raise StageError(
                f"{cut}/{pairs} preference pairs ({fraction:.1%}) are longer than max_length {p.max_length} tokens "
                f"(prompt + chosen or rejected; the longest is {longest}): TRL would cut their reasoning, or drop "
                f"them. Raise params.max_length (to {longest} to keep every pair), or allow it with "
                f"params.max_truncated_fraction (now {p.max_truncated_fraction})")
        return figures
