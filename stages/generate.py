"""generate: the teacher answers every prompt ``sampling.n`` times on vLLM engines in Ray actors.

Input ``prompts`` (the prompts contract) and the teacher, as ``params.model``
(a folder or URI) or an input ``model`` from an upstream stage.
Output ``samples``: one row per (prompt_id, sample_index) with the completion,
token counts, ``finish_reason`` and ``error`` (null unless the request failed,
e.g. a prompt longer than the model's context).
"""
from __future__ import annotations

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


def model_problem(model: str | None) -> list[tuple[str, str]]:
    if model is None:
        return []
    msg = resources.check_model(model)
    return [("model", msg)] if msg else []


class Generate(Stage):
    kind: ClassVar[str] = "generate"
    version: ClassVar[str] = "1"
    Params = Params
    inputs: ClassVar[dict] = {"prompts": "dataset", "model": "model"}
    optional_inputs: ClassVar[frozenset] = frozenset({"model"})
    outputs: ClassVar[dict] = {"samples": "dataset"}

    def check(self) -> list[tuple[str, str]]:
        return model_problem(self.params.model)

    def external_fingerprint(self) -> dict:
        return {"model": resources.model_fingerprint(self.params.model)} if self.params.model else {}

    def run(self, ctx: StageContext) -> None:
        p: Params = self.params
        if ctx.has_input("model"):
            model_uri = ctx.inputs["model"].uri
        elif p.model:
            model_uri = p.model
        else:
            raise StageError(f"stage {ctx.name!r}: set params.model or wire input 'model'")
        prompts = ctx.read_input("prompts", columns=["prompt_id", "prompt", "answer", "source"]).to_pylist()
        by_id = {r["prompt_id"]: r for r in prompts}
        writer = ctx.dataset_writer("samples")
        bar = ctx.progress("generating", len(prompts))
        errors = tokens = 0
        reasons: dict[str, int] = {}
        with open_engines(model_uri, p.engine, p.chat_template, p.system_prompt) as pool:
            ctx.metrics["engine_startup_seconds"] = round(pool.startup_seconds, 2)
            for chunk in pool.generate(prompts, p.sampling):
                rows = []
                for r in chunk:
                    src = by_id[r["prompt_id"]]
                    rows.append({**r, "prompt": src["prompt"], "answer": src["answer"], "source": src["source"]})
                    tokens += r["completion_tokens"]
                    if r["error"]:
                        errors += 1
                        key = r["error"].split(":")[0]
                        reasons[key] = reasons.get(key, 0) + 1
                writer.write(pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA))
                bar.advance(len({r["prompt_id"] for r in chunk}))
        bar.close()
        total = len(prompts) * p.sampling.n
        ctx.metrics.update({"prompts": len(prompts), "samples": total, "completion_tokens": tokens,
                            "errored_samples": errors, "error_reasons": reasons})
        if total and errors / total > p.max_error_rate:
            raise StageError(f"{errors}/{total} samples errored (max_error_rate={p.max_error_rate}): {reasons}")
        ctx.commit_dataset("samples", writer, SAMPLES_SCHEMA)
