"""answer_only: chat rows with the reasoning taken out of the assistant turns, for training a
student on answers alone (the "no reasoning" ablation).

Input ``data``: rows with a ``messages`` column (list of {role, content}), e.g. dedupe's
``sft``. In each assistant turn everything up to and including the ``think_close`` tag
(``</think>``) is removed, leaving the final answer sentence with its ``\\boxed{}``.
A row whose assistant turn has no closing tag, or nothing after it, or a row with no
assistant turn, is not passed on: it is counted as removed (``no_think_block``,
``empty_answer``, ``no_assistant_turn``).
Output ``data``: the same columns, the assistant turns shortened.
"""
from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from pipeline.core.stage import Passthrough, Stage, StageContext


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    think_close: str = "</think>"


def strip_reasoning(content: str, close: str = "</think>") -> tuple[str | None, str | None]:
    """(the answer after the reasoning, None) or (None, why the row is dropped)."""
    if close not in content:
        return None, "no_think_block"
    answer = content.rsplit(close, 1)[1].strip()
    return (answer, None) if answer else (None, "empty_answer")


class AnswerOnly(Stage):
    kind: ClassVar[str] = "answer_only"
    Params = Params
    inputs: ClassVar[dict] = {"data": "dataset"}
    input_columns: ClassVar[dict] = {"data": {"messages": "messages"}}
    outputs: ClassVar[dict] = {"data": "dataset"}
    output_columns: ClassVar[dict] = {"data": Passthrough("data")}

    def run(self, ctx: StageContext) -> None:
        """Streams the input batch by batch through one writer."""
        think_close = self.params.think_close
        schema = ctx.input_schema("data")
        writer = ctx.dataset_writer("data")
        n = kept = 0
        try:
            for table in ctx.iter_input("data"):
                rows, why = [], []
                for row in table.to_pylist():
                    messages, reason = [], "no_assistant_turn"
                    for m in row["messages"] or []:
                        if m["role"] == "assistant":
                            content, reason = strip_reasoning(m["content"] or "", think_close)
                            if reason:
                                break
                            m = {**m, "content": content}
                        messages.append(m)
                    if reason:
                        why.append(reason)
                        continue
                    rows.append({**row, "messages": messages})
                ctx.drop_counts("removed", why)
                n, kept = n + table.num_rows, kept + len(rows)
                if rows:
                    writer.write(pa.Table.from_pylist(rows, schema=schema))
        except BaseException:
            writer.close()
            raise
        ctx.commit_dataset("data", writer, schema, stats={"input_rows": n})
        ctx.metrics.update({"input_rows": n, "kept": kept})
