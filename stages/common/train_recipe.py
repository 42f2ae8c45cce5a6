"""What the training stages' recipes (``worker_trainer``, run by ``stages.common.training.train_loop``
on each Ray Train worker) share: their start and end, and the TRL config arguments of ``dpo`` and
``grpo``. ``p`` is a stage's params (``stages.common.training.TrainParams`` and its own fields)."""
from __future__ import annotations

import os


def recipe_start(params_cls, model_dir: str, params: dict, work: str):
    """A recipe's start on a worker: progress bars off, then (params, tokenizer, datasets cache folder)."""
    from datasets.utils.logging import disable_progress_bar
    from transformers import AutoTokenizer

    disable_progress_bar()
    p = params_cls.model_validate(params)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return p, tok, os.path.join(work, "datasets-cache")


def without_printer(trainer):
    """``trainer`` without transformers' ``PrinterCallback`` (it prints each log dict; the stage draws progress)."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def trl_args(p, output_dir: str) -> dict:
    """The TRL config arguments ``dpo`` and ``grpo`` share: schedule, batch, seeds, precision, logging, saves."""
    import torch

    return {
        "output_dir": output_dir, "num_train_epochs": p.epochs, "max_steps": p.max_steps,
        "learning_rate": p.learning_rate, "lr_scheduler_type": p.lr_scheduler, "warmup_steps": p.warmup_ratio,
        "per_device_train_batch_size": p.per_device_batch(), "gradient_accumulation_steps": p.grad_accum,
        "seed": p.seed, "data_seed": p.seed, "bf16": p.bf16, "fp16": False,
        "use_cpu": p.num_gpus == 0 or not torch.cuda.is_available(), "logging_steps": p.logging_steps,
        "save_strategy": "steps", "save_steps": p.checkpoint_every, "save_total_limit": 1, "report_to": "none",
        "disable_tqdm": True, "dataloader_num_workers": 0,
    }
