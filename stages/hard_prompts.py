"""hard_prompts: the feedback loop's edge. Score the current student on a training pool of
prompts and keep the ones it fails, for the next round's generate stage.

Inputs: ``prompts`` (the training pool: never the held-out set), the ``model`` to score
(input or ``params.model``), and optionally ``heldout``: the held-out prompts, which must
not overlap the pool (same ``prompt_id`` or a shared ``overlap_ngram``-word n-gram); the
stage refuses before any engine starts if they do.

Output ``hard_prompts``: the pool's rows whose pass rate over ``sampling.n`` samples is
below ``threshold``, with ``pass_rate``, ``samples`` and ``correct``; the other prompts are
counted as removed (``solved``), prompts whose samples all errored as errored. Its columns
are the prompt columns generate reads, so it wires straight into the next round's generate.
"""
from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
from pydantic import ConfigDict, Field

from pipeline.core import resources
from pipeline.core.stage import Stage, StageContext
from stages.common.engine import SamplingSpec, open_engines
from stages.common.heldout import refuse_overlap
from stages.common.ngrams import DEFAULT_NGRAM
from stages.common.rows_scoring import ScoringParams
from stages.common.scoring import score
from stages.common.verifier import VerifierPool

HARD_SCHEMA = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()), ("answer", pa.string()),
                         ("source", pa.string()), ("metadata", pa.string()), ("pass_rate", pa.float64()),
                         ("samples", pa.int32()), ("correct", pa.int32())])


class Params(ScoringParams):  # format, chat_template, system_prompt, chat_template_kwargs, engine
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="the model to score (or wire input 'model')")
    threshold: float = Field(0.5, gt=0, le=1, description="a prompt is hard when its pass rate is below this")
    sampling: SamplingSpec = Field(default_factory=lambda: SamplingSpec(n=4))
    timeout_s: float = Field(5.0, gt=0, description="hard wall-clock limit per answer check")
    overlap_ngram: int = Field(DEFAULT_NGRAM, ge=1)


class HardPrompts(Stage):
    kind: ClassVar[str] = "hard_prompts"
    Params = Params
    requires: ClassVar[tuple] = ("vllm", "math_verify")
    inputs: ClassVar[dict] = {"prompts": "dataset", "model": "model", "heldout": "dataset"}
    optional_inputs: ClassVar[frozenset] = frozenset({"model", "heldout"})
    input_columns: ClassVar[dict] = {"prompts": {"prompt_id": "string", "prompt": "string", "answer": "string"},
                                     "heldout": {"prompt_id": "string", "prompt": "string"}}
    outputs: ClassVar[dict] = {"hard_prompts": "dataset"}
    output_columns: ClassVar[dict] = {"hard_prompts": HARD_SCHEMA}

    def check(self) -> list[tuple[str, str]]:
        return resources.model_params_problems(self.params, ("model",))

    def external_fingerprint(self) -> dict:
        return resources.model_params_fingerprint(self.params, ("model",))

    def run(self, ctx: StageContext) -> None:
        p: Params = self.params
        table = ctx.read_input("prompts")
        pool = table.to_pylist()
        if ctx.has_input("heldout"):  # the pool is training data: it must not touch the held-out set
            heldout = ctx.read_input("heldout", columns=["prompt_id", "prompt"]).to_pylist()
            refuse_overlap(heldout, table.select([c for c in ("prompt_id", "prompt") if c in table.column_names]),
                           p.overlap_ngram)
        verifier = VerifierPool(workers=1, timeout=p.timeout_s)
        bar = ctx.progress("scoring the training pool", len(pool))
        try:
            with open_engines(ctx.model_uri("model", p.model), p.engine, p.chat_template, p.system_prompt,
                              p.chat_template_kwargs) as engines:
                acc = score(engines, pool, p.sampling, verifier, p.format, progress=bar)
        finally:
            verifier.close()
            bar.close()
        rates = acc.per_prompt("pass@1")
        counts = acc.counts()
        hard = []
        for r in pool:
            pid = r["prompt_id"]
            if pid not in rates:
                ctx.drop("errored", "all_samples_errored")
            elif rates[pid] >= p.threshold:
                ctx.drop("removed", "solved")
            else:
                n, c = counts[pid]
                hard.append({**{k: r.get(k) for k in HARD_SCHEMA.names[:5]}, "pass_rate": rates[pid],
                             "samples": n, "correct": c})
        ctx.write_dataset("hard_prompts", [pa.Table.from_pylist(hard, schema=HARD_SCHEMA)], HARD_SCHEMA)
        s = acc.summary()
        ctx.metrics.update({"pool": len(pool), "hard": len(hard), "threshold": p.threshold,
                            "pool_pass@1": s.get("pass@1"), "pool_pass@1_se": s.get("pass@1_se"),
                            "sampling": {"n": p.sampling.n, "temperature": p.sampling.temperature,
                                         "seed": p.sampling.seed}})
