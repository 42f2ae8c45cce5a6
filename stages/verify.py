"""verify: rule checkers give every sample a verdict and a reason.

Input ``samples`` (prompt_id, sample_index, answer, completion, finish_reason,
error, ...). Output ``verified``: the same rows plus ``verdict`` (correct,
rejected, error), ``reason`` (a code, see ``stages.common.checkers``),
``detail`` and ``extracted`` (the boxed answer: the distinct boxes of the answer part,
joined by ``, ``; for code, the program). Counts per reason and
per-prompt pass rates go into the stage metrics.
Checks run in Ray actors, each holding a verifier service (``stages.common.verifier``):
math comparisons happen in worker processes killed at a hard per-check timeout, so a
pathological answer gets reason ``timeout`` instead of hanging the stage.

Code rows (``checker: auto`` and a ``tests`` column, or ``checker: code``, which takes the
tests from ``answer`` when there is no ``tests`` column, e.g. prompts read with
``answer_field: tests``) run their last fenced code block against the tests in the
sandbox (``stages.common.sandbox``, limits in ``code``), ``workers`` runs at a time per
actor: stdin/stdout tests, or function-call tests (HumanEval ``check(candidate)``, MBPP
asserts) run after the program in the same sandbox run. A ``test_kind`` column
(``stdio`` or ``function_call``) says which; without it the tests' shape does. See
``stages.common.checkers.check_code_sample`` for the reasons.
"""
from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline.stage import NOT_OUTPUT, Passthrough, Stage, StageContext
from stages.common.checkers import CHECKER_VERSION, FormatSpec, check_code_rows, is_code_row
from stages.common.sandbox import CodeSpec
from stages.common.verifier import VerifierPool

VERDICT_FIELDS = [("verdict", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("extracted", pa.string())]


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: FormatSpec = Field(default_factory=FormatSpec)
    timeout_s: float = Field(5.0, gt=0, description="hard wall-clock limit per answer check")
    checker: str = Field("auto", pattern="^(auto|math|code)$",
                         description="auto: rows with a `tests` field are code, the rest math")
    code: CodeSpec = Field(default_factory=CodeSpec, description="sandbox limits for code rows")
    actors: int = Field(1, ge=1, json_schema_extra=NOT_OUTPUT, description="verifier actors")
    workers: int = Field(2, ge=1, json_schema_extra=NOT_OUTPUT, description="check processes per actor")
    chunk_size: int = Field(512, ge=1, json_schema_extra=NOT_OUTPUT)
    num_cpus: float = Field(1, gt=0, json_schema_extra=NOT_OUTPUT, description="Ray CPUs per actor")


class VerifierActor:
    def __init__(self, workers: int, timeout: float):
        self.pool = VerifierPool(workers=workers, timeout=timeout)
        self.workers = workers
        self.code_cache: dict = {}
        self.code_checks = 0

    def check(self, rows: list[dict], fmt: dict, checker: str = "auto", code: dict | None = None) -> list[dict]:
        fmt_ = FormatSpec.model_validate(fmt)
        code_idx = [i for i, r in enumerate(rows) if is_code_row(r, checker)]
        if not code_idx:
            return self.pool.check_rows(rows, fmt_)
        out: list[dict | None] = [None] * len(rows)
        code_set = set(code_idx)
        math_idx = [i for i in range(len(rows)) if i not in code_set]
        for i, v in zip(math_idx, self.pool.check_rows([rows[i] for i in math_idx], fmt_) if math_idx else []):
            out[i] = v
        spec = CodeSpec.model_validate(code or {})
        for i, v in zip(code_idx, check_code_rows([rows[i] for i in code_idx], fmt_, spec, checker, self.workers,
                                                  self.code_cache)):
            out[i] = v
        self.code_checks += len(code_idx)
        return out

    def stats(self) -> dict:
        return {**self.pool.stats, "code_checks": self.code_checks}
    checker_version: str = CHECKER_VERSION


class Verify(Stage):
    kind: ClassVar[str] = "verify"
    version: ClassVar[str] = "1"
    Params = Params
    inputs: ClassVar[dict] = {"samples": "dataset"}
    outputs: ClassVar[dict] = {"verified": "dataset"}
    input_columns: ClassVar[dict] = {"samples": {"prompt_id": "string", "completion": "string"}}
    output_columns: ClassVar[dict] = {"verified": Passthrough("samples", pa.schema(VERDICT_FIELDS))}

    def run(self, ctx: StageContext) -> None:
        import ray

        p: Params = self.params
        table = ctx.read_input("samples")
        rows = table.to_pylist()
        fmt = p.format.model_dump()
        actor_cls = ray.remote(num_cpus=p.num_cpus)(VerifierActor)
        actors = [actor_cls.remote(p.workers, p.timeout_s) for _ in range(p.actors)]
        try:
            refs = [actors[j % len(actors)].check.remote(rows[i : i + p.chunk_size], fmt, p.checker, p.code.model_dump())
                    for j, i in enumerate(range(0, len(rows), p.chunk_size))]
            bar = ctx.progress("checking", len(rows))
            verdicts: list[dict] = []
            for ref in refs:  # in order, so verdicts line up with rows
                part = ray.get(ref)
                verdicts.extend(part)
                bar.advance(len(part))
            bar.close()
            stats = ray.get([a.stats.remote() for a in actors])
        finally:
            for a in actors:
                ray.kill(a)
        schema = table.schema
        for name, typ in VERDICT_FIELDS:
            schema = schema.append(pa.field(name, typ))
        out = pa.Table.from_pylist([{**r, **v} for r, v in zip(rows, verdicts)], schema=schema)
        reasons: dict[str, int] = {}
        per_prompt: dict[str, list[int]] = {}
        for r, v in zip(rows, verdicts):
            reasons[v["reason"]] = reasons.get(v["reason"], 0) + 1
            c = per_prompt.setdefault(r["prompt_id"], [0, 0])
            c[0] += v["verdict"] == "correct"
            c[1] += 1
        for v in verdicts:  # passed on, marked
            if v["verdict"] != "correct":
                ctx.drop("errored" if v["verdict"] == "error" else "rejected", v["reason"])
        ctx.write_dataset("verified", [out], schema)
        n = len(rows)
        ctx.metrics.update({
            "samples": n,
            "correct": reasons.get("ok", 0),
            "accept_rate": reasons.get("ok", 0) / n if n else 0.0,
            "reasons": reasons,
            "prompts": len(per_prompt),
            "prompts_with_correct": sum(1 for c in per_prompt.values() if c[0] > 0),
            "answer_checks": sum(x["checks"] for x in stats),
            "check_timeouts": sum(x["timeouts"] for x in stats),
            "code_checks": sum(x.get("code_checks", 0) for x in stats),
        })
