"""evaluate: teacher and student each answer ``sampling.n`` samples per held-out prompt;
the verify stage's checkers score them.

Inputs: ``prompts`` (the held-out set), ``train`` (the student's training rows,
with ``prompt_id``), the ``student`` model (input or ``params.student``) and
optionally the ``teacher`` (input or ``params.teacher``).
The stage fails before loading any model if a held-out ``prompt_id`` appears in
the training data.
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

    def run(self, ctx: StageContext) -> None:
        p: Params = self.params
        models = self._models(ctx)
        prompts = ctx.read_input("prompts", columns=["prompt_id", "prompt", "answer"]).to_pylist()
        train_ids = set(ctx.read_input("train", columns=["prompt_id"]).column("prompt_id").to_pylist())
        leaked = sorted({r["prompt_id"] for r in prompts} & train_ids)
        if leaked:
            raise StageError(
                f"held-out prompts overlap the training data: {len(leaked)} shared prompt_id(s), "
                f"e.g. {', '.join(leaked[:5])}; refusing to score"
            )
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
