"""prompts: read a prompt set from JSONL or Parquet files (local or any fsspec URI).

Output ``prompts``: ``prompt_id`` (hash of the normalised prompt), ``prompt``,
``answer`` (as text), ``source``, ``metadata`` (JSON of the other fields).
Output ``quarantine``: rows that cannot be used, each with its ``reason``:
invalid JSON, missing/empty prompt or answer, a duplicate of an earlier prompt.
No input row is dropped silently: ``rows.prompts + rows.quarantine`` equals the
number of input rows.
"""
from __future__ import annotations

import json
from typing import Any, ClassVar, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from pipeline import resources
from pipeline.ids import prompt_id
from pipeline.stage import Stage, StageContext, StageError

PROMPTS_SCHEMA = pa.schema(
    [("prompt_id", pa.string()), ("prompt", pa.string()), ("answer", pa.string()),
     ("source", pa.string()), ("metadata", pa.string())]
)
QUARANTINE_SCHEMA = pa.schema(
    [("source", pa.string()), ("row_number", pa.int64()), ("reason", pa.string()), ("raw", pa.string())]
)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str | list[str] = Field(description="file, folder, glob or list of them; .jsonl/.json/.parquet")
    format: str = Field("auto", pattern="^(auto|jsonl|parquet)$")
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    source: str | None = Field(None, description="source name; defaults to the file's parent/name")
    prompt_template: str | None = Field(None, description="e.g. '{prompt}\\nPut the final answer in \\\\boxed{{}}.'")
    limit: int | None = Field(None, ge=1, description="keep the first N usable rows")


def _paths(p: Params) -> list[str]:
    return [p.path] if isinstance(p.path, str) else list(p.path)


def _fmt(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "parquet" if path.endswith(".parquet") else "jsonl"


def _source_name(path: str) -> str:
    parts = path.rstrip("/").split("/")
    name = "/".join(parts[-2:]) if len(parts) > 1 else parts[-1]
    for ext in (".jsonl", ".json", ".parquet"):
        name = name.removesuffix(ext)
    return name


def _read_rows(path: str, fmt: str) -> Iterator[tuple[int, dict | None, str | None, str]]:
    """(row number, row or None, error or None, raw text)."""
    if fmt == "parquet":
        with fsspec.open(path, "rb") as f:
            table = pq.read_table(f)
        for i, row in enumerate(table.to_pylist(), start=1):
            yield i, row, None, ""
        return
    with fsspec.open(path, "rb") as f:
        for i, line in enumerate(f, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield i, None, f"invalid UTF-8: {e.reason} at byte {e.start}", line.decode("utf-8", "replace")
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield i, None, f"invalid JSON: {e.msg} at column {e.colno}", text
                continue
            if not isinstance(row, dict):
                yield i, None, f"expected a JSON object, got {type(row).__name__}", text
                continue
            yield i, row, None, text


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN
        return None
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if text.strip() else None


def _clean(text: str) -> str:
    # lone surrogates cannot be stored as UTF-8; make them visible instead of failing
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Prompts(Stage):
    kind: ClassVar[str] = "prompts"
    version: ClassVar[str] = "1"
    Params = Params
    outputs: ClassVar[dict] = {"prompts": "dataset", "quarantine": "dataset"}

    def check(self) -> list[tuple[str, str]]:
        problems = []
        for path in _paths(self.params):
            if not resources.expand(path):
                problems.append(("path", f"no prompt file found at {path}"))
        return problems

    def external_fingerprint(self) -> dict:
        return {f: resources.file_fingerprint(f) for path in _paths(self.params) for f in resources.expand(path)}

    def run(self, ctx: StageContext) -> None:
        p: Params = self.params
        good, bad = [], []
        seen: dict[str, str] = {}
        files = [f for path in _paths(p) for f in resources.expand(path)]
        if not files:
            raise StageError(f"no prompt files found at {p.path}")
        for file in files:
            source = p.source or _source_name(file)
            for n, row, err, raw in _read_rows(file, _fmt(file, p.format)):
                if p.limit is not None and len(good) >= p.limit:
                    break
                if err is None:
                    err = self._problem(row, p)
                if err is not None:
                    bad.append({"source": source, "row_number": n, "reason": err,
                                "raw": _clean(raw or json.dumps(row, default=str, ensure_ascii=False))[:20000]})
                    continue
                prompt = _clean(_as_text(row[p.prompt_field]))
                if p.prompt_template:
                    prompt = p.prompt_template.format(prompt=prompt)
                pid = prompt_id(prompt)
                if pid in seen:
                    bad.append({"source": source, "row_number": n, "reason": f"duplicate prompt (same as {seen[pid]})",
                                "raw": _clean(json.dumps(row, default=str, ensure_ascii=False))[:20000]})
                    continue
                seen[pid] = f"{source}#{n}"
                meta = {k: v for k, v in row.items() if k not in (p.prompt_field, p.answer_field)}
                good.append({"prompt_id": pid, "prompt": prompt, "answer": _clean(_as_text(row[p.answer_field])),
                             "source": source, "metadata": _clean(json.dumps(meta, default=str, ensure_ascii=False))})
        ctx.write_dataset("prompts", [pa.Table.from_pylist(good, schema=PROMPTS_SCHEMA)])
        ctx.write_dataset("quarantine", [pa.Table.from_pylist(bad, schema=QUARANTINE_SCHEMA)])
        reasons: dict[str, int] = {}
        for b in bad:
            key = b["reason"].split(":")[0].split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
        ctx.metrics.update({"files": len(files), "quarantine_reasons": reasons})

    @staticmethod
    def _problem(row: dict, p: Params) -> str | None:
        for field, label in ((p.prompt_field, "prompt"), (p.answer_field, "answer")):
            if field not in row:
                return f"missing {label} field {field!r}"
            if _as_text(row[field]) is None:
                return f"empty {label} field {field!r}"
        return None
