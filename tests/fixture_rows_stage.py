"""``fixture_rows``: a test double of a source stage (``uses: fixture_rows_stage:FixtureRowsDouble``, with
``tests/`` on the import path) that writes the rows of a JSONL file as a dataset of a named
schema: ``eval`` (evaluate's ``samples`` columns), ``sft`` (dedupe's ``sft`` columns) or ``pairs``
(preference_pairs' ``pairs``). It stands in for a stage whose rows a test writes by hand."""
from __future__ import annotations

import json
from typing import ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline.core.stage import Stage, StageContext
from stages.dedupe import SFT_SCHEMA
from stages.evaluate import EVAL_SCHEMA
from stages.preference_pairs import PAIRS_SCHEMA

SCHEMAS = {"eval": EVAL_SCHEMA, "sft": SFT_SCHEMA, "pairs": PAIRS_SCHEMA}


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    schema_name: str = Field("eval", pattern="^(eval|sft|pairs)$")


class FixtureRowsDouble(Stage):
    kind: ClassVar[str] = "fixture_rows"
    Params = Params
    outputs: ClassVar[dict] = {"samples": "dataset"}

    def produces(self) -> dict:
        return {"samples": SCHEMAS[self.params.schema_name]}

    def external_fingerprint(self) -> dict:
        with open(self.params.path) as f:
            return {"rows": f.read()}

    def run(self, ctx: StageContext) -> None:
        schema = SCHEMAS[self.params.schema_name]
        with open(self.params.path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        full = [{name: r.get(name) for name in schema.names} for r in rows]
        ctx.write_dataset("samples", [pa.Table.from_pylist(full, schema=schema)])


FixtureRows = FixtureRowsDouble  # the older name
