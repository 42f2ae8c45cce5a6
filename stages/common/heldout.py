"""The held-out set must never overlap what a model trained on: checks shared by the stages
that score models (evaluate, hard_prompts)."""
from __future__ import annotations

import pyarrow as pa

from pipeline.stage import StageError
from stages.common.ngrams import row_text, shared_ngrams


def training_prompts(train: pa.Table) -> list[str]:
    """The distinct prompts of the training rows: ``prompt``, else the user turns of ``messages``."""
    if "prompt" in train.column_names:
        texts = train.column("prompt").to_pylist()
    elif "messages" in train.column_names:
        texts = [row_text({"messages": m}, "user", "prompt") for m in train.column("messages").to_pylist()]
    else:
        raise StageError(f"input 'train' has neither a 'prompt' nor a 'messages' column (has {train.column_names}); "
                         "cannot check the held-out prompts for overlap")
    return list(dict.fromkeys(t for t in texts if t))


def refuse_overlap(prompts: list[dict], train: pa.Table, n: int) -> None:
    """StageError if a held-out prompt (``prompt_id``, ``prompt``) shares a ``prompt_id`` or a
    word ``n``-gram with the training rows."""
    train_ids = set(train.column("prompt_id").to_pylist())
    leaked = sorted({r["prompt_id"] for r in prompts} & train_ids)
    if leaked:
        raise StageError(
            f"held-out prompts overlap the training data: {len(leaked)} shared prompt_id(s), "
            f"e.g. {', '.join(leaked[:5])}; refusing to score"
        )
    hits = shared_ngrams([r["prompt"] or "" for r in prompts], training_prompts(train), n)
    if hits:
        first = min(hits)
        ex = prompts[first]
        raise StageError(
            f"held-out prompts overlap the training data: {len(hits)} of {len(prompts)} eval prompt(s) share a "
            f"{n}-gram with a training prompt, e.g. eval prompt {ex['prompt_id']} {ex['prompt'][:200]!r} shares "
            f"{hits[first]!r}; refusing to score (decontaminate the training data against this eval set)"
        )
