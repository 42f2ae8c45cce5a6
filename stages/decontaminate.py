"""decontaminate: drop training rows whose prompts (optionally completions) share a word
n-gram with an evaluation set, and report which eval item each matched.

Eval sets are named benchmarks (``eval_sets``: ``gsm8k``, ``math500``, ``aime24``,
``amc23`` or ``all``, registered in ``stages.common.eval_sets`` and read under
``eval_data_root``, by default ``../shared/data``), files (``eval_files``: JSONL/Parquet
with a text field) and/or an upstream dataset wired as input ``eval`` (e.g. the run's
own held-out prompts). N-grams come from
``stages.common.ngrams``: texts are lower-cased and split into words and punctuation
marks (so ``3 + 4`` and ``3 - 4`` differ); a text shorter than ``ngram`` words counts
as one n-gram, so short exact copies are caught too.

Input ``samples``: rows with ``messages`` (user turns are the prompt, assistant
turns the completion) or ``prompt`` / ``completion`` columns.
Outputs: ``clean`` (same schema as the input) and ``contaminated``
(prompt_id, sample_index, field, eval_source, eval_id, eval_text, ngram). Each removed
row is counted as ``removed`` with reason ``contaminated:<eval set>``.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import ClassVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.core import resources
from pipeline.core.stage import Passthrough, Stage, StageContext, StageError
from stages.common.eval_sets import DEFAULT_DATA_ROOT, EVAL_SETS
from stages.common.ngrams import DEFAULT_NGRAM, Index, row_text

SNIFF_ROWS = 100  # rows of each eval file that check() reads
REPORT_SCHEMA = pa.schema(
    [("prompt_id", pa.string()), ("sample_index", pa.int32()), ("field", pa.string()), ("eval_source", pa.string()),
     ("eval_id", pa.string()), ("eval_text", pa.string()), ("ngram", pa.string())]
)


class EvalFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    field: str = Field(description="the text field to index, e.g. question / problem")
    id_field: str | None = None
    name: str | None = None
    strip_prefix: str | None = Field(None, description="boilerplate dropped from the front of each text")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eval_files: list[EvalFile] = Field(default_factory=list)
    eval_sets: list[str] = Field(default_factory=list,
                                 description=f"named benchmarks ({', '.join(EVAL_SETS)}, or all), under eval_data_root")
    eval_data_root: str = Field(DEFAULT_DATA_ROOT, description="folder or URI holding the named eval sets")
    ngram: int = Field(DEFAULT_NGRAM, ge=1)
    check_completions: bool = False

    @field_validator("eval_sets")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        if names == ["all"]:
            return list(EVAL_SETS)
        unknown = [n for n in names if n not in EVAL_SETS]
        if unknown:
            raise ValueError(f"unknown eval set(s) {unknown}; known: {sorted(EVAL_SETS)} or [all]")
        return names

    def files(self) -> list[EvalFile]:
        """The explicit eval files, then the named sets resolved under ``eval_data_root``."""
        root = self.eval_data_root.rstrip("/")
        return self.eval_files + [EvalFile(**{**EVAL_SETS[n], "path": f"{root}/{EVAL_SETS[n]['path']}"}, name=n)
                                  for n in self.eval_sets]


def _read_file(path: str) -> Iterator[dict]:
    """The rows of an eval file. A line that is not a JSON object is an error naming the file
    and line: a skipped eval item would be a hole in the contamination check."""
    if path.endswith(".parquet"):
        with fsspec.open(path, "rb") as f:
            yield from pq.read_table(f).to_pylist()
        return
    with fsspec.open(path, "rt", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StageError(f"eval file {path}, line {lineno}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise StageError(f"eval file {path}, line {lineno}: not a JSON object")
            yield row


def _text(row: dict, e: EvalFile) -> str | None:
    """The row's text to index (its ``field``, less ``strip_prefix``), or None if it has none."""
    text = row.get(e.field)
    if not isinstance(text, str):
        return None
    if e.strip_prefix and text.startswith(e.strip_prefix):
        text = text[len(e.strip_prefix):]
    return text if text.strip() else None


def _index_file(index: Index, e: EvalFile) -> int:
    """Index an eval file's texts; the number of rows without a usable text (missing, not a
    string, or blank). A file with no usable text at all is an error (a wrong ``field``)."""
    name = e.name or "/".join(e.path.rstrip("/").split("/")[-2:]).rsplit(".", 1)[0]
    added = skipped = 0
    fields: set[str] = set()
    for i, row in enumerate(_read_file(e.path)):
        text = _text(row, e)
        if text is not None:
            index.add(name, str(row.get(e.id_field, i) if e.id_field else i), text)
            added += 1
        else:
            skipped += 1
            fields.update(row)
    if not added:
        raise StageError(f"eval file {e.path} has no text in field {e.field!r} ({skipped} rows; "
                         f"fields seen: {sorted(fields)[:20]})")
    return skipped


class Decontaminate(Stage):
    kind: ClassVar[str] = "decontaminate"
    Params = Params
    inputs: ClassVar[dict] = {"samples": "dataset", "eval": "dataset"}
    optional_inputs: ClassVar[frozenset] = frozenset({"eval"})
    outputs: ClassVar[dict] = {"clean": "dataset", "contaminated": "dataset"}
    input_columns: ClassVar[dict] = {"samples": {"messages|prompt": "any"},
                                     "eval": {"prompt_id": "string", "prompt": "string"}}
    output_columns: ClassVar[dict] = {"clean": Passthrough("samples"), "contaminated": REPORT_SCHEMA}

    def check(self) -> list[tuple[str, str]]:
        """Each eval file exists, and its first rows have text in its field (a misspelt field
        would otherwise surface only when this stage runs, after everything upstream)."""
        errors = []
        explicit = len(self.params.eval_files)
        for i, e in enumerate(self.params.files()):
            # an explicit file is named by its own fields; a named set by eval_data_root / eval_sets
            where = (f"eval_files.{i}.path", f"eval_files.{i}.field") if i < explicit else (
                "eval_data_root", f"eval_sets ({e.name})")
            if not resources.exists(e.path):
                errors.append((where[0], f"no eval file at {e.path}"))
                continue
            try:
                head = list(itertools.islice(_read_file(e.path), SNIFF_ROWS))
            except StageError as exc:
                errors.append((where[0], str(exc)))
                continue
            if head and all(_text(r, e) is None for r in head):
                seen = sorted({k for r in head for k in r})[:20]
                msg = f"no text in field {e.field!r} in the first {len(head)} rows of {e.path} (fields: {seen})"
                errors.append((where[1], msg))
        return errors

    def external_fingerprint(self) -> dict:
        return {e.path: resources.file_fingerprint(e.path) for e in self.params.files()}

    def run(self, ctx: StageContext) -> None:
        p: Params = self.params
        index = Index(p.ngram)
        skipped = {e.path: n for e in p.files() if (n := _index_file(index, e))}
        if ctx.has_input("eval"):
            for row in ctx.read_input("eval", columns=["prompt_id", "prompt"]).to_pylist():
                index.add("run:eval", row["prompt_id"], row["prompt"])
        if index.items == 0:
            raise StageError("no eval texts to check against: set eval_sets or eval_files, or wire input 'eval'")

        import ray

        from pipeline.core.streaming import ordered, parallelism

        schema = ctx.input_schema("samples")
        specs = {"clean": ctx.output_spec("clean", schema), "contaminated": ctx.output_spec("contaminated", REPORT_SCHEMA)}
        index_ref = ray.put(index)  # the eval n-grams (small) go to every worker; the samples stream past
        task = ray.remote(num_cpus=1, max_retries=3, scheduling_strategy="SPREAD")(_check_piece)
        shards: dict[str, list] = {"clean": [], "contaminated": []}
        by_source: dict[str, int] = {}
        nodes: dict[str, int] = {}
        n = removed = 0
        for _, res in ordered(ctx.input_pieces("samples"),
                              lambda pc: task.remote(pc, index_ref, specs, p.check_completions), parallelism()):
            for out in shards:
                shards[out].extend(res[out])
            for src, k in res["sources"].items():
                by_source[src] = by_source.get(src, 0) + k
            n += res["rows"]
            removed += res["removed"]
            nodes[res["node"]] = nodes.get(res["node"], 0) + res["rows"]
        ctx.drop_counts("removed", {f"contaminated:{src}": k for src, k in by_source.items()})  # by eval set
        stats = {"input_rows": n}
        ctx.commit_shards("clean", shards["clean"], schema, stats=stats)
        ctx.commit_shards("contaminated", shards["contaminated"], REPORT_SCHEMA, stats=stats)
        ctx.metrics.update({"eval_items": index.items, "ngrams": len(index.grams), "input_rows": n,
                            "removed": removed, "eval_rows_without_text": skipped, "rows_per_node": nodes})


def _check_piece(piece, index: Index, specs: dict, check_completions: bool) -> dict:
    """One piece of the samples against the eval n-grams: its clean rows and its report rows
    written where it lies; back come shard lists and counts."""
    from pipeline.core.streaming import iter_piece, node_id

    clean, report_w = specs["clean"].writer(piece), specs["contaminated"].writer(piece)
    sources: dict[str, int] = {}
    i = piece.offset  # dataset row number (a row without sample_index is named by it)
    removed = 0
    for table in iter_piece(specs["clean"].storage, piece):
        keep, report = [], []
        for j, r in enumerate(table.to_pylist()):
            hit = None
            for role, field in (("user", "prompt"),) + ((("assistant", "completion"),) if check_completions else ()):
                m = index.match(row_text(r, role, field))
                if m:
                    hit = (field, *m)
                    break
            if hit is None:
                keep.append(j)
            else:
                field, gram, (source, item_id, text) = hit
                report.append({"prompt_id": r.get("prompt_id"), "sample_index": r.get("sample_index", i + j),
                               "field": field, "eval_source": source, "eval_id": item_id, "eval_text": text[:2000],
                               "ngram": gram})
                sources[source] = sources.get(source, 0) + 1
        i += table.num_rows
        removed += len(report)
        clean.write(table.take(keep))
        if report:
            report_w.write(pa.Table.from_pylist(report, schema=REPORT_SCHEMA))
    return {"clean": clean.finish(), "contaminated": report_w.finish(), "sources": sources,
            "rows": i - piece.offset, "removed": removed, "node": node_id()}
