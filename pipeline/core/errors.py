"""Errors of a stage's run, and the one check every written table passes (the declared schema)."""
from __future__ import annotations

import pyarrow as pa


class StageError(RuntimeError):
    """A stage failed for a reason worth showing the user as-is."""


def conform(table: pa.Table, schema: pa.Schema, stage: str, output: str) -> pa.Table:
    """A table in the declared column order and types; a missing column is an error."""
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise StageError(f"stage {stage!r} output {output!r}: declared column(s) {missing} missing from the rows")
    extra = [c for c in table.column_names if c not in schema.names]
    if extra:
        raise StageError(f"stage {stage!r} output {output!r}: column(s) {extra} are not declared")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        raise StageError(f"stage {stage!r} output {output!r}: rows do not fit the declared schema: {e}") from e
