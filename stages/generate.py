"""generate: the teacher answers every prompt ``sampling.n`` times on vLLM engines in Ray actors.

Input ``prompts`` (the prompts contract) and the teacher, as ``params.model``
(a folder or URI) or an input ``model`` from an upstream stage.
Output ``samples``: one row per (prompt_id, sample_index) with the completion,
token counts, ``finish_reason`` and ``error`` (null unless the request failed,
e.g. a prompt longer than the model's context).

Exactly-once resume: every finished chunk is committed at once as a small
checkpoint dataset. Checkpoints are keyed by the teacher and the sampling
settings but not by the prompt set, so a sample's identity is (prompt_id,
teacher, sampling, sample_index). A re-run after a crash or ``kill -9`` skips
every prompt already committed and generates only the rest, and adding prompts
to the source generates only the new prompts' samples. The output keeps one row
per (prompt_id, sample_index), for the prompts of this input only.
"""
from __future__ import annotations

import uuid
from typing import ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline import resources
from pipeline.stage import Stage, StageContext, StageError
from stages.common.engine import EngineSpec, SamplingSpec, open_engines

SAMPLES_SCHEMA = pa.schema(
    [("prompt_id", pa.string()), ("sample_index", pa.int32()), ("prompt", pa.string()), ("answer", pa.string()),
     ("source", pa.string()), ("completion", pa.string()), ("prompt_tokens", pa.int32()),
     ("completion_tokens", pa.int32()), ("finish_reason", pa.string()), ("error", pa.string())]
)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="teacher folder or URI (or wire input 'model')")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's")
    system_prompt: str | None = None
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    max_error_rate: float = Field(0.5, ge=0, le=1, description="fail the stage when more samples than this errored")


class Generate(Stage):
    kind: ClassVar[str] = "generate"
    version: ClassVar[str] = "1"
    Params = Params
    inputs: ClassVar[dict] = {"prompts": "dataset", "model": "model"}
    optional_inputs: ClassVar[frozenset] = frozenset({"model"})
    outputs: ClassVar[dict] = {"samples": "dataset"}
    checkpoint_ignores_inputs: ClassVar[frozenset] = frozenset({"prompts"})

    def check(self) -> list[tuple[str, str]]:
        return resources.model_params_problems(self.params, ("model",))

    def external_fingerprint(self) -> dict:
        return resources.model_params_fingerprint(self.params, ("model",))

    def run(self, ctx: StageContext) -> None:
        p: Params = self.params
        model_uri = ctx.model_uri("model", p.model)
        prompts = ctx.read_input("prompts", columns=["prompt_id", "prompt", "answer", "source"]).to_pylist()
        by_id = {r["prompt_id"]: r for r in prompts}
        done_ids = {pid for path in ctx.committed_checkpoints()
                    for pid in ctx.storage.read_dataset(path, columns=["prompt_id"]).column("prompt_id").to_pylist()}
        todo = [r for r in prompts if r["prompt_id"] not in done_ids]
        bar = ctx.progress("generating", len(prompts))
        bar.advance(len(prompts) - len(todo))
        generated_tokens = 0
        if todo:
            with open_engines(model_uri, p.engine, p.chat_template, p.system_prompt) as pool:
                ctx.metrics["engine_startup_seconds"] = round(pool.startup_seconds, 2)
                for chunk in pool.generate(todo, p.sampling):
                    rows = [{**r, "prompt": by_id[r["prompt_id"]]["prompt"], "answer": by_id[r["prompt_id"]]["answer"],
                             "source": by_id[r["prompt_id"]]["source"]} for r in chunk]
                    generated_tokens += sum(r["completion_tokens"] for r in chunk)
                    part = ctx.checkpoint_writer(f"part-{uuid.uuid4().hex[:12]}")
                    part.write(pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA))
                    part.commit(SAMPLES_SCHEMA)
                    bar.advance(len({r["prompt_id"] for r in chunk}))
        bar.close()

        # Assemble the output from the committed checkpoints: one row per key (a concurrent
        # attempt may have committed the same prompt too), prompts of this input only.
        writer = ctx.dataset_writer("samples")
        seen: set[tuple[str, int]] = set()
        errors = tokens = 0
        reasons: dict[str, int] = {}
        for path in ctx.committed_checkpoints():
            rows = []
            for r in ctx.storage.read_dataset(path).to_pylist():
                key = (r["prompt_id"], r["sample_index"])
                if key in seen or r["prompt_id"] not in by_id:
                    continue
                seen.add(key)
                rows.append(r)
                tokens += r["completion_tokens"]
                if r["error"]:
                    errors += 1
                    code = r["error"].split(":")[0]
                    reasons[code] = reasons.get(code, 0) + 1
            writer.write(pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA))
        total = len(prompts) * p.sampling.n
        if len(seen) != total:
            raise StageError(f"expected {total} samples, assembled {len(seen)}")
        ctx.metrics.update({"prompts": len(prompts), "samples": total, "completion_tokens": tokens,
                            "generated_tokens_this_attempt": generated_tokens,
                            "resumed_prompts": len(prompts) - len(todo),
                            "errored_samples": errors, "error_reasons": reasons})
        if total and errors / total > p.max_error_rate:
            raise StageError(f"{errors}/{total} samples errored (max_error_rate={p.max_error_rate}): {reasons}")
        ctx.commit_dataset("samples", writer, SAMPLES_SCHEMA)
