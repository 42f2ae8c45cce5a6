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

Streaming: prompts are read from the input a batch at a time and go to the engines request
by request (``EngineSpec.max_inflight`` sequences per replica, refilled as each request
finishes); finished prompts are committed in batches (``batch_size`` prompts or
``commit_seconds``) as small checkpoint datasets. The driver holds metadata: the input's
prompt ids, the committed keys (read from the checkpoints' key columns only) and, with
adaptive sampling, per-prompt counts; adaptive rounds are verified in a Ray actor
(``stages.common.verifier.RowChecker``), not in the driver. The output is planned on the
checkpoints' key columns, then gathered from them a slice at a time (a few checkpoints open at
once, no Python rows), in input order. With adaptive sampling a prompt's next round is sent as
soon as its previous round is verified.

Exactly-once resume: every finished batch is committed at once as a small
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

import collections
import time
import uuid
from typing import Any, ClassVar, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from pipeline.core import resources
from pipeline.core.stage import KEYED_WHEN_SET, NOT_SAMPLE, Stage, StageContext, StageError, sample_params
from pipeline.sizing import fit
from stages.common.checkers import FormatSpec
from stages.common.engine import GENERATION_FORMAT, NO_FP, EngineSpec, SamplingSpec, open_engines
from stages.common.verifier import RowChecker

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


def error_summary(rows: list[dict], max_error_rate: float, total: int | None = None) -> str:
    """Why the stage failed: error rate, then each reason with its count and example prompts.
    ``rows`` may hold only the errored rows, with ``total`` the number of samples."""
    by_reason: dict[str, list[str]] = {}
    for r in rows:
        if r["error"]:
            by_reason.setdefault(r["error"].split(":")[0], []).append(r["prompt_id"])
    errors = sum(len(v) for v in by_reason.values())
    total = total or len(rows)
    lines = [f"{errors}/{total} samples errored ({errors / total:.1%} > max_error_rate {max_error_rate:.1%}):"]
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
    each actor process less its engine calls; vLLM's front-end threads count here too, and with an
    engine in the actor's process its compute threads other than the caller's), a bound.
    ``engine_steps``: engine steps taken (completion tokens ÷ steps is the mean batch)."""
    e = engine["engine_s"]
    actor_process = max(0.0, engine["process_cpu_s"] - engine["engine_cpu_s"])
    return {"driver_cpu_s": round(driver_cpu_s, 3), "actor_cpu_s": round(engine["cpu_s"], 3),
            "driver_process_cpu_s": round(driver_process_cpu_s, 3), "actor_process_cpu_s": round(actor_process, 3),
            "engine_s": round(e, 3), "engine_steps": int(engine.get("steps", 0)),
            "fraction": round((driver_cpu_s + engine["cpu_s"]) / e, 4) if e > 0 else None,
            "fraction_upper": round((driver_process_cpu_s + actor_process) / e, 4) if e > 0 else None}


class BudgetCap(BaseModel):
    """A spending cap: no request is sent that could take the stage past it. What was generated
    is committed, the stage records ``budget_exhausted`` with the figures, and a re-run with a
    larger cap resumes from the checkpoints and generates only what is missing."""

    model_config = ConfigDict(extra="forbid")
    max_tokens: int | None = Field(None, ge=1, description="completion tokens of the stage's output, resumed samples "
                                                            "included; a request reserves n x max_tokens until it returns")
    max_gpu_hours: float | None = Field(None, gt=0, description="this run's engine time: wall hours since the engines "
                                                                "started x replicas x GPUs each (a CPU replica counts as 1)")


class _BudgetGate:
    """Admits requests (one per prompt in flight) while what they could cost fits the cap."""

    def __init__(self, cap: BudgetCap, spent_tokens: int, n: int, per_sample: int, devices: int):
        self.cap, self.spent, self.n, self.per_sample, self.devices = cap, spent_tokens, n, per_sample, devices
        self.reserved: dict[str, int] = {}  # prompt_id -> tokens its request in flight may take
        self.t0: float | None = None  # when the engines were up
        self.exhausted: str | None = None

    def hours(self) -> float:
        return 0.0 if self.t0 is None else self.devices * (time.monotonic() - self.t0) / 3600

    def _blocked(self, need: int) -> str | None:
        c = self.cap
        if c.max_tokens is not None and self.spent + sum(self.reserved.values()) + need > c.max_tokens:
            return "max_tokens"
        if c.max_gpu_hours is not None and self.hours() >= c.max_gpu_hours:
            return "max_gpu_hours"
        return None

    def gate(self, requests: Iterable[dict | None]) -> Iterator[dict | None]:
        for req in requests:
            if req is None:
                yield None
                continue
            need = req.get("n", self.n) * self.per_sample
            while (why := self._blocked(need)) is not None:
                if not self.reserved:  # nothing in flight will free anything: the cap is reached
                    self.exhausted = why
                    return
                yield None  # wait for the requests in flight to return their reservations
            self.reserved[req["prompt_id"]] = need
            yield req

    def returned(self, rows: list[dict]) -> None:
        """A committed batch: its prompts' reservations become what they actually took."""
        for r in rows:
            self.spent += r["completion_tokens"] or 0
            self.reserved.pop(r["prompt_id"], None)

    def figures(self, prompts: int, done: int) -> dict:
        return {"reason": self.exhausted, "max_tokens": self.cap.max_tokens, "spent_tokens": self.spent,
                "max_gpu_hours": self.cap.max_gpu_hours, "gpu_hours": round(self.hours(), 6),
                "prompts_done": done, "prompts_left": prompts - done}


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # the path keys nothing: the teacher's files key the stage (external_fingerprint, or the wired input's digest)
    model: str | None = Field(None, json_schema_extra=NO_FP, description="teacher folder or URI (or wire input 'model')")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's")
    system_prompt: str | None = None
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    max_error_rate: float = Field(0.5, ge=0, le=1, json_schema_extra=NO_FP,
                                  description="fail the stage when more samples than this errored")
    # adaptive: which samples count as verified decides when a prompt stops, never what one sample is
    format: FormatSpec = Field(default_factory=FormatSpec, json_schema_extra=NOT_SAMPLE,
                               description="adaptive: what counts as verified")
    verify_timeout_s: float = Field(5.0, gt=0, json_schema_extra=NOT_SAMPLE,
                                    description="adaptive: hard limit per answer check")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict, json_schema_extra=KEYED_WHEN_SET,
                                                 description="variables for the chat template, e.g. "
                                                             "{enable_thinking: true} for Qwen3")
    # keys the stage (a larger cap re-runs it) but not its samples (the re-run resumes them)
    budget: BudgetCap | None = Field(None, json_schema_extra={**NOT_SAMPLE, **KEYED_WHEN_SET},
                                     description="stop sending requests before this cap would be passed")


class Generate(Stage):
    kind: ClassVar[str] = "generate"
    # explicit: bump when the stage's outputs change meaning (module sources are not hashed)
    version: ClassVar[str] = "2"
    code_hash: ClassVar[bool] = False
    Params = Params
    inputs: ClassVar[dict] = {"prompts": "dataset", "model": "model"}
    optional_inputs: ClassVar[frozenset] = frozenset({"model"})
    requires: ClassVar[tuple] = ("vllm", "math_verify")  # math_verify: adaptive sampling's checks
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
        """What a sample depends on, derived from the params markers: every param marked
        neither NOT_OUTPUT nor NOT_SAMPLE (chat template, system prompt, the sampling settings
        that change a sample, the engine's max_model_len, dtype and ``options``; a new field is
        in the key unless it is marked out), the teacher's files (a wired teacher keys through
        its input's digest) and ``GENERATION_FORMAT``."""
        return {"format": GENERATION_FORMAT, "teacher": self.external_fingerprint(), **sample_params(self.params)}

    def run(self, ctx: StageContext) -> None:
        cpu0, pcpu0 = time.thread_time(), time.process_time()  # the driver's own CPU
        p: Params = self.params
        model_uri = ctx.model_uri("model", p.model)
        # metadata only: the input's prompt ids in order, and the keys already committed
        order = _prompt_order(ctx)
        committed, spent = _committed_keys(ctx, order)
        resumed = {pid for pid, _ in committed}
        gate = _budget_gate(p, spent)
        bar = ctx.progress("generating", len(order))
        sample = _Sampler(ctx, p, model_uri, gate)
        try:
            if p.sampling.strategy == "adaptive":
                stats = self._adaptive(ctx, order, committed, sample, bar)
            else:
                stats = self._fixed(ctx, resumed, sample, bar)
            sample.measure()
        finally:
            sample.close()
            bar.close()
        self._write(ctx, order, stats, sample.tokens, len(resumed), gate)
        if sample.engine is not None:
            ctx.metrics["overhead"] = overhead(time.thread_time() - cpu0, time.process_time() - pcpu0, sample.engine)

    def _fixed(self, ctx: StageContext, resumed: set[str], sample: _Sampler, bar) -> dict:
        """``n`` samples for every prompt not resumed; no per-prompt stats."""
        bar.advance(len(resumed))
        todo = (r for t in _iter(ctx, PROMPT_COLUMNS) for r in t.to_pylist() if r["prompt_id"] not in resumed)
        for batch in sample(_first_of_each(todo)):
            bar.advance(len({r["prompt_id"] for r in batch}))
        return {}

    def _adaptive(self, ctx: StageContext, order: dict[str, int], committed: set, sample, bar) -> dict:
        """Rounds of ``n`` samples per unfinished prompt; a prompt's next round is sent as soon as
        its previous round is verified (not when every prompt's round ends). A prompt stops at
        ``target_correct`` verified samples, ``max_samples`` samples or its token budget."""
        import ray

        rounds = _Rounds(self.params, order)
        columns = ["prompt_id", "sample_index", "completion", "answer", "completion_tokens", "error"]
        try:
            if committed:  # resumed samples count toward their prompts, verified batch by batch
                for path in ctx.committed_checkpoints():  # one checkpoint (a commit batch) at a time
                    rounds.count(ctx.storage.read_dataset(path, columns=columns).to_pylist())
            bar.advance(sum(rounds.finished(st) for st in rounds.stats.values()))
            for batch in sample(rounds.source(ctx)):
                rounds.count(batch)
                rounds.next_rounds(batch, bar)
        finally:
            ray.kill(rounds.verifier)
        return rounds.stats

    def _write(self, ctx: StageContext, order: dict[str, int], stats: dict, generated: int, resumed: int,
               gate: _BudgetGate | None = None) -> None:
        """The output from the committed checkpoints, in bounded memory: one row per key of this
        input's prompts (the first committed), in input order, then sample index. The order is
        planned on the key columns alone (``_plan``); the rows are then gathered a slice of the
        output at a time from the checkpoints that hold them (a few at a time in memory)."""
        p: Params = self.params
        plan, paths = _plan(ctx, order)  # the key columns of every output row, in output order
        n_out = plan.num_rows
        errored = plan.filter(pc.is_valid(plan.column("error")))
        reasons = _error_reasons(errored)
        errors = errored.num_rows
        tokens = int(pc.sum(plan.column("completion_tokens")).as_py() or 0)
        ctx.drop_counts("errored", reasons)  # passed on, with their error
        per = plan.group_by("prompt_id", use_threads=False).aggregate([("sample_index", "count"),
                                                                         ("completion_tokens", "sum")])
        exhausted = gate is not None and gate.exhausted is not None
        want = per.num_rows if exhausted else len(order)  # past a budget: whole prompts, fewer of them
        if p.sampling.strategy == "fixed" and n_out != want * p.sampling.n:
            raise StageError(f"expected {want * p.sampling.n} samples, assembled {n_out}")
        writer, forcing = _write_samples(ctx, plan, paths)
        ctx.write_dataset("prompt_stats", _stat_tables(order, stats, _per_prompt(per)))
        ctx.metrics.update({"prompts": len(order), "samples": n_out, "completion_tokens": tokens,
                            "generated_tokens_this_attempt": generated, "resumed_prompts": resumed,
                            "errored_samples": errors})
        if exhausted:
            ctx.metrics["budget_exhausted"] = figures = gate.figures(len(order), per.num_rows)
            ctx.log(f"budget exhausted ({figures['reason']}): {figures['prompts_done']} of {len(order)} prompts "
                    f"sampled, {figures['spent_tokens']} completion tokens; a larger budget resumes from here")
        self._sampling_metrics(ctx, stats, forcing)
        if n_out and errors / n_out > p.max_error_rate:
            raise StageError(error_summary(errored.select(["prompt_id", "error"]).to_pylist(), p.max_error_rate, n_out))
        ctx.commit_dataset("samples", writer, SAMPLES_SCHEMA)

    def _sampling_metrics(self, ctx: StageContext, stats: dict, forcing: dict) -> None:
        """The adaptive sampling and budget forcing figures, when those are on."""
        p: Params = self.params
        if stats:
            ctx.metrics.update({
                "strategy": "adaptive",
                "verified_samples": sum(st["correct"] for st in stats.values()),
                "prompts_reaching_target": sum(st["correct"] >= p.sampling.target_correct for st in stats.values()),
                "prompts_exhausted_unsolved": sum(st["correct"] == 0 and st["samples"] > 0 for st in stats.values()),
            })
        if p.sampling.budget is not None:
            ctx.metrics["budget_forcing"] = {
                "forced_answers": forcing["forced_answers"], "waits": forcing["waits"],
                "mean_thinking_tokens": round(forcing["thinking_tokens"] / max(1, forcing["ok"]), 1),
            }


class _Sampler:
    """The stage's ``sample``: opens the engines at the first request, commits each batch of
    finished prompts as a checkpoint, then yields it; keeps the engine usage of this run."""

    def __init__(self, ctx: StageContext, p: Params, model_uri: str, gate: _BudgetGate | None):
        self.ctx, self.p, self.model_uri, self.gate = ctx, p, model_uri, gate
        self.tokens = 0  # completion tokens generated in this attempt
        self.pool = None
        self.usage = None  # the engines' usage when they were up
        self.engine: dict | None = None  # engine time and the actors' own CPU, this run's share

    def __call__(self, requests: Iterable[dict | None]) -> Iterator[list[dict]]:
        """Generate; commit each batch of finished prompts as a checkpoint, then yield it."""
        if self.pool is None:
            self._open()
        if self.gate is not None:
            requests = self.gate.gate(requests)
        for batch in self.pool.generate(requests, self.p.sampling, keep=PROMPT_COLUMNS[1:]):
            part = self.ctx.checkpoint_writer(f"part-{uuid.uuid4().hex[:12]}")
            part.write(pa.Table.from_pylist(batch, schema=SAMPLES_SCHEMA))
            part.commit(SAMPLES_SCHEMA)
            self.tokens += sum(r["completion_tokens"] for r in batch)
            if self.gate is not None:
                self.gate.returned(batch)
            yield batch

    def _open(self) -> None:
        """Start (or reuse) the engines; the budget's clock starts once they are up."""
        p, ctx = self.p, self.ctx
        self.pool = pool = open_engines(self.model_uri, p.engine, p.chat_template, p.system_prompt,
                                        p.chat_template_kwargs)
        if pool.reused:  # kept from an earlier stage (DISTILL_KEEP_ENGINES): nothing started
            ctx.metrics["engine_reused"] = True
        else:
            ctx.metrics["engine_startup_seconds"] = round(pool.startup_seconds, 2)
        self.usage = pool.usage()
        if self.gate is not None:
            self.gate.t0 = time.monotonic()

    def measure(self) -> None:
        """This run's engine time and the actors' own CPU, when engines were used."""
        if self.pool is not None:
            self.engine = self.pool.usage_since(self.usage, self.pool.usage())

    def close(self) -> None:
        """Record the requests lost with an engine actor and sent again; stop the engines."""
        if self.pool is not None:
            self.ctx.metrics["requeued_chunks"] = self.pool.requeued_chunks
            self.ctx.metrics["requeued_requests"] = self.pool.requeued_requests
            self.pool.shutdown()


class _Rounds:
    """Adaptive sampling's state: per-prompt counts, the verifier actor, and the next rounds."""

    def __init__(self, p: Params, order: dict[str, int]):
        import ray

        self.s = p.sampling
        self.stats = {pid: {"samples": 0, "correct": 0, "tokens": 0} for pid in order}
        self.seen: set[tuple[str, int]] = set()
        self.fmt = p.format.model_dump()
        # the checks run in a Ray actor on the cluster (no CPU reserved: it must never wait for
        # the engines' CPUs), not in the driver
        self.verifier = ray.remote(num_cpus=0, max_restarts=3, max_task_retries=3)(RowChecker).remote(
            1, p.verify_timeout_s)
        self.again: collections.deque = collections.deque()  # next rounds, sent before new prompts
        self.out: set[str] = set()  # prompts with a round in flight

    def count(self, rows: list[dict]) -> None:
        """Verify rows and add them to their prompts' counts (each key once)."""
        import ray

        stats, seen = self.stats, self.seen
        rows = [r for r in rows if r["prompt_id"] in stats and (r["prompt_id"], r["sample_index"]) not in seen]
        if not rows:
            return
        for r, v in zip(rows, ray.get(self.verifier.check.remote(rows, self.fmt, "math"))):
            seen.add((r["prompt_id"], r["sample_index"]))
            st = stats[r["prompt_id"]]
            st["samples"] += 1
            st["correct"] += v["verdict"] == "correct"
            st["tokens"] += r["completion_tokens"]

    def finished(self, st: dict) -> bool:
        """Whether a prompt with these counts stops: its target, its sample or token budget, or given up."""
        s = self.s
        return (st["correct"] >= s.target_correct or st["samples"] >= s.max_samples
                or (s.max_tokens_per_prompt is not None and st["tokens"] >= s.max_tokens_per_prompt)
                or (s.give_up_after is not None and st["correct"] == 0 and st["samples"] >= s.give_up_after))

    def request(self, row: dict) -> dict:
        """The next round's request for a prompt: ``n`` more samples (fewer at ``max_samples``)."""
        st = self.stats[row["prompt_id"]]
        return {**{k: row[k] for k in PROMPT_COLUMNS}, "offset": st["samples"],
                "n": min(self.s.n, self.s.max_samples - st["samples"])}

    def source(self, ctx: StageContext) -> Iterator[dict | None]:
        """Requests: next rounds first, then new prompts; None while the rest wait on verification."""
        first = (r for t in _iter(ctx, PROMPT_COLUMNS) for r in t.to_pylist())
        for r in _first_of_each(first):
            while self.again:
                yield self.again.popleft()
            if not self.finished(self.stats[r["prompt_id"]]):
                self.out.add(r["prompt_id"])
                yield self.request(r)
        while self.again or self.out:
            if self.again:
                yield self.again.popleft()
            else:
                yield None  # the rest wait on their verification

    def next_rounds(self, batch: list[dict], bar) -> None:
        """After a verified batch: each of its prompts is done or has its next round queued."""
        for r in {r["prompt_id"]: r for r in batch}.values():  # one request per prompt
            self.out.discard(r["prompt_id"])
            if self.finished(self.stats[r["prompt_id"]]):
                bar.advance(1)
            else:
                self.out.add(r["prompt_id"])
                self.again.append(self.request(r))


def _prompt_order(ctx: StageContext) -> dict[str, int]:
    """The input's prompt ids, each at its first position."""
    order: dict[str, int] = {}
    for t in _iter(ctx, ["prompt_id"]):
        for pid in t.column("prompt_id").to_pylist():
            order.setdefault(pid, len(order))
    return order


def _committed_keys(ctx: StageContext, order: dict[str, int]) -> tuple[set[tuple[str, int]], int]:
    """The keys of these prompts already committed, and their completion tokens (for a budget)."""
    committed: set[tuple[str, int]] = set()
    spent = 0  # completion tokens of the committed samples of these prompts (for a budget)
    for path in ctx.committed_checkpoints():  # the key columns only, never the text
        t = ctx.storage.read_dataset(path, columns=["prompt_id", "sample_index", "completion_tokens"])
        for k, tokens in zip(zip(t.column("prompt_id").to_pylist(), t.column("sample_index").to_pylist()),
                             t.column("completion_tokens").to_pylist()):
            if k[0] in order and k not in committed:
                committed.add(k)
                spent += tokens or 0
    return committed, spent


def _budget_gate(p: Params, spent: int) -> _BudgetGate | None:
    """The spending cap's gate (None without a cap), its GPUs counted over every replica."""
    if p.budget is None:
        return None
    e = p.engine
    return _BudgetGate(p.budget, spent, p.sampling.n, p.sampling.max_tokens,
                       e.replicas * e.tensor_parallel_size * max(1, int(-(-e.num_gpus // 1))))


def _error_reasons(errored: pa.Table) -> dict[str, int]:
    """Errored samples by reason (the error's text before its first colon)."""
    reasons: dict[str, int] = {}
    for e in errored.column("error").to_pylist():
        code = e.split(":")[0]
        reasons[code] = reasons.get(code, 0) + 1
    return reasons


def _write_samples(ctx: StageContext, plan: pa.Table, paths: list[str]) -> tuple[Any, dict]:
    """Write the planned rows to the ``samples`` writer (not committed), summing the budget
    forcing figures of the rows without an error."""
    writer = ctx.dataset_writer("samples")
    forcing = {"forced_answers": 0, "waits": 0, "thinking_tokens": 0, "ok": 0}
    for chunk in _gather(ctx, plan, paths):
        writer.write(chunk)
        ok = chunk.filter(pc.is_null(chunk.column("error")))
        forcing["ok"] += ok.num_rows
        forcing["forced_answers"] += int(pc.sum(pc.cast(pc.fill_null(ok.column("forced_answer"), False),
                                                         pa.int64())).as_py() or 0)
        forcing["waits"] += int(pc.sum(ok.column("waits")).as_py() or 0)
        forcing["thinking_tokens"] += int(pc.sum(ok.column("thinking_tokens")).as_py() or 0)
    return writer, forcing


def _per_prompt(per: pa.Table) -> dict[str, tuple[int, int]]:
    """Each prompt's (samples, completion tokens) from the plan's per-prompt aggregate."""
    return {pid: (n, t) for pid, n, t in zip(per.column("prompt_id").to_pylist(),
                                             per.column("sample_index_count").to_pylist(),
                                             per.column("completion_tokens_sum").to_pylist())}


def _stat_tables(order: dict[str, int], stats: dict, per_prompt: dict) -> Iterator[pa.Table]:
    """The ``prompt_stats`` rows, in input order, as tables of up to 65,536 rows."""
    rows = []
    for pid in order:
        st = stats.get(pid)
        n, t = per_prompt.get(pid, (0, 0))
        rows.append({"prompt_id": pid, "samples": n, "completion_tokens": t or 0,
                     "correct": st["correct"] if st else None,
                     "est_pass_rate": st["correct"] / st["samples"] if st and st["samples"] else None,
                     "exhausted_unsolved": (st["correct"] == 0) if st and st["samples"] else None})
        if len(rows) >= 65536:
            yield pa.Table.from_pylist(rows, schema=STATS_SCHEMA)
            rows = []
    yield pa.Table.from_pylist(rows, schema=STATS_SCHEMA)



PROMPT_COLUMNS = ["prompt_id", "prompt", "answer", "source"]
PLAN_COLUMNS = ["prompt_id", "sample_index", "completion_tokens", "error"]
GATHER_ROWS = 8192  # output rows gathered and written at a time
OPEN_CHECKPOINTS = 8  # checkpoint tables held at once while gathering (each one commit batch)


def _plan(ctx: StageContext, order: dict[str, int]) -> tuple[pa.Table, list[str]]:
    """Which committed row makes each output row, from the checkpoints' key columns alone:
    ``PLAN_COLUMNS`` plus ``_ck`` (the checkpoint's index in the returned paths) and ``_row`` (the
    row in it), one row per key of this input's prompts (the first committed: the first
    checkpoint in listing order, then the first row), sorted by input order, then sample index."""
    ids = pa.array(list(order), pa.string())
    schema = pa.schema([SAMPLES_SCHEMA.field(c) for c in PLAN_COLUMNS])
    paths = ctx.committed_checkpoints()
    parts = []
    for ci, path in enumerate(paths):
        t = ctx.storage.read_dataset(path, columns=PLAN_COLUMNS).cast(schema)
        t = t.append_column("_ck", pa.array(np.full(t.num_rows, ci, np.int32)))
        t = t.append_column("_row", pa.array(np.arange(t.num_rows, dtype=np.int64)))
        parts.append(t.filter(pc.is_in(t.column("prompt_id"), value_set=ids)))
    empty = schema.append(pa.field("_ck", pa.int32())).append(pa.field("_row", pa.int64())).empty_table()
    plan = pa.concat_tables(parts) if parts else empty
    if not plan.num_rows:
        return empty, paths
    plan = plan.append_column("_seq", pa.array(np.arange(plan.num_rows, dtype=np.int64)))
    firsts = plan.group_by(["prompt_id", "sample_index"], use_threads=False).aggregate([("_seq", "min")])
    plan = plan.take(firsts.column("_seq_min")).drop_columns(["_seq"])
    plan = plan.append_column("_pos", pc.index_in(plan.column("prompt_id"), value_set=ids))
    return plan.sort_by([("_pos", "ascending"), ("sample_index", "ascending")]).drop_columns(["_pos"]), paths


def _gather(ctx: StageContext, plan: pa.Table, paths: list[str]) -> Iterator[pa.Table]:
    """The output rows of ``plan``, ``GATHER_ROWS`` at a time, in plan order: each slice takes its
    rows from the checkpoints that hold them (the ``OPEN_CHECKPOINTS`` most recently used kept
    open; output order follows input order, so a slice's rows sit in a few checkpoints)."""
    open_: collections.OrderedDict[int, pa.Table] = collections.OrderedDict()

    def checkpoint(ci: int) -> pa.Table:
        if ci in open_:
            open_.move_to_end(ci)
        else:
            open_[ci] = ctx.storage.read_dataset(paths[ci]).select(SAMPLES_SCHEMA.names).cast(SAMPLES_SCHEMA)
            if len(open_) > OPEN_CHECKPOINTS:
                open_.popitem(last=False)
        return open_[ci]

    for lo in range(0, plan.num_rows, GATHER_ROWS):
        piece = plan.slice(lo, GATHER_ROWS)
        cks, rows = piece.column("_ck").to_numpy(), piece.column("_row").to_numpy()
        taken, where = [], []
        for ci in dict.fromkeys(cks.tolist()):  # each checkpoint once, in first-use order
            sel = np.flatnonzero(cks == ci)
            taken.append(checkpoint(ci).take(pa.array(rows[sel])))
            where.append(sel)
        yield pa.concat_tables(taken).take(pa.array(np.argsort(np.concatenate(where), kind="stable")))


def _iter(ctx: StageContext, columns: list[str]) -> Iterator[pa.Table]:
    """The prompts input as a stream of tables, in order."""
    if hasattr(ctx, "iter_input"):
        yield from ctx.iter_input("prompts", columns=columns)
    else:  # pragma: no cover - a context without streaming reads
        yield ctx.read_input("prompts", columns=columns)


def _first_of_each(rows: Iterable[dict]) -> Iterator[dict]:
    """Each prompt once (the first row of an id), as the output keeps one row per key."""
    seen: set[str] = set()
    for r in rows:
        if r["prompt_id"] not in seen:
            seen.add(r["prompt_id"])
            yield r
