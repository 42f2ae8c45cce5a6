"""concat: one dataset made of several with the same columns (e.g. last round's training data
and this round's new traces), in input order: ``a``, then ``b``, then ``c`` and ``d`` when wired.
Every input must have ``a``'s columns; extra columns of later inputs are left out."""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from pipeline.stage import Passthrough, Stage, StageContext, StageError


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Concat(Stage):
    kind: ClassVar[str] = "concat"
    version: ClassVar[str] = "1"
    Params = Params
    inputs: ClassVar[dict] = {"a": "dataset", "b": "dataset", "c": "dataset", "d": "dataset"}
    optional_inputs: ClassVar[frozenset] = frozenset({"c", "d"})
    outputs: ClassVar[dict] = {"data": "dataset"}
    output_columns: ClassVar[dict] = {"data": Passthrough("a")}

    def run(self, ctx: StageContext) -> None:
        first = ctx.read_input("a")
        tables = [first]
        for name in ("b", "c", "d"):
            if not ctx.has_input(name):
                continue
            t = ctx.read_input(name)
            missing = [c for c in first.column_names if c not in t.column_names]
            if missing:
                raise StageError(f"input {name!r} lacks columns of input 'a': {', '.join(missing)}")
            tables.append(t.select(first.column_names).cast(first.schema))
        ctx.write_dataset("data", tables, first.schema)
        ctx.metrics["rows_per_input"] = [t.num_rows for t in tables]
