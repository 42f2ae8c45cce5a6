"""``FilterStage``: a stage that keeps or drops each row of its one input, with a reason for every
row it drops (after datatrove's ``BaseFilter``).

A filter says only why a row goes: ``drop_reasons(table)`` returns, per row, a reason (a string)
or null to keep it. The base class does the rest: it streams input ``rows`` through the cluster's
workers (``ctx.map_pieces``: pieces of about 32 MB, one batch at a time), writes the kept rows as
output ``kept`` with the input's columns unchanged, and counts the dropped ones by reason as
``removed`` (``drop_kind``), which the manifests, ``distill datasets show`` and the report show.
"""
from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.stage import Passthrough, Stage, StageContext, StageError
from pipeline.core.streaming import ship_by_value


class FilterStage(Stage):
    inputs: ClassVar[dict] = {"rows": "dataset"}
    outputs: ClassVar[dict] = {"kept": "dataset"}
    output_columns: ClassVar[dict] = {"kept": Passthrough("rows")}
    drop_kind: ClassVar[str] = "removed"

    def drop_reasons(self, table: pa.Table) -> pa.Array | pa.ChunkedArray | list:
        """Per row of ``table``: why it is dropped (a string), or null to keep it. Runs on the
        cluster's workers, one batch of one piece of the input at a time."""
        raise NotImplementedError

    def run(self, ctx: StageContext) -> None:
        ship_by_value(type(self))  # a filter defined outside the project's packages reaches the workers
        ctx.map_pieces("rows", _FilterBatch(self), {"kept": ctx.input_schema("rows")})
        ctx.metrics["kept"] = ctx.rows["kept"]


class _FilterBatch:
    """What each worker runs on a batch: the filter's reasons -> the kept rows and drop counts."""

    def __init__(self, stage: FilterStage):
        self.stage = stage

    def __call__(self, table: pa.Table) -> tuple[dict, dict]:
        reasons = self.stage.drop_reasons(table)
        if not isinstance(reasons, (pa.Array, pa.ChunkedArray)):
            reasons = pa.array(reasons, pa.string())
        if len(reasons) != table.num_rows:
            raise StageError(f"stage {self.stage.name!r}: drop_reasons gave {len(reasons)} values for "
                             f"{table.num_rows} rows")
        keep = pc.is_null(reasons)
        counts = pc.value_counts(pc.drop_null(reasons)).to_pylist()
        return {"kept": table.filter(keep)}, {self.stage.drop_kind: {str(c["values"]): c["counts"] for c in counts}}
