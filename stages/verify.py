"""verify: rule checkers give every sample a verdict and a reason.

Input ``samples`` (prompt_id, sample_index, answer, completion, finish_reason,
error, ...). Output ``verified``: the same rows plus ``verdict`` (correct,
rejected, error), ``reason`` (a code, see ``stages.common.checkers``),
``detail`` and ``extracted`` (the last boxed answer). Counts per reason and
per-prompt pass rates go into the stage metrics.
Checks run as Ray tasks over chunks of rows.
"""
from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline.stage import Stage, StageContext
from stages.common.checkers import CHECKER_VERSION, FormatSpec, check_rows

VERDICT_FIELDS = [("verdict", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("extracted", pa.string())]


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: FormatSpec = Field(default_factory=FormatSpec)
    chunk_size: int = Field(256, ge=1, json_schema_extra={"fingerprint": False})
    num_cpus: float = Field(1, gt=0, json_schema_extra={"fingerprint": False}, description="Ray CPUs per check task")
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
        task = ray.remote(num_cpus=p.num_cpus)(check_rows)
        fmt = p.format.model_dump()
        refs = [task.remote(rows[i : i + p.chunk_size], fmt) for i in range(0, len(rows), p.chunk_size)]
        bar = ctx.progress("checking", len(rows))
        verdicts: list[dict] = []
        for ref in refs:  # in order, so verdicts line up with rows
            part = ray.get(ref)
            verdicts.extend(part)
            bar.advance(len(part))
        bar.close()
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
        })
