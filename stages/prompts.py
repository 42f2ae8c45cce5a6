"""prompts: read a prompt set from JSONL or Parquet files (local or any fsspec URI).

Output ``prompts``: ``prompt_id`` (hash of the normalised prompt), ``prompt``,
``answer`` (as text), ``source``, ``metadata`` (JSON of the other fields).
Output ``quarantine``: rows that cannot be used, each with its ``reason``:
invalid UTF-8, invalid JSON (including nesting too deep to parse), a line that
is not a JSON object, a missing or empty (null, blank) prompt or answer, a
prompt that is not a string or an answer that is neither a string nor a number,
a lone surrogate (``"\\ud800"``) in the prompt or answer, a duplicate of an
earlier prompt. No input row is dropped silently: ``rows.prompts +
rows.quarantine`` equals the number of input rows (``metrics.input_rows``;
blank JSONL lines are not rows and are counted in ``metrics.blank_lines``).
"""
from __future__ import annotations

import json
import numbers
from typing import Any, ClassVar, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from pipeline.core import resources
from pipeline.core.ids import prompt_id
from pipeline.core.stage import Stage, StageContext, StageError

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
    """(row number, row or None, error or None, raw text); a blank JSONL line comes as
    (line number, None, None, "")."""
    if fmt == "parquet":
        yield from _read_parquet(path)
        return
    with fsspec.open(path, "rb") as f:
        for i, line in enumerate(f, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield i, None, f"invalid UTF-8: {e.reason} at byte {e.start}", line.decode("utf-8", "replace")
                continue
            if i == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not text.strip():
                yield i, None, None, ""
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield i, None, f"invalid JSON: {e.msg} at column {e.colno}", text
                continue
            except RecursionError:
                yield i, None, "invalid JSON: nested too deeply", text
                continue
            except ValueError as e:  # e.g. an integer longer than Python converts
                yield i, None, f"invalid JSON: {e}", text
                continue
            if not isinstance(row, dict):
                yield i, None, f"expected a JSON object, got {type(row).__name__}", text
                continue
            yield i, row, None, text


def _read_parquet(path: str, batch_rows: int = 10_000) -> Iterator[tuple[int, dict | None, str | None, str]]:
    """Rows batch by batch; a value that is not valid UTF-8 spoils only its own row."""
    n = 0
    with fsspec.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
            columns: dict[str, list] = {}
            errors: dict[int, str] = {}
            for name, col in zip(batch.schema.names, batch.columns):
                try:
                    columns[name] = col.to_pylist()
                except UnicodeDecodeError:
                    values = []
                    for j in range(len(col)):
                        try:
                            values.append(col[j].as_py())
                        except UnicodeDecodeError:
                            try:  # shown in the quarantine's raw text with replacement characters
                                values.append(col[j].cast(pa.binary()).as_py().decode("utf-8", "replace"))
                            except (pa.ArrowException, AttributeError):
                                values.append(None)
                            errors.setdefault(j, f"invalid UTF-8 in field {name!r}")
                    columns[name] = values
            for j in range(batch.num_rows):
                n += 1
                row = {name: values[j] for name, values in columns.items()}
                if j in errors:
                    yield n, None, errors[j], json.dumps(row, default=str, ensure_ascii=False)
                else:
                    yield n, row, None, ""


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN
        return None
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if text.strip() else None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _clean(text: str) -> str:
    # lone surrogates cannot be stored as UTF-8; make them visible instead of failing
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _json(value: Any) -> str:
    """A row or its metadata as JSON text, any value that JSON lacks as its ``str``."""
    return json.dumps(value, default=str, ensure_ascii=False)


class _Outputs:
    """The two outputs' writers, the rows not written yet and the counts of rows kept, quarantined and blank."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.writers = {"prompts": ctx.dataset_writer("prompts"), "quarantine": ctx.dataset_writer("quarantine")}
        self.good: list[dict] = []
        self.bad: list[dict] = []
        self.kept = self.quarantined = self.blank = 0

    def keep(self, row: dict) -> None:
        """Adds a usable prompt row."""
        self.good.append(row)
        self.kept += 1
        self.flush()

    def quarantine(self, source: str, n: int, reason: str, raw: str) -> None:
        """Adds an unusable row with its reason, counted as quarantined under the reason's first words."""
        self.bad.append({"source": source, "row_number": n, "reason": reason, "raw": _clean(raw)[:20000]})
        self.quarantined += 1
        self.ctx.drop("quarantined", reason.split(":")[0].split(" (")[0])
        self.flush()

    def flush(self, final: bool = False) -> None:
        """Writes each output's pending rows once 4096 are waiting, or all of them when ``final``."""
        for out, rows, schema in (("prompts", self.good, PROMPTS_SCHEMA), ("quarantine", self.bad, QUARANTINE_SCHEMA)):
            if rows and (final or len(rows) >= 4096):
                self.writers[out].write(pa.Table.from_pylist(rows, schema=schema))
                rows.clear()

    def close(self) -> None:
        """Closes both writers without publishing anything."""
        for w in self.writers.values():
            w.close()


class Prompts(Stage):
    kind: ClassVar[str] = "prompts"
    Params = Params
    outputs: ClassVar[dict] = {"prompts": "dataset", "quarantine": "dataset"}
    output_columns: ClassVar[dict] = {"prompts": PROMPTS_SCHEMA, "quarantine": QUARANTINE_SCHEMA}

    def check(self) -> list[tuple[str, str]]:
        problems = []
        for path in _paths(self.params):
            if not resources.expand(path):
                problems.append(("path", f"no prompt file found at {path}"))
        return problems

    def external_fingerprint(self) -> dict:
        return {f: resources.file_fingerprint(f) for path in _paths(self.params) for f in resources.expand(path)}

    def run(self, ctx: StageContext) -> None:
        """Streams: rows are read incrementally and written in batches; the driver keeps one
        entry per distinct prompt (to name a repeated one's first occurrence), never the rows."""
        p: Params = self.params
        seen: dict[str, str] = {}
        files = [f for path in _paths(p) for f in resources.expand(path)]
        if not files:
            raise StageError(f"no prompt files found at {p.path}")
        out = _Outputs(ctx)
        try:
            for file in files:
                self._read_file(file, p, out, seen)
            out.flush(final=True)
        except BaseException:
            out.close()  # publishes nothing
            raise
        stats = {"input_rows": out.kept + out.quarantined}
        ctx.commit_dataset("prompts", out.writers["prompts"], PROMPTS_SCHEMA, stats=stats)
        ctx.commit_dataset("quarantine", out.writers["quarantine"], QUARANTINE_SCHEMA, stats=stats)
        ctx.metrics.update({"files": len(files), "input_rows": out.kept + out.quarantined, "blank_lines": out.blank,
                            # kept for readers of older records; the counts live in ``dropped``
                            "quarantine_reasons": dict(ctx.dropped.get("quarantined", {}))})

    def _read_file(self, file: str, p: Params, out: _Outputs, seen: dict[str, str]) -> None:
        """One file's rows into the outputs, until ``limit`` usable rows are kept in all."""
        source = p.source or _source_name(file)
        for n, row, err, raw in _read_rows(file, _fmt(file, p.format)):
            if p.limit is not None and out.kept >= p.limit:
                break
            if row is None and err is None:
                out.blank += 1
                continue
            if err is None:
                err = self._problem(row, p)
            if err is not None:
                out.quarantine(source, n, err, raw or _json(row))
                continue
            prompt = _clean(_as_text(row[p.prompt_field]))
            if p.prompt_template:
                prompt = p.prompt_template.format(prompt=prompt)
            pid = prompt_id(prompt)
            if pid in seen:
                out.quarantine(source, n, f"duplicate prompt (same as {seen[pid]})", _json(row))
                continue
            seen[pid] = f"{source}#{n}"
            meta = {k: v for k, v in row.items() if k not in (p.prompt_field, p.answer_field)}
            out.keep({"prompt_id": pid, "prompt": prompt, "answer": _clean(_as_text(row[p.answer_field])),
                      "source": source, "metadata": _clean(_json(meta))})

    @staticmethod
    def _problem(row: dict, p: Params) -> str | None:
        for field, label in ((p.prompt_field, "prompt"), (p.answer_field, "answer")):
            if field not in row:
                return f"missing {label} field {field!r}"
            value = row[field]
            if _as_text(value) is None:  # null, NaN, blank
                return f"empty {label} field {field!r}"
            if label == "prompt" and not isinstance(value, str):
                return f"wrong type for prompt field {field!r}: {type(value).__name__}, expected a string"
            if label == "answer" and (isinstance(value, bool) or not isinstance(value, (str, numbers.Number))):
                return f"wrong type for answer field {field!r}: {type(value).__name__}, expected a string or a number"
            if isinstance(value, str) and _has_surrogate(value):
                return f"invalid Unicode in {label} field {field!r}: lone surrogate"
        return None
