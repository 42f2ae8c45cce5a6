"""evaluate: teacher and student each answer ``sampling.n`` samples per held-out prompt;
the verify stage's checkers score them.

Inputs: ``prompts`` (the held-out set), ``train`` (the student's training rows,
with ``prompt_id``), the ``student`` model (input or ``params.student``) and
optionally the ``teacher`` (input or ``params.teacher``).
The stage fails before loading any model if the held-out set overlaps the
training data: a held-out ``prompt_id`` appears in ``train``, or a held-out prompt
shares a word n-gram (``overlap_ngram`` words, default 13; the same n-grams and
normalisation as the decontaminate stage, see ``stages.common.ngrams``) with a
training prompt (``train``'s ``prompt`` column, else the user turns of its
``messages``).
Output ``samples``: every evaluation sample with ``role`` and its verdict.
Metrics: ``metrics.teacher`` / ``metrics.student`` with pass@1, pass@k, maj@k,
mean_tokens and truncated_rate (see ``stages.common.metrics``).
"""
from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline import resources
from pipeline.stage import Stage, StageContext, StageError
from stages.common.checkers import CHECKER_VERSION, FormatSpec, answer_key
from stages.common.engine import EngineSpec, SamplingSpec, open_engines
from stages.common.metrics import ReasoningMetrics
from stages.common.ngrams import DEFAULT_NGRAM, row_text, shared_ngrams
from stages.common.verifier import VerifierPool

EVAL_SCHEMA = pa.schema(
    [("role", pa.string()), ("prompt_id", pa.string()), ("sample_index", pa.int32()), ("prompt", pa.string()),
     ("answer", pa.string()), ("completion", pa.string()), ("completion_tokens", pa.int32()),
     ("finish_reason", pa.string()), ("error", pa.string()), ("verdict", pa.string()), ("reason", pa.string()),
     ("detail", pa.string()), ("extracted", pa.string())]
)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student: str | None = Field(None, description="student folder or URI (or wire input 'student')")
    teacher: str | None = Field(None, description="teacher folder or URI (or wire input 'teacher')")
    sampling: SamplingSpec = Field(default_factory=lambda: SamplingSpec(n=8))
    ks: list[int] = Field(default_factory=lambda: [1, 4, 8])
    format: FormatSpec = Field(default_factory=FormatSpec)
    chat_template: str | None = None
    system_prompt: str | None = None
    engine: EngineSpec = Field(default_factory=EngineSpec)
    checker_version: str = CHECKER_VERSION
    timeout_s: float = Field(5.0, gt=0, description="hard wall-clock limit per answer check")
    overlap_ngram: int = Field(DEFAULT_NGRAM, ge=1, description="refuse if a held-out prompt shares an n-gram "
                               "of this many words with a training prompt")


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


class Evaluate(Stage):
    kind: ClassVar[str] = "evaluate"
    version: ClassVar[str] = "1"
    Params = Params
    inputs: ClassVar[dict] = {"prompts": "dataset", "train": "dataset", "student": "model", "teacher": "model"}
    optional_inputs: ClassVar[frozenset] = frozenset({"student", "teacher"})
    outputs: ClassVar[dict] = {"samples": "dataset"}

    def check(self) -> list[tuple[str, str]]:
        out = resources.model_params_problems(self.params, ("student", "teacher"))
        if any(k > self.params.sampling.n for k in self.params.ks):
            out.append(("ks", f"every k must be <= sampling.n ({self.params.sampling.n})"))
        return out

    def external_fingerprint(self) -> dict:
        return resources.model_params_fingerprint(self.params, ("student", "teacher"))

    def _models(self, ctx: StageContext) -> dict[str, str]:
        models = {}
        if ctx.has_input("teacher") or self.params.teacher:
            models["teacher"] = ctx.model_uri("teacher", self.params.teacher)
        models["student"] = ctx.model_uri("student", self.params.student)
        return models

    @staticmethod
    def _train(ctx: StageContext) -> pa.Table:
        """``train``'s prompt_id and prompt text columns (not the completions)."""
        names = set(ctx.storage.dataset_manifest(ctx.inputs["train"].path)["schema"])
        cols = ["prompt_id"] + [c for c in ("prompt", "messages") if c in names][:1]
        return ctx.read_input("train", columns=cols)

    def run(self, ctx: StageContext) -> None:
        p: Params = self.params
        models = self._models(ctx)
        prompts = ctx.read_input("prompts", columns=["prompt_id", "prompt", "answer"]).to_pylist()
        # before any engine starts
        refuse_overlap(prompts, self._train(ctx), p.overlap_ngram)
        by_id = {r["prompt_id"]: r for r in prompts}
        writer = ctx.dataset_writer("samples")
        verifier = VerifierPool(workers=1, timeout=p.timeout_s)
        try:
            self._score(ctx, p, models, prompts, by_id, writer, verifier)
        finally:
            verifier.close()
        ctx.commit_dataset("samples", writer, EVAL_SCHEMA)

    def _score(self, ctx, p: Params, models, prompts, by_id, writer, verifier: VerifierPool) -> None:
        for role, uri in models.items():
            acc = ReasoningMetrics(ks=tuple(p.ks))
            bar = ctx.progress(f"{role} answering", len(prompts))
            with open_engines(uri, p.engine, p.chat_template, p.system_prompt) as pool:
                for chunk in pool.generate(prompts, p.sampling):
                    rows = [{**r, "role": role, "prompt": by_id[r["prompt_id"]]["prompt"],
                             "answer": by_id[r["prompt_id"]]["answer"]} for r in chunk]
                    verdicts = verifier.check_rows(rows, p.format)
                    rows = [{**r, **v} for r, v in zip(rows, verdicts)]
                    for r in rows:
                        acc.add(r["prompt_id"], r["sample_index"], r["verdict"] == "correct", answer_key(r["extracted"]),
                                r["completion_tokens"], r["finish_reason"] == "length")
                    writer.write(pa.Table.from_pylist(rows, schema=EVAL_SCHEMA))
                    bar.advance(len({r["prompt_id"] for r in chunk}))
            bar.close()
            ctx.metrics[role] = acc.summary()
