"""subsample: a seeded random subset of a dataset's rows, in input order.

Input ``data``; optional input ``like``: keep as many rows as ``like`` has (e.g. the
same number of unverified traces as there are verified ones). Without ``like``,
``params.n`` rows are kept; with neither, every row. Rows are drawn without
replacement with ``numpy.random.default_rng(seed)``, so the same input and seed give the
same rows. Rows left out are counted as removed (``subsampled``). A ``data`` with fewer
rows than asked for is an error, unless ``allow_fewer`` (then every row is kept).
Output ``data``: ``data``'s columns, unchanged.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline.core.stage import Passthrough, Stage, StageContext, StageError


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int | None = Field(None, ge=0, description="rows to keep (when input 'like' is not wired)")
    seed: int = 0
    allow_fewer: bool = Field(False, description="keep every row when data has fewer than asked for")


class Subsample(Stage):
    kind: ClassVar[str] = "subsample"
    Params = Params
    inputs: ClassVar[dict] = {"data": "dataset", "like": "dataset"}
    optional_inputs: ClassVar[frozenset] = frozenset({"like"})
    outputs: ClassVar[dict] = {"data": "dataset"}
    output_columns: ClassVar[dict] = {"data": Passthrough("data")}

    def run(self, ctx: StageContext) -> None:
        """Draws the row numbers from the manifest's count, then streams the input, keeping them."""
        p: Params = self.params
        total = ctx.input_rows("data")
        schema = ctx.input_schema("data")
        if ctx.has_input("like"):
            want = ctx.input_rows("like")
            what = "input 'like'"
        elif p.n is not None:
            want, what = p.n, "params.n"
        else:
            want, what = total, "all"
        if want > total:
            if not p.allow_fewer:
                raise StageError(f"input 'data' has {total} rows, fewer than the {want} asked for by {what} "
                                 f"(set allow_fewer: true to keep them all)")
            want = total
        keep = np.sort(np.random.default_rng(p.seed).choice(total, size=want, replace=False))
        ctx.drop("removed", "subsampled", total - want)
        writer = ctx.dataset_writer("data")
        offset = 0
        try:
            for t in ctx.iter_input("data"):
                lo, hi = np.searchsorted(keep, [offset, offset + t.num_rows])
                if hi > lo:
                    writer.write(t.take(pa.array(keep[lo:hi] - offset, pa.int64())))
                offset += t.num_rows
        except BaseException:
            writer.close()
            raise
        ctx.commit_dataset("data", writer, schema, stats={"input_rows": total})
        ctx.metrics.update({"input_rows": total, "kept": int(want)})
