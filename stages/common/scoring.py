"""Score a model on prompts: sample with an engine pool, check every sample with the verifier,
accumulate the metrics. Shared by the stages that score models (evaluate, hard_prompts)."""
from __future__ import annotations

from typing import Callable

from stages.common.checkers import FormatSpec, answer_key
from stages.common.engine import SamplingSpec
from stages.common.metrics import ReasoningMetrics
from stages.common.verifier import VerifierPool


def score(pool, prompts: list[dict], sampling: SamplingSpec, verifier: VerifierPool, fmt: FormatSpec,
          ks: tuple[int, ...] = (1,), extra: dict | None = None, on_rows: Callable[[list[dict]], None] | None = None,
          progress=None) -> ReasoningMetrics:
    """Every sample of every prompt (rows with ``prompt_id``, ``prompt``, ``answer``), verified;
    ``on_rows`` gets each chunk's rows (sample + verdict columns + ``extra``) as they finish."""
    by_id = {r["prompt_id"]: r for r in prompts}
    acc = ReasoningMetrics(ks=ks)
    for chunk in pool.generate(prompts, sampling):
        rows = [{**r, "prompt": by_id[r["prompt_id"]]["prompt"], "answer": by_id[r["prompt_id"]]["answer"],
                 **(extra or {})} for r in chunk]
        rows = [{**r, **v} for r, v in zip(rows, verifier.check_rows(rows, fmt))]
        for r in rows:
            acc.add(r["prompt_id"], r["sample_index"], r["verdict"] == "correct", answer_key(r["extracted"]),
                    r["completion_tokens"], r["finish_reason"] == "length", errored=r["verdict"] == "error",
                    reason=r["reason"])
        if on_rows is not None:
            on_rows(rows)
        if progress is not None:
            progress.advance(len({r["prompt_id"] for r in chunk}))
    return acc
