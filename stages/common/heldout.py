"""The held-out set must never overlap what a model trained on: checks shared by the stages
that score models (evaluate, hard_prompts)."""
from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

from pipeline.core.stage import StageError
from stages.common.ngrams import ngrams, row_text


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


def refuse_overlap(prompts: list[dict], train: "pa.Table | Iterable[pa.Table]", n: int) -> None:
    """StageError if a held-out prompt (``prompt_id``, ``prompt``) shares a ``prompt_id`` or a
    word ``n``-gram with the training rows. ``train`` may be a stream of tables (a large training
    set is read batch by batch; only the held-out prompts' n-grams are held)."""
    tables = [train] if isinstance(train, pa.Table) else train
    held = {r["prompt_id"] for r in prompts}
    wanted: dict[str, list[int]] = {}
    for i, r in enumerate(prompts):
        for g in ngrams(r["prompt"] or "", n):
            wanted.setdefault(g, []).append(i)
    leaked: set[str] = set()
    hits: dict[int, str] = {}
    for t in tables:
        leaked |= held & set(t.column("prompt_id").to_pylist())
        if leaked or not wanted:
            continue  # the prompt ids decide; the rest of the ids are still read, for the count
        for text in training_prompts(t):
            for g in ngrams(text, n):
                owners = wanted.pop(g, None)
                if owners:
                    for i in owners:
                        hits.setdefault(i, g)
    if leaked:
        leaked_ = sorted(leaked)
        raise StageError(
            f"held-out prompts overlap the training data: {len(leaked_)} shared prompt_id(s), "
            f"e.g. {', '.join(leaked_[:5])}; refusing to score"
        )
    if hits:
        first = min(hits)
        ex = prompts[first]
        raise StageError(
            f"held-out prompts overlap the training data: {len(hits)} of {len(prompts)} eval prompt(s) share a "
            f"{n}-gram with a training prompt, e.g. eval prompt {ex['prompt_id']} {ex['prompt'][:200]!r} shares "
            f"{hits[first]!r}; refusing to score (decontaminate the training data against this eval set)"
        )
