"""generate: the teacher answers every prompt ``sampling.n`` times on vLLM engines in Ray actors.

Input ``prompts`` (the prompts contract) and the teacher, as ``params.model``
(a folder or URI) or an input ``model`` from an upstream stage.
Output ``samples``: one row per (prompt_id, sample_index) with the completion,
token counts, ``finish_reason`` and ``error`` (null unless the request failed,
e.g. a prompt longer than the model's context).
Output ``prompt_stats``: per prompt, samples and tokens spent and, with adaptive
sampling, verified samples, the estimated pass rate and whether the prompt was
exhausted unsolved (the difficulty signal for later stages).

``sampling.strategy: adaptive`` samples in rounds of ``n`` per prompt, verifies
each round with the verify stage's checkers, and stops a prompt once it has
``target_correct`` verified samples or has spent ``max_samples`` samples (or
``max_tokens_per_prompt`` tokens); with ``give_up_after``, a prompt with no verified
sample after that many is given up as unsolved. ``fixed`` draws ``n`` samples per prompt.

Exactly-once resume: every finished chunk is committed at once as a small
checkpoint dataset. Checkpoints are keyed by what determines a sample
(``checkpoint_identity``): the teacher's files (weights and tokenizer), the chat
template and system prompt, the sampling settings that change a sample, the
output-changing engine settings and ``GENERATION_FORMAT`` (bumped by hand), not
by module sources, error budgets, resources or the prompt set, so a sample's
identity is (prompt_id, teacher, sampling, sample_index). The stage fingerprint
likewise uses the explicit ``version`` (``code_hash = False``). A re-run after a crash or ``kill -9`` skips
every prompt already committed and generates only the rest, and adding prompts
to the source generates only the new prompts' samples. The output keeps one row
per (prompt_id, sample_index), for the prompts of this input only.
"""
from __future__ import annotations

import time
import uuid
from typing import ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline import fit, resources
from pipeline.stage import Stage, StageContext, StageError
from stages.common.checkers import FormatSpec
from stages.common.engine import GENERATION_FORMAT, NO_FP, STOPPING_ONLY, EngineSpec, SamplingSpec, open_engines
from stages.common.verifier import VerifierPool

SAMPLES_SCHEMA = pa.schema(
    [("prompt_id", pa.string()), ("sample_index", pa.int32()), ("prompt", pa.string()), ("answer", pa.string()),
     ("source", pa.string()), ("completion", pa.string()), ("prompt_tokens", pa.int32()),
     ("completion_tokens", pa.int32()), ("finish_reason", pa.string()), ("error", pa.string()),
     # budget forcing (null without it): reasoning tokens, "Wait"s appended, answer forced at the cap
     ("thinking_tokens", pa.int32()), ("waits", pa.int32()), ("forced_answer", pa.bool_())]
)
STATS_SCHEMA = pa.schema(
    [("prompt_id", pa.string()), ("samples", pa.int32()), ("completion_tokens", pa.int64()), ("correct", pa.int32()),
     ("est_pass_rate", pa.float64()), ("exhausted_unsolved", pa.bool_())]
)


def error_summary(rows: list[dict], max_error_rate: float) -> str:
    """Why the stage failed: error rate, then each reason with its count and example prompts."""
    by_reason: dict[str, list[str]] = {}
    for r in rows:
        if r["error"]:
            by_reason.setdefault(r["error"].split(":")[0], []).append(r["prompt_id"])
    errors = sum(len(v) for v in by_reason.values())
    lines = [f"{errors}/{len(rows)} samples errored ({errors / len(rows):.1%} > max_error_rate {max_error_rate:.1%}):"]
    for reason, pids in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        example = next(r["error"] for r in rows if r["error"] and r["error"].split(":")[0] == reason)
        lines.append(f"  {reason}: {len(pids)} samples, {len(set(pids))} prompts (e.g. {pids[0]}: {example[:200]})")
    return "\n".join(lines)


def overhead(driver_cpu_s: float, driver_process_cpu_s: float, engine: dict) -> dict:
    """The pipeline's own CPU next to the engine, as a fraction of the engines' busy wall seconds
    (``engine_s``: time inside ``add_request``/``step``, summed over replicas).

    ``fraction``: CPU seconds of the stage's driver thread (reading, rows, checkpoints, the output)
    plus the engine actors' own code outside the engine (prompt building, rows, the loop).
    ``fraction_upper``: whole processes instead (the driver process, Ray's threads included, and
    each actor process less its engine calls; vLLM's front-end threads count here too), a bound.
    ``engine_steps``: engine steps taken (completion tokens ÷ steps is the mean batch)."""
    e = engine["engine_s"]
    actor_process = max(0.0, engine["process_cpu_s"] - engine["engine_cpu_s"])
    return {"driver_cpu_s": round(driver_cpu_s, 3), "actor_cpu_s": round(engine["cpu_s"], 3),
            "driver_process_cpu_s": round(driver_process_cpu_s, 3), "actor_process_cpu_s": round(actor_process, 3),
            "engine_s": round(e, 3), "engine_steps": int(engine.get("steps", 0)),
            "fraction": round((driver_cpu_s + engine["cpu_s"]) / e, 4) if e > 0 else None,
            "fraction_upper": round((driver_process_cpu_s + actor_process) / e, 4) if e > 0 else None}


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="teacher folder or URI (or wire input 'model')")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's")
    system_prompt: str | None = None
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    max_error_rate: float = Field(0.5, ge=0, le=1, json_schema_extra=NO_FP,
                                  description="fail the stage when more samples than this errored")
    format: FormatSpec = Field(default_factory=FormatSpec, description="adaptive: what counts as verified")
    verify_timeout_s: float = Field(5.0, gt=0, description="adaptive: hard limit per answer check")


class Generate(Stage):
    kind: ClassVar[str] = "generate"
    # explicit: bump when the stage's outputs change meaning (module sources are not hashed)
    version: ClassVar[str] = "2"
    code_hash: ClassVar[bool] = False
    Params = Params
    inputs: ClassVar[dict] = {"prompts": "dataset", "model": "model"}
    optional_inputs: ClassVar[frozenset] = frozenset({"model"})
    outputs: ClassVar[dict] = {"samples": "dataset", "prompt_stats": "dataset"}
    input_columns: ClassVar[dict] = {"prompts": {"prompt_id": "string", "prompt": "string", "answer": "string",
                                                 "source": "string"}}
    output_columns: ClassVar[dict] = {"samples": SAMPLES_SCHEMA, "prompt_stats": STATS_SCHEMA}
    checkpoint_ignores_inputs: ClassVar[frozenset] = frozenset({"prompts"})

    def check(self) -> list[tuple[str, str]]:
        return (resources.model_params_problems(self.params, ("model",))  # pins hf:// references
                + fit.engine_problems(self.params.model, self.params.engine))

    def external_fingerprint(self) -> dict:
        return resources.model_params_fingerprint(self.params, ("model",))

    def checkpoint_identity(self) -> dict:
        """What a sample depends on: the teacher's files (a wired teacher keys through its
        input), chat template, system prompt, the sampling settings that change a sample,
        the engine settings that change outputs, and ``GENERATION_FORMAT``."""
        p: Params = self.params
        sampling = p.sampling.model_dump(mode="json", exclude=set(STOPPING_ONLY))
        return {"format": GENERATION_FORMAT, "teacher": self.external_fingerprint(),
                "chat_template": p.chat_template, "system_prompt": p.system_prompt, "sampling": sampling,
                "engine": p.engine.model_dump(mode="json", include={"max_model_len", "dtype"})}

    def run(self, ctx: StageContext) -> None:
        cpu0, pcpu0 = time.thread_time(), time.process_time()  # the driver's own CPU
        p: Params = self.params
        model_uri = ctx.model_uri("model", p.model)
        prompts = ctx.read_input("prompts", columns=["prompt_id", "prompt", "answer", "source"]).to_pylist()
        by_id = {r["prompt_id"]: r for r in prompts}
        rows: dict[tuple[str, int], dict] = {}  # one row per key, committed ones first
        for path in ctx.committed_checkpoints():
            for r in ctx.storage.read_dataset(path).to_pylist():
                if r["prompt_id"] in by_id:
                    rows.setdefault((r["prompt_id"], r["sample_index"]), r)
        resumed = {pid for pid, _ in rows}
        bar = ctx.progress("generating", len(prompts))
        state = {"tokens": 0, "pool": None, "usage": None}

        def sample(requests: list[dict]) -> list[dict]:
            """Generate, commit each finished chunk as a checkpoint, return the new rows."""
            if state["pool"] is None:
                state["pool"] = pool = open_engines(model_uri, p.engine, p.chat_template, p.system_prompt)
                if pool.reused:  # kept from an earlier stage (DISTILL_KEEP_ENGINES): nothing started
                    ctx.metrics["engine_reused"] = True
                else:
                    ctx.metrics["engine_startup_seconds"] = round(pool.startup_seconds, 2)
                state["usage"] = pool.usage()
            new = []
            for chunk in state["pool"].generate(requests, p.sampling):
                full = []
                for r in chunk:  # the prompt's columns added to each sample row
                    src = by_id[r["prompt_id"]]
                    full.append({**r, "prompt": src["prompt"], "answer": src["answer"], "source": src["source"]})
                part = ctx.checkpoint_writer(f"part-{uuid.uuid4().hex[:12]}")
                part.write(pa.Table.from_pylist(full, schema=SAMPLES_SCHEMA))
                part.commit(SAMPLES_SCHEMA)
                state["tokens"] += sum(r["completion_tokens"] for r in chunk)
                new.extend(full)
            return new

        try:
            if p.sampling.strategy == "adaptive":
                stats = self._adaptive(ctx, prompts, rows, sample, bar)
            else:
                todo = [r for r in prompts if r["prompt_id"] not in resumed]
                bar.advance(len(prompts) - len(todo))
                for r in sample(todo) if todo else []:
                    rows.setdefault((r["prompt_id"], r["sample_index"]), r)
                bar.advance(len(todo))
                stats = {}
            if state["pool"] is not None:  # engine time and the actors' own CPU, this run's share
                state["engine"] = state["pool"].usage_since(state["usage"], state["pool"].usage())
        finally:
            if state["pool"] is not None:  # chunks lost with an engine actor and sent again
                ctx.metrics["requeued_chunks"] = state["pool"].requeued_chunks
                state["pool"].shutdown()
            bar.close()
        self._write(ctx, prompts, rows, stats, state["tokens"], len(resumed))
        if "engine" in state:
            ctx.metrics["overhead"] = overhead(time.thread_time() - cpu0, time.process_time() - pcpu0, state["engine"])

    def _adaptive(self, ctx: StageContext, prompts: list[dict], rows: dict, sample, bar) -> dict:
        """Rounds of ``n`` samples per unfinished prompt, verified as they finish; a prompt stops at
        ``target_correct`` verified samples, ``max_samples`` samples or its token budget."""
        s = self.params.sampling
        verdicts: dict[tuple[str, int], bool] = {}
        with VerifierPool(workers=1, timeout=self.params.verify_timeout_s) as verifier:

            def check(new_rows: list[dict]) -> None:
                for r, v in zip(new_rows, verifier.check_rows(new_rows, self.params.format)):
                    verdicts[(r["prompt_id"], r["sample_index"])] = v["verdict"] == "correct"

            check(list(rows.values()))  # resumed samples count toward their prompts
            stats = {r["prompt_id"]: {"samples": 0, "correct": 0, "tokens": 0} for r in prompts}
            for (pid, _), r in rows.items():
                stats[pid]["samples"] += 1
                stats[pid]["correct"] += verdicts[(pid, r["sample_index"])]
                stats[pid]["tokens"] += r["completion_tokens"]

            def finished(st: dict) -> bool:
                return (st["correct"] >= s.target_correct or st["samples"] >= s.max_samples
                        or (s.max_tokens_per_prompt is not None and st["tokens"] >= s.max_tokens_per_prompt)
                        or (s.give_up_after is not None and st["correct"] == 0 and st["samples"] >= s.give_up_after))

            done = sum(finished(st) for st in stats.values())
            bar.advance(done)
            while True:
                active = [r for r in prompts if not finished(stats[r["prompt_id"]])]
                if not active:
                    break
                requests = [{**r, "offset": stats[r["prompt_id"]]["samples"],
                             "n": min(s.n, s.max_samples - stats[r["prompt_id"]]["samples"])} for r in active]
                new = sample(requests)
                check(new)
                for r in new:
                    key = (r["prompt_id"], r["sample_index"])
                    if key in rows:
                        continue
                    rows[key] = r
                    st = stats[r["prompt_id"]]
                    st["samples"] += 1
                    st["correct"] += verdicts[key]
                    st["tokens"] += r["completion_tokens"]
                now = sum(finished(st) for st in stats.values())
                bar.advance(now - done)
                done = now
        return stats

    def _write(self, ctx: StageContext, prompts: list[dict], rows: dict, stats: dict, generated: int, resumed: int) -> None:
        p: Params = self.params
        writer = ctx.dataset_writer("samples")
        order = {r["prompt_id"]: i for i, r in enumerate(prompts)}
        out = sorted(rows.values(), key=lambda r: (order[r["prompt_id"]], r["sample_index"]))
        writer.write(pa.Table.from_pylist(out, schema=SAMPLES_SCHEMA))
        errors = tokens = 0
        reasons: dict[str, int] = {}
        per_prompt: dict[str, dict] = {r["prompt_id"]: {"samples": 0, "tokens": 0} for r in prompts}
        for r in out:
            tokens += r["completion_tokens"]
            per_prompt[r["prompt_id"]]["samples"] += 1
            per_prompt[r["prompt_id"]]["tokens"] += r["completion_tokens"]
            if r["error"]:
                errors += 1
                code = r["error"].split(":")[0]
                reasons[code] = reasons.get(code, 0) + 1
        ctx.drop_counts("errored", reasons)  # passed on, with their error
        if p.sampling.strategy == "fixed" and len(out) != len(prompts) * p.sampling.n:
            raise StageError(f"expected {len(prompts) * p.sampling.n} samples, assembled {len(out)}")
        stat_rows = []
        for r in prompts:
            st = stats.get(r["prompt_id"])
            pp = per_prompt[r["prompt_id"]]
            stat_rows.append({
                "prompt_id": r["prompt_id"], "samples": pp["samples"], "completion_tokens": pp["tokens"],
                "correct": st["correct"] if st else None,
                "est_pass_rate": st["correct"] / st["samples"] if st and st["samples"] else None,
                "exhausted_unsolved": (st["correct"] == 0) if st else None,
            })
        ctx.write_dataset("prompt_stats", [pa.Table.from_pylist(stat_rows, schema=STATS_SCHEMA)])
        ctx.metrics.update({"prompts": len(prompts), "samples": len(out), "completion_tokens": tokens,
                            "generated_tokens_this_attempt": generated, "resumed_prompts": resumed,
                            "errored_samples": errors})
        if stats:
            ctx.metrics.update({
                "strategy": "adaptive",
                "verified_samples": sum(st["correct"] for st in stats.values()),
                "prompts_reaching_target": sum(st["correct"] >= p.sampling.target_correct for st in stats.values()),
                "prompts_exhausted_unsolved": sum(st["correct"] == 0 for st in stats.values()),
            })
        if p.sampling.budget is not None:
            forced = [r for r in out if r["error"] is None]
            ctx.metrics["budget_forcing"] = {
                "forced_answers": sum(bool(r["forced_answer"]) for r in forced),
                "waits": sum(r["waits"] or 0 for r in forced),
                "mean_thinking_tokens": round(sum(r["thinking_tokens"] or 0 for r in forced) / max(1, len(forced)), 1),
            }
        if out and errors / len(out) > p.max_error_rate:
            raise StageError(error_summary(out, p.max_error_rate))
        ctx.commit_dataset("samples", writer, SAMPLES_SCHEMA)
