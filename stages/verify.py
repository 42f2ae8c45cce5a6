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

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline.core.ids import hashes64
from pipeline.core.stage import NOT_OUTPUT, Passthrough, Stage, StageContext
from stages.common.checkers import CHECKER_VERSION, FormatSpec
from stages.common.sandbox import CodeSpec
from stages.common.verifier import RowChecker

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
    chunk_size: int = Field(512, ge=1, json_schema_extra=NOT_OUTPUT,
                            description="rows an actor checks at once")
    piece_rows: int = Field(8192, ge=1, json_schema_extra=NOT_OUTPUT,
                            description="at most this many input rows per piece sent to an actor")
    num_cpus: float = Field(1, gt=0, json_schema_extra=NOT_OUTPUT, description="Ray CPUs per actor")


class VerifierActor(RowChecker):
    """``RowChecker`` (``check``, ``stats``) plus ``process``: a whole piece verified where it lies."""

    def process(self, piece, spec, fmt: dict, checker: str, code: dict, chunk_size: int) -> dict:
        """Verify one piece of the input where it lies and write its verified rows: what comes
        back is the shard list and counters, never rows."""
        from pipeline.core.streaming import iter_piece, node_id

        writer = spec.writer(piece)
        reasons: dict[str, int] = {}
        drops: dict[str, dict[str, int]] = {}
        hashes, correct = [], []
        for table in iter_piece(spec.storage, piece, batch_rows=chunk_size):
            rows = table.to_pylist()
            verdicts = self.check(rows, fmt, checker, code)
            cols = {name: pa.array([v[name] for v in verdicts], typ) for name, typ in VERDICT_FIELDS}
            out = table
            for name, typ in VERDICT_FIELDS:
                out = out.append_column(pa.field(name, typ), cols[name])
            writer.write(out)
            for v in verdicts:
                reasons[v["reason"]] = reasons.get(v["reason"], 0) + 1
                if v["verdict"] != "correct":
                    kind = drops.setdefault("errored" if v["verdict"] == "error" else "rejected", {})
                    kind[v["reason"]] = kind.get(v["reason"], 0) + 1
            hashes.append(hashes64([r["prompt_id"] for r in rows]))
            correct.append(np.array([v["verdict"] == "correct" for v in verdicts], bool))
        h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        c = np.concatenate(correct) if correct else np.zeros(0, bool)
        uniq, inv = np.unique(h, return_inverse=True)
        solved = np.zeros(len(uniq), bool)
        np.logical_or.at(solved, inv, c)
        return {"shards": writer.finish(), "rows": writer.rows, "reasons": reasons, "dropped": drops,
                "prompts": uniq, "solved": solved, "node": node_id()}

    checker_version: str = CHECKER_VERSION


class Verify(Stage):
    kind: ClassVar[str] = "verify"
    Params = Params
    requires: ClassVar[tuple] = ("math_verify",)
    inputs: ClassVar[dict] = {"samples": "dataset"}
    outputs: ClassVar[dict] = {"verified": "dataset"}
    input_columns: ClassVar[dict] = {"samples": {"prompt_id": "string", "completion": "string"}}
    output_columns: ClassVar[dict] = {"verified": Passthrough("samples", pa.schema(VERDICT_FIELDS))}

    def run(self, ctx: StageContext) -> None:
        """Streams: each verifier actor takes pieces of the input (at most two in flight each),
        reads them itself, and writes their verified rows; the driver holds shard lists and
        counters only."""
        import ray

        from pipeline.core.streaming import ActorRing

        p: Params = self.params
        schema = ctx.input_schema("samples")
        for name, typ in VERDICT_FIELDS:
            schema = schema.append(pa.field(name, typ))
        spec = ctx.output_spec("verified", schema)
        pieces = ctx.input_pieces("samples", max_rows=p.piece_rows)
        fmt, code = p.format.model_dump(), p.code.model_dump()
        # an actor lost with its node is restarted and its call retried (a new attempt writes new
        # shard names; only the shards reported back are committed)
        actor_cls = ray.remote(num_cpus=p.num_cpus, max_restarts=3, max_task_retries=3,
                               scheduling_strategy="SPREAD")(VerifierActor)
        actors = [actor_cls.remote(p.workers, p.timeout_s) for _ in range(min(p.actors, max(1, len(pieces))))]
        shards: list[dict] = []
        reasons: dict[str, int] = {}
        nodes: dict[str, int] = {}
        prompts, solved = [np.zeros(0, np.uint64)], [np.zeros(0, bool)]
        try:
            bar = ctx.progress("checking", ctx.input_rows("samples"))
            ring = ActorRing(actors, per_actor=2)
            for _, res in ring.map(pieces, lambda a, pc: a.process.remote(pc, spec, fmt, p.checker, code, p.chunk_size)):
                shards.extend(res["shards"])
                for r, n in res["reasons"].items():
                    reasons[r] = reasons.get(r, 0) + n
                for kind, by_reason in res["dropped"].items():  # passed on, marked
                    ctx.drop_counts(kind, by_reason)
                nodes[res["node"]] = nodes.get(res["node"], 0) + res["rows"]
                prompts.append(res["prompts"])
                solved.append(res["solved"])
                if sum(len(x) for x in prompts) > 1 << 20:  # keep the per-prompt table compact
                    prompts, solved = _merge_prompts(prompts, solved)
                bar.advance(res["rows"])
            bar.close()
            stats = ray.get([a.stats.remote() for a in actors])
        finally:
            for a in actors:
                ray.kill(a)
        ctx.commit_shards("verified", shards, schema)
        (uniq,), (any_solved,) = _merge_prompts(prompts, solved)
        n = sum(reasons.values())
        ctx.metrics.update({
            "samples": n,
            "correct": reasons.get("ok", 0),
            "accept_rate": reasons.get("ok", 0) / n if n else 0.0,
            "reasons": reasons,
            "prompts": int(len(uniq)),
            "prompts_with_correct": int(any_solved.sum()),
            "answer_checks": sum(x["checks"] for x in stats),
            "check_timeouts": sum(x["timeouts"] for x in stats),
            "code_checks": sum(x.get("code_checks", 0) for x in stats),
            "pieces": len(pieces),
            "rows_per_node": nodes,
        })


def _merge_prompts(prompts: list[np.ndarray], solved: list[np.ndarray]) -> tuple[list, list]:
    """Per prompt hash: whether any of its samples was correct (one entry per prompt)."""
    h, c = np.concatenate(prompts), np.concatenate(solved)
    uniq, inv = np.unique(h, return_inverse=True)
    out = np.zeros(len(uniq), bool)
    np.logical_or.at(out, inv, c)
    return [uniq], [out]
