"""evaluate: each model role answers ``sampling.n`` samples per held-out prompt; the verify
stage's checkers score them; the scores come with clustered standard errors.

Inputs: ``prompts`` (the held-out set), ``train`` (the student's training rows, with
``prompt_id``), the ``student`` model (input or ``params.student``), and optionally the
``teacher`` and the ``base`` student before fine-tuning (inputs or params). Roles:
``teacher``, ``base_student``, ``student``.

The stage fails before loading any model if the held-out set overlaps the training
data (see ``stages.common.heldout``): a held-out ``prompt_id`` appears in ``train``, or a
held-out prompt shares a word n-gram (``overlap_ngram`` words, default 13) with a
training prompt.

Output ``samples``: every evaluation sample with ``role``, its verdict and the
``max_thinking_tokens`` cap it ran under (null for the main evaluation).

Metrics (``stages.common.metrics``): ``roles.<role>`` with pass@k and maj@k (each with
its SE and 95% interval, and curves for every k up to n), mean tokens on correct and
wrong samples, tokens per correct answer, accuracy per 1k tokens and truncation rate;
``sampling`` and ``temperature`` (stated next to every number); ``comparisons``:
student − teacher, student − base student and student − the pipeline's ``best`` student,
as mean per-prompt pass@1 differences with paired SEs; ``budget_sweep`` (with
``budgets``): each role under budget forcing at each thinking-token cap, accuracy against
mean tokens spent; ``promotion`` (with ``promote``): whether the student replaced the
pipeline's ``best`` (``stages.common.promotion``). Samples whose verdict is ``error``
(checker timeout or crash, engine error) are infrastructure faults, not wrong answers:
they are left out of every score and counted as ``errored``.
"""
from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline.core import resources
from pipeline.core.stage import Stage, StageContext
from pipeline.sizing import fit
from stages.common.checkers import CHECKER_VERSION
from stages.common.engine import BudgetSpec, SamplingSpec, open_engines
from stages.common.heldout import refuse_overlap
from stages.common.metrics import ReasoningMetrics, paired_difference
from stages.common.ngrams import DEFAULT_NGRAM
from stages.common.promotion import promote, read_best
from stages.common.rows_scoring import ScoringParams
from stages.common.scoring import score
from stages.common.verifier import VerifierPool

EVAL_SCHEMA = pa.schema(
    [("role", pa.string()), ("prompt_id", pa.string()), ("sample_index", pa.int32()), ("prompt", pa.string()),
     ("answer", pa.string()), ("completion", pa.string()), ("completion_tokens", pa.int32()),
     ("finish_reason", pa.string()), ("error", pa.string()), ("verdict", pa.string()), ("reason", pa.string()),
     ("detail", pa.string()), ("extracted", pa.string()), ("max_thinking_tokens", pa.int32())]
)
ROLES = {"teacher": "teacher", "base_student": "base", "student": "student"}  # role -> input / param name


class PromotionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, description="the best pointer's name (default: the pipeline's name)")
    z: float = Field(2.0, gt=0, description="promote only past this many paired standard errors")


class Params(ScoringParams):  # format, chat_template, system_prompt, chat_template_kwargs, engine
    model_config = ConfigDict(extra="forbid")
    student: str | None = Field(None, description="student folder or URI (or wire input 'student')")
    teacher: str | None = Field(None, description="teacher folder or URI (or wire input 'teacher')")
    base: str | None = Field(None, description="the student before fine-tuning (or wire input 'base')")
    sampling: SamplingSpec = Field(default_factory=lambda: SamplingSpec(n=8))
    ks: list[int] = Field(default_factory=lambda: [1, 4, 8])
    budgets: list[int] = Field(default_factory=list, description="thinking-token caps for a budget-forcing sweep")
    promote: PromotionSpec | None = Field(None, description="the promotion gate for the student")
    checker_version: str = CHECKER_VERSION
    timeout_s: float = Field(5.0, gt=0, description="hard wall-clock limit per answer check")
    overlap_ngram: int = Field(DEFAULT_NGRAM, ge=1, description="refuse if a held-out prompt shares an n-gram "
                               "of this many words with a training prompt")


def sampling_settings(s: SamplingSpec) -> dict:
    out = {"n": s.n, "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, "seed": s.seed}
    if s.budget is not None and s.budget.max_thinking_tokens:
        out["max_thinking_tokens"] = s.budget.max_thinking_tokens
    return out


class Evaluate(Stage):
    kind: ClassVar[str] = "evaluate"
    # expensive (vLLM on every model): keyed by this version, bumped by hand when scoring or
    # metrics change, not by a hash of the code (the checkers key it through checker_version)
    version: ClassVar[str] = "2"
    code_hash: ClassVar[bool] = False
    Params = Params
    requires: ClassVar[tuple] = ("vllm", "math_verify")
    inputs: ClassVar[dict] = {"prompts": "dataset", "train": "dataset", "student": "model", "teacher": "model",
                              "base": "model"}
    optional_inputs: ClassVar[frozenset] = frozenset({"student", "teacher", "base"})
    input_columns: ClassVar[dict] = {"prompts": {"prompt_id": "string", "prompt": "string", "answer": "string"},
                                     "train": {"prompt_id": "string", "messages|prompt": "any"}}
    outputs: ClassVar[dict] = {"samples": "dataset"}
    output_columns: ClassVar[dict] = {"samples": EVAL_SCHEMA}

    def check(self) -> list[tuple[str, str]]:
        out = resources.model_params_problems(self.params, ("student", "teacher", "base"))
        out += [x for role in ("student", "teacher", "base")
                for x in fit.engine_problems(getattr(self.params, role), self.params.engine)]
        if any(k > self.params.sampling.n for k in self.params.ks):
            out.append(("ks", f"every k must be <= sampling.n ({self.params.sampling.n})"))
        return out

    def external_fingerprint(self) -> dict:
        return resources.model_params_fingerprint(self.params, ("student", "teacher", "base"))

    def _models(self, ctx: StageContext) -> dict[str, str]:
        models = {}
        for role, name in ROLES.items():
            if role == "student" or ctx.has_input(name) or getattr(self.params, name):
                models[role] = ctx.model_uri(name, getattr(self.params, name))
        return models

    @staticmethod
    def _train(ctx: StageContext):
        """``train``'s prompt_id and prompt text columns, as a stream of batches."""
        names = set(ctx.storage.dataset_manifest(ctx.inputs["train"].path)["schema"])
        cols = ["prompt_id"] + [c for c in ("prompt", "messages") if c in names][:1]
        return ctx.iter_input("train", columns=cols)

    def run(self, ctx: StageContext) -> None:
        p: Params = self.params
        models = self._models(ctx)
        prompts = ctx.read_input("prompts", columns=["prompt_id", "prompt", "answer"]).to_pylist()
        # before any engine starts
        refuse_overlap(prompts, self._train(ctx), p.overlap_ngram)
        writer = ctx.dataset_writer("samples")
        verifier = VerifierPool(workers=1, timeout=p.timeout_s)
        scores: dict[str, ReasoningMetrics] = {}
        sweep: dict[str, list] = {}
        try:
            for role, uri in models.items():
                with open_engines(uri, p.engine, p.chat_template, p.system_prompt, p.chat_template_kwargs) as pool:
                    scores[role] = self._score(ctx, p, role, pool, prompts, p.sampling, writer, verifier)
                    for cap in p.budgets:
                        budget = (p.sampling.budget or BudgetSpec()).model_copy(update={"max_thinking_tokens": cap})
                        sampling = p.sampling.model_copy(update={"budget": budget})
                        acc = self._score(ctx, p, role, pool, prompts, sampling, writer, verifier, cap)
                        s = acc.summary()
                        sweep.setdefault(role, []).append(
                            {"max_thinking_tokens": cap, **{k: s.get(k) for k in
                                                            ("pass@1", "pass@1_se", "mean_tokens", "errored")}})
        finally:
            verifier.close()
        ctx.commit_dataset("samples", writer, EVAL_SCHEMA)
        ctx.metrics.update(self._summarise(ctx, p, scores, sweep))

    def _score(self, ctx, p: Params, role: str, pool, prompts: list[dict], sampling: SamplingSpec, writer,
               verifier: VerifierPool, cap: int | None = None) -> ReasoningMetrics:
        bar = ctx.progress(f"{role} answering" + (f" (thinking <= {cap} tokens)" if cap else ""), len(prompts))
        acc = score(pool, prompts, sampling, verifier, p.format, tuple(p.ks),
                    {"role": role, "max_thinking_tokens": cap},
                    lambda rows: writer.write(pa.Table.from_pylist(rows, schema=EVAL_SCHEMA)), bar)
        bar.close()
        return acc

    def _summarise(self, ctx: StageContext, p: Params, scores: dict[str, ReasoningMetrics], sweep: dict) -> dict:
        settings = sampling_settings(p.sampling)
        out: dict = {"temperature": p.sampling.temperature, "sampling": settings,
                     "roles": {role: acc.summary() for role, acc in scores.items()}}
        per_prompt = {role: acc.per_prompt("pass@1") for role, acc in scores.items()}
        comparisons = [{"a": "student", "b": other, "metric": "pass@1",
                        **paired_difference(per_prompt["student"], per_prompt[other])}
                       for other in ("teacher", "base_student") if other in per_prompt]
        if sweep:
            out["budget_sweep"] = sweep
        if p.promote is not None:
            name = p.promote.name or ctx.pipeline or ctx.name
            best = read_best(ctx.storage, name)
            if best is not None:
                comparisons.append({"a": "student", "b": "best", "metric": "pass@1", "best": best.get("model"),
                                    **paired_difference(per_prompt["student"], best["per_prompt"])})
            candidate = {"model": ctx.inputs["student"].uri if ctx.has_input("student") else p.student,
                         "run_id": ctx.run_id, "stage": ctx.name, "fingerprint": ctx.fingerprint, "metric": "pass@1",
                         "score": out["roles"]["student"].get("pass@1"), "sampling": settings,
                         "per_prompt": per_prompt["student"]}
            decision = promote(ctx.storage, name, candidate, p.promote.z)
            out["promotion"] = {"pointer": name, **decision}
            ctx.log(("promoted: " if decision["promoted"] else "not promoted: ") + decision["reason"])
        out["comparisons"] = comparisons
        return out
