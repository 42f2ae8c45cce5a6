"""FilterStage (pipeline/core/filter.py): a filter's per-row reasons become the kept rows and
the drop counts by reason; a filter that answers for the wrong number of rows is an error."""
import pyarrow as pa
import pytest
from pydantic import BaseModel

from pipeline.core.filter import FilterStage, _FilterBatch
from pipeline.core.stage import StageError


class _NoParams(BaseModel):
    pass


class _Odd(FilterStage):
    kind = "odd_test_filter"
    Params = _NoParams

    def drop_reasons(self, table):  # a plain list works as well as an Arrow array
        return [None if x % 2 else ("zero" if x == 0 else "even") for x in table.column("x").to_pylist()]


def test_reasons_become_kept_rows_and_counts():
    batch = _FilterBatch(_Odd("odd", _NoParams()))
    out, dropped = batch(pa.table({"x": [0, 1, 2, 3, 4, 5], "y": list("abcdef")}))
    assert out["kept"].to_pydict() == {"x": [1, 3, 5], "y": ["b", "d", "f"]}  # the input's columns, in order
    assert dropped == {"removed": {"zero": 1, "even": 2}}
    out, dropped = batch(pa.table({"x": [1, 3]}))
    assert out["kept"].num_rows == 2 and dropped == {"removed": {}}


def test_a_filter_answering_for_the_wrong_number_of_rows_is_an_error():
    class Short(_Odd):
        def drop_reasons(self, table):
            return [None]

    with pytest.raises(StageError, match="'short': drop_reasons gave 1 values for 3 rows"):
        _FilterBatch(Short("short", _NoParams()))(pa.table({"x": [1, 2, 3]}))
