"""concat: one dataset made of several with the same columns (e.g. last round's training data
and this round's new traces), in input order: ``a``, then ``b``, then ``c`` and ``d`` when wired.
Every input must have ``a``'s columns; extra columns of later inputs are left out."""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from pipeline.core.stage import Passthrough, Stage, StageContext, StageError


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Concat(Stage):
    kind: ClassVar[str] = "concat"
    Params = Params
    inputs: ClassVar[dict] = {"a": "dataset", "b": "dataset", "c": "dataset", "d": "dataset"}
    optional_inputs: ClassVar[frozenset] = frozenset({"c", "d"})
    outputs: ClassVar[dict] = {"data": "dataset"}
    output_columns: ClassVar[dict] = {"data": Passthrough("a")}

    def run(self, ctx: StageContext) -> None:
        """Streams each input, batch by batch, through one writer."""
        first = ctx.input_schema("a")
        names = [n for n in ("a", "b", "c", "d") if ctx.has_input(n)]
        for name in names[1:]:
            have = ctx.input_schema(name).names
            missing = [c for c in first.names if c not in have]
            if missing:
                raise StageError(f"input {name!r} lacks columns of input 'a': {', '.join(missing)}")
        writer = ctx.dataset_writer("data")
        try:
            for name in names:
                for t in ctx.iter_input(name, columns=first.names):
                    writer.write(t.select(first.names).cast(first))
        except BaseException:
            writer.close()
            raise
        ctx.commit_dataset("data", writer, first)
        ctx.metrics["rows_per_input"] = [ctx.input_rows(n) for n in names]
