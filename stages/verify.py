"""verify: rule checkers give every sample a verdict and a reason.

Input ``samples`` (prompt_id, sample_index, answer, completion, finish_reason,
error, ...). Output ``verified``: the same rows plus ``verdict`` (correct,
rejected, error), ``reason`` (a code, see ``stages.common.checkers``),
``detail`` and ``extracted`` (the last boxed answer). Counts per reason and
per-prompt pass rates go into the stage metrics.
Checks run in Ray actors, each holding a verifier service (``stages.common.verifier``):
math comparisons happen in worker processes killed at a hard per-check timeout, so a
pathological answer gets reason ``timeout`` instead of hanging the stage.
"""
from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline.stage import Stage, StageContext
from stages.common.checkers import CHECKER_VERSION, FormatSpec
from stages.common.verifier import VerifierPool

VERDICT_FIELDS = [("verdict", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("extracted", pa.string())]


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: FormatSpec = Field(default_factory=FormatSpec)
    timeout_s: float = Field(5.0, gt=0, description="hard wall-clock limit per answer check")
    actors: int = Field(1, ge=1, json_schema_extra={"fingerprint": False}, description="verifier actors")
    workers: int = Field(2, ge=1, json_schema_extra={"fingerprint": False}, description="check processes per actor")
    chunk_size: int = Field(512, ge=1, json_schema_extra={"fingerprint": False})
    num_cpus: float = Field(1, gt=0, json_schema_extra={"fingerprint": False}, description="Ray CPUs per actor")


class VerifierActor:
    def __init__(self, workers: int, timeout: float):
        self.pool = VerifierPool(workers=workers, timeout=timeout)

    def check(self, rows: list[dict], fmt: dict) -> list[dict]:
        return self.pool.check_rows(rows, FormatSpec.model_validate(fmt))

    def stats(self) -> dict:
        return dict(self.pool.stats)
    checker_version: str = CHECKER_VERSION


class Verify(Stage):
    kind: ClassVar[str] = "verify"
    version: ClassVar[str] = "1"
    Params = Params
    inputs: ClassVar[dict] = {"samples": "dataset"}
    outputs: ClassVar[dict] = {"verified": "dataset"}

    def run(self, ctx: StageContext) -> None:
        import ray

        p: Params = self.params
        table = ctx.read_input("samples")
        rows = table.to_pylist()
        fmt = p.format.model_dump()
        actor_cls = ray.remote(num_cpus=p.num_cpus)(VerifierActor)
        actors = [actor_cls.remote(p.workers, p.timeout_s) for _ in range(p.actors)]
        try:
            refs = [actors[j % len(actors)].check.remote(rows[i : i + p.chunk_size], fmt)
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
        ctx.write_dataset("verified", [out], schema)

        reasons: dict[str, int] = {}
        per_prompt: dict[str, list[int]] = {}
        for r, v in zip(rows, verdicts):
            reasons[v["reason"]] = reasons.get(v["reason"], 0) + 1
            c = per_prompt.setdefault(r["prompt_id"], [0, 0])
            c[0] += v["verdict"] == "correct"
            c[1] += 1
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
        })
