"""The interface between the pipeline and its stages.

A stage declares:
- ``kind`` and ``version`` (bump ``version`` when outputs change meaning). With
  ``code_hash = True`` (the default, for cheap stages) the fingerprint also hashes the
  stage module's source and the project modules it uses; an expensive stage sets it to
  False and is keyed by ``version`` alone, bumped by hand;
- ``Params``: a pydantic model (``extra="forbid"``) validated from the config;
- ``requires``: the modules it needs at run time (``vllm``, ``trl``, ``ray.train``), checked
  when the config loads, as datatrove's ``_requires_dependencies`` does;
- ``inputs`` / ``outputs``: artifact name -> type (``dataset`` or ``model``);
  inputs listed in ``optional_inputs`` may be left unwired;
- ``input_columns`` / ``output_columns`` (or the methods ``needs()`` / ``produces()`` when
  they depend on params): the columns a dataset input must have, with a type family
  (``string``, ``int``, ``float``, ``number``, ``bool``, ``list``, ``messages``, ``any``;
  ``"a|b"`` means at least one of the columns), and each dataset output's schema (a
  ``pa.Schema``, or ``Passthrough(input, added)`` for "the input's columns plus these").
  ``load_config`` checks every wiring against them before Ray starts; ``ctx`` checks each
  committed output against its declared schema. A stage that declares nothing is not checked;
- ``checkpoint_identity()``: for stages with row-level checkpoints, what determines a
  row's output (e.g. model hash, sampling settings, a format version), so checkpoints
  survive edits that change nothing a row depends on;
- ``deterministic()``: False when a re-run on the same inputs may write other rows (sampling
  without a seed): downstream stages then key on its fingerprint, not on its outputs' content;
- ``external_fingerprint()``: hashes of anything outside the DAG it reads
  (source files, model folders), so the cache notices when they change;
- ``check()``: problems found before Ray starts (missing files), as
  ``(field, message)`` pairs;
- ``run(ctx)``: the work, reading inputs and writing outputs through ``ctx``. Every row a
  stage does not pass on is counted with ``ctx.drop(kind, reason, n)``; the counts land in
  each committed dataset's manifest as ``stats.dropped = {kind: {reason: count}}`` and in
  the stage record as ``dropped``.

Params fields carry one of two markers, ``Field(..., json_schema_extra=NOT_OUTPUT)`` or
``NOT_SAMPLE``:
- ``NOT_OUTPUT``: the field does not change the stage's output (replica counts, resources,
  batch sizes, error budgets, a model *path* whose files key the stage through
  ``external_fingerprint``): it keys neither the stage nor its row-level checkpoints;
- ``NOT_SAMPLE``: it changes which rows or how many (adaptive stopping rules), never the
  content of one row: it keys the stage, not its row-level checkpoints
  (``sample_params``, from which a stage derives its ``checkpoint_identity``).
Every other field keys both, so a new field is in every key unless it is marked out.
A field added later with ``json_schema_extra=KEYED_WHEN_SET`` (it may be merged into either
marker) keys only when it differs from its default: switched off, it leaves the keys of
stages and checkpoints made before it existed as they were.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, ClassVar, Iterable

import pyarrow as pa
from pydantic import BaseModel

from pipeline.core.errors import StageError, conform
from pipeline.core.ids import sha256_hex
from pipeline.store.storage import Storage

log = logging.getLogger("distill")


def _source(module: ModuleType) -> str:
    """A module's source, and the text of the files it declares its code reads (``CODE_FILES``,
    e.g. programs shipped as package data)."""
    try:
        text = inspect.getsource(module)
    except (OSError, TypeError):
        return module.__name__
    return chr(0).join([text, *(Path(f).read_text(encoding="utf-8") for f in getattr(module, "CODE_FILES", ()))])


def _local_modules(root: ModuleType) -> set[ModuleType]:
    """``root`` and the modules of its package tree it refers to, transitively."""
    top = root.__name__.split(".")[0]
    found: dict[str, ModuleType] = {}
    todo = [root]
    while todo:
        mod = todo.pop()
        if mod.__name__ in found:
            continue
        found[mod.__name__] = mod
        for value in vars(mod).values():
            name = value.__name__ if isinstance(value, ModuleType) else getattr(value, "__module__", None)
            if isinstance(name, str) and name.split(".")[0] == top and name not in found:
                dep = sys.modules.get(name)
                if dep is not None:
                    todo.append(dep)
    return set(found.values())


# -- column contracts --------------------------------------------------------------------------

TYPE_FAMILIES = ("string", "int", "float", "number", "bool", "list", "messages", "any")


@dataclass(frozen=True)
class Passthrough:
    """An output schema: the columns of dataset input ``input``, plus ``added``."""

    input: str
    added: pa.Schema = field(default_factory=lambda: pa.schema([]))


def type_matches(want: str, got: pa.DataType) -> bool:
    """Whether an Arrow type is of a declared type family (or its exact Arrow type name)."""
    if want == "any":
        return True
    if want == "string":
        return pa.types.is_string(got) or pa.types.is_large_string(got)
    if want == "int":
        return pa.types.is_integer(got)
    if want == "float":
        return pa.types.is_floating(got)
    if want == "number":
        return pa.types.is_integer(got) or pa.types.is_floating(got)
    if want == "bool":
        return pa.types.is_boolean(got)
    if want == "list":
        return pa.types.is_list(got) or pa.types.is_large_list(got)
    if want == "messages":
        if not (pa.types.is_list(got) or pa.types.is_large_list(got)) or not pa.types.is_struct(got.value_type):
            return False
        names = {got.value_type.field(i).name: got.value_type.field(i).type for i in range(got.value_type.num_fields)}
        return all(k in names and type_matches("string", names[k]) for k in ("role", "content"))
    return str(got) == want


def column_problems(needs: dict[str, str], have: dict[str, pa.DataType]) -> list[str]:
    """What ``have`` (column -> type) lacks of ``needs`` (column or ``a|b`` -> type family)."""
    out = []
    for col, want in needs.items():
        options = col.split("|")
        present = [c for c in options if c in have]
        if not present:
            alts = " or ".join(repr(c) for c in options)
            out.append(f"no column {alts} (needs {want}; has: {', '.join(have) or 'none'})")
            continue
        if not any(type_matches(want, have[c]) for c in present):
            out.append(f"column {present[0]!r} is {have[present[0]]}, needs {want}")
    return out


def missing_modules(names: Iterable[str]) -> list[str]:
    """The modules of ``names`` that cannot be imported here (found without importing them)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package is missing, or broken
            found = False
        if not found:
            missing.append(name)
    return missing


def schema_columns(schema: pa.Schema) -> dict[str, pa.DataType]:
    return {f.name: f.type for f in schema}


# -- stages ------------------------------------------------------------------------------------

class Stage:
    kind: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    # True: the fingerprint hashes the module sources too (cheap stages); False: ``version`` only,
    # bumped by hand (expensive stages, where a comment edit must not redo the work).
    code_hash: ClassVar[bool] = True
    Params: ClassVar[type[BaseModel]]
    inputs: ClassVar[dict[str, str]] = {}
    optional_inputs: ClassVar[frozenset[str]] = frozenset()
    outputs: ClassVar[dict[str, str]] = {}
    # dataset input -> {column (or "a|b"): type family}; dataset output -> schema or Passthrough
    input_columns: ClassVar[dict[str, dict[str, str]]] = {}
    output_columns: ClassVar[dict[str, Any]] = {}
    # Inputs whose content does not key the stage's checkpoints: a stage that works per row
    # (e.g. generation per prompt) can then reuse what it committed for other inputs, so
    # adding rows to a source only pays for the new rows.
    checkpoint_ignores_inputs: ClassVar[frozenset[str]] = frozenset()
    # Inputs that take every variant of an expanded (matrix) stage rather than one (compare's
    # ``runs``); ``check_variants`` then checks what was wired to them.
    variadic_inputs: ClassVar[frozenset[str]] = frozenset()
    # Modules the stage needs at run time (e.g. "vllm", "trl", "ray.train"): ``load_config``
    # (so ``plan`` and ``run``, before Ray starts) reports any that cannot be imported here.
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, params: BaseModel):
        self.name = name
        self.params = params

    @classmethod
    def code_version(cls) -> str:
        """``version``, plus (with ``code_hash``) a hash of the stage module's source and of the
        sibling modules it uses (same top-level package, transitively): editing a stage or a
        helper it imports invalidates its cache."""
        module = inspect.getmodule(cls)
        if module is None or not cls.code_hash:
            return cls.version
        sources = [_source(m) for m in sorted(_local_modules(module), key=lambda m: m.__name__)]
        return f"{cls.version}:{sha256_hex(chr(0).join(sources))[:12]}"

    def fingerprint_params(self) -> dict:
        return fingerprint_params(self.params)

    def external_fingerprint(self) -> dict:
        return {}

    def checkpoint_identity(self) -> dict | None:
        """What determines the output of the stage's row-level checkpoints, or None: keyed then
        by the stage fingerprint without ``checkpoint_ignores_inputs``. The inputs not in
        ``checkpoint_ignores_inputs`` key the checkpoints either way."""
        return None

    def deterministic(self) -> bool:
        """Whether a re-run on the same inputs writes the same rows. Downstream stages key on
        the content digests of a deterministic stage's outputs (a re-run that wrote the same
        rows leaves them cached); on the fingerprint of a stage that is not (its record says so)."""
        return True

    def needs(self) -> dict[str, dict[str, str]]:
        """Columns each dataset input must have (default: ``input_columns``)."""
        return self.input_columns

    def produces(self) -> dict[str, Any]:
        """Each dataset output's schema or ``Passthrough`` (default: ``output_columns``)."""
        return self.output_columns

    def check(self) -> list[tuple[str, str]]:
        return []

    def check_variants(self, keys: list[str]) -> list[tuple[str, str]]:
        """Problems (field, message) with the input keys wired to ``variadic_inputs``."""
        return []

    def run(self, ctx: "StageContext") -> None:
        raise NotImplementedError


# Params markers (module docstring): ``Field(..., json_schema_extra=NOT_OUTPUT)``.
NOT_OUTPUT = {"changes_output": False}  # keys neither the stage nor its row checkpoints
NOT_SAMPLE = {"changes_sample": False}  # keys the stage, not its row checkpoints
KEYED_WHEN_SET = {"keyed_when_set": True}  # a later option: at its default it keys nothing


def _marks(f) -> dict:
    extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
    return {"output": extra.get("changes_output", True),
            "sample": extra.get("changes_sample", True)}


def _keyed_params(params: BaseModel, skip: tuple[str, ...]) -> dict:
    out = {}
    for name, f in type(params).model_fields.items():
        marks = _marks(f)
        if any(not marks[m] for m in skip):
            continue
        value = getattr(params, name)
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        if extra.get("keyed_when_set") and value == f.get_default(call_default_factory=True):
            continue
        if isinstance(value, BaseModel):
            out[name] = _keyed_params(value, skip)
        else:
            out[name] = params.model_dump(mode="json", include={name})[name]
    return out


def fingerprint_params(params: BaseModel) -> dict:
    """The params that define a stage's output: fields not marked ``NOT_OUTPUT``, recursing
    into nested models."""
    return _keyed_params(params, ("output",))


def sample_params(params: BaseModel) -> dict:
    """The params that determine one row of a stage's row-level checkpoints: fields marked
    neither ``NOT_OUTPUT`` nor ``NOT_SAMPLE``, recursing into nested models."""
    return _keyed_params(params, ("output", "sample"))


def flat_params(params: dict, prefix: str = "") -> dict[str, Any]:
    """``{"sampling": {"n": 2}}`` -> ``{"sampling.n": 2}``: the names ``distill plan`` reports."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# quarantined: unusable input rows kept aside with their reason; removed: rows a filter left
# out; rejected: rows passed on marked as failing a check; errored: rows whose work failed.
DROP_KINDS = ("quarantined", "removed", "rejected", "errored")


@dataclass
class Artifact:
    """A committed output of some stage: where it lives and what kind it is."""

    type: str  # "dataset" | "model"
    path: str  # storage path (no protocol)
    uri: str  # full URI
    fingerprint: str  # fingerprint of the stage that made it


class Progress:
    """A progress handle; the runner's implementation draws a bar."""

    def advance(self, n: int = 1) -> None:  # pragma: no cover - trivial default
        pass

    def update(self, completed: int, total: int | None = None, info: str = "") -> None:  # pragma: no cover
        """Set the position (and the total, and a short status such as loss or ETA)."""

    def close(self) -> None:  # pragma: no cover
        pass


ProgressFactory = Callable[[str, "int | None"], Progress]


@dataclass
class StageContext:
    name: str
    kind: str
    fingerprint: str
    run_id: str
    storage: Storage
    inputs: dict[str, Artifact]
    output_root: str
    output_types: dict[str, str]
    # Shared by every attempt at this fingerprint: partial results committed here survive
    # a crashed or killed run, so the next attempt can resume instead of redoing them.
    checkpoint_root: str = ""
    pipeline: str = ""  # the name of the pipeline the run belongs to
    progress_factory: ProgressFactory | None = None
    # declared output schemas (``Stage.produces()``): commits are checked against them
    output_columns: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    written: dict[str, Artifact] = field(default_factory=dict)
    # output -> the version it replaces (the pipeline's latest/ pointer before this run), linked from lineage
    previous: dict[str, dict] = field(default_factory=dict)

    # -- lineage -----------------------------------------------------------
    def lineage(self, output: str) -> dict:
        return {
            "run_id": self.run_id,
            "stage": self.name,
            "kind": self.kind,
            "output": output,
            "fingerprint": self.fingerprint,
            "parents": {k: {"uri": a.uri, "fingerprint": a.fingerprint} for k, a in self.inputs.items()},
            **({"previous": self.previous[output]} if output in self.previous else {}),
        }

    def output_path(self, output: str) -> str:
        if output not in self.output_types:
            raise StageError(f"stage {self.name!r} has no declared output {output!r}")
        return f"{self.output_root}/{output}"

    # -- inputs ------------------------------------------------------------
    def has_input(self, name: str) -> bool:
        return name in self.inputs

    def read_input(self, name: str, columns: list[str] | None = None) -> pa.Table:
        art = self.inputs[name]
        if art.type != "dataset":
            raise StageError(f"input {name!r} of stage {self.name!r} is a {art.type}, not a dataset")
        return self.storage.read_dataset(art.path, columns=columns)

    def input_rows(self, name: str) -> int:
        """Rows of a dataset input, from its manifest."""
        return int(self.storage.dataset_manifest(self.inputs[name].path)["rows"])

    def iter_input(self, name: str, columns: list[str] | None = None, batch_rows: int = 8192) -> Iterable[pa.Table]:
        """A dataset input as a stream of tables of at most ``batch_rows`` rows, in order: what a
        stage body reads in the driver without holding the whole input."""
        art = self.inputs[name]
        if art.type != "dataset":
            raise StageError(f"input {name!r} of stage {self.name!r} is a {art.type}, not a dataset")
        return self.storage.iter_dataset(art.path, columns=columns, batch_rows=batch_rows)

    def input_pieces(self, name: str, target_bytes: int | None = None, max_rows: int | None = None) -> list:
        """A dataset input cut into pieces for workers (``pipeline.core.streaming``): metadata only."""
        from pipeline.core.streaming import plan_pieces

        art = self.inputs[name]
        if art.type != "dataset":
            raise StageError(f"input {name!r} of stage {self.name!r} is a {art.type}, not a dataset")
        return plan_pieces(self.storage, art.path, target_bytes, max_rows)

    def input_schema(self, name: str) -> pa.Schema:
        from pipeline.store.storage import manifest_schema

        return manifest_schema(self.storage.dataset_manifest(self.inputs[name].path))

    def output_spec(self, output: str, schema: pa.Schema | None = None):
        """Where workers write their shards of ``output`` (``pipeline.core.streaming.ShardSpec``): rows
        are conformed to ``schema``, else to the declared schema."""
        from pipeline.core.streaming import ShardSpec

        declared = self.output_columns.get(output)
        if schema is None and isinstance(declared, pa.Schema):
            schema = declared
        return ShardSpec(self.storage, self.output_path(output), self.name, output, schema)

    def map_pieces(self, input: str, fn: Callable, outputs: dict[str, pa.Schema],
                   columns: list[str] | None = None) -> int:
        """Stream ``input`` through ``fn`` on the cluster's workers (``pipeline.core.streaming.map_pieces``):
        ``fn(table)`` returns ``({output: table}, {kind: {reason: count}})``."""
        from pipeline.core.streaming import map_pieces

        return map_pieces(self, input, fn, outputs, columns)

    def commit_shards(self, output: str, shards: list[dict], schema: pa.Schema | None = None,
                      stats: dict | None = None) -> dict:
        """Publish an output from the shards workers wrote (in order), as ``commit_dataset`` does
        for a driver-side writer: schema checked, drop counts and ``stats`` in the manifest."""
        declared = self.output_columns.get(output)
        if schema is None and isinstance(declared, pa.Schema):
            schema = declared
        if schema is None:
            raise StageError(f"stage {self.name!r} output {output!r}: no schema to commit with")
        self._check_schema(output, schema)
        path = self.output_path(output)
        if not shards:  # an empty dataset still carries its schema for readers
            shards = self.storage.dataset_writer(path, {}).finish(schema)
        stats = {**(stats or {}), "dropped": {k: dict(v) for k, v in self.dropped.items()}}
        manifest = self.storage.commit_shards(path, shards, schema, self.lineage(output), stats)
        self.rows[output] = manifest["rows"]
        self.written[output] = Artifact("dataset", path, self.storage.uri(path), self.fingerprint)
        return manifest

    def model_uri(self, name: str, param: str | None) -> str:
        """The model wired as input ``name``, else the ``param`` path/URI of the same name."""
        if name in self.inputs:
            return self.inputs[name].uri
        if param:
            return param
        raise StageError(f"stage {self.name!r}: set params.{name} or wire input '{name}'")

    # -- outputs -----------------------------------------------------------
    def committed_checkpoints(self) -> list[str]:
        """Paths of the checkpoint datasets committed under ``checkpoint_root`` so far."""
        return [p for p in self.storage.ls(self.checkpoint_root)
                if self.storage.exists(f"{p}/_manifest.json")]

    def checkpoint_writer(self, name: str):
        return self.storage.dataset_writer(f"{self.checkpoint_root}/{name}", self.lineage("checkpoint"))

    def dataset_writer(self, output: str, rows_per_shard: int = 50_000):
        return self.storage.dataset_writer(self.output_path(output), self.lineage(output), rows_per_shard)

    def commit_dataset(self, output: str, writer, schema: pa.Schema | None = None, stats: dict | None = None) -> dict:
        """Publish an output. Its manifest's ``stats`` holds ``stats`` plus ``dropped``: the rows
        this stage did not pass on so far (``drop``), ``{kind: {reason: count}}``."""
        declared = self.output_columns.get(output)
        if isinstance(declared, pa.Schema) and schema is None:
            schema = declared
        try:
            self._check_schema(output, writer.schema or schema)
        except StageError:
            writer.close()  # publishes nothing
            raise
        stats = {**(stats or {}), "dropped": {k: dict(v) for k, v in self.dropped.items()}}
        manifest = writer.commit(schema, stats=stats)
        self.rows[output] = manifest["rows"]
        path = self.output_path(output)
        self.written[output] = Artifact("dataset", path, self.storage.uri(path), self.fingerprint)
        return manifest

    def write_dataset(self, output: str, tables: Iterable[pa.Table], schema: pa.Schema | None = None,
                      stats: dict | None = None) -> dict:
        """Write and commit an output through its declared schema (``schema`` defaults to it);
        ``stats`` (e.g. ``{"input_rows": n}``) and the drop counts go into its manifest, so
        inspection reads them without the run records."""
        declared = self.output_columns.get(output)
        if schema is None and isinstance(declared, pa.Schema):
            schema = declared
        writer = self.dataset_writer(output)
        for t in tables:
            writer.write(t if schema is None or t.schema == schema else conform(t, schema, self.name, output))
        return self.commit_dataset(output, writer, schema, stats)

    def _check_schema(self, output: str, schema: pa.Schema | None) -> None:
        """A committed output has every declared column with its declared type."""
        declared = self.output_columns.get(output)
        if declared is None or schema is None:
            return
        want = declared if isinstance(declared, pa.Schema) else declared.added
        have = schema_columns(schema)
        for f in want:
            if f.name not in have:
                raise StageError(f"stage {self.name!r} output {output!r}: declared column {f.name!r} is missing")
            if have[f.name] != f.type:
                raise StageError(f"stage {self.name!r} output {output!r}: column {f.name!r} is {have[f.name]}, "
                                 f"declared {f.type}")

    # -- rows not passed on --------------------------------------------------
    def drop(self, kind: str, reason: str, n: int = 1) -> None:
        """Count ``n`` rows this stage did not pass on (or passed on marked bad), with why:
        ``kind`` is one of ``DROP_KINDS``, ``reason`` a short code."""
        if kind not in DROP_KINDS:
            raise ValueError(f"unknown drop kind {kind!r} (one of {', '.join(DROP_KINDS)})")
        if n:
            by_reason = self.dropped.setdefault(kind, {})
            by_reason[reason] = by_reason.get(reason, 0) + int(n)

    def drop_counts(self, kind: str, reasons: "dict[str, int] | Iterable[str]") -> None:
        """``drop`` for many rows: a ``{reason: count}`` mapping or one reason per row."""
        items = reasons.items() if isinstance(reasons, dict) else ((r, 1) for r in reasons)
        for reason, n in items:
            self.drop(kind, reason, n)

    def put_model(self, output: str, local_dir: str | Path) -> dict:
        path = self.output_path(output)
        manifest = self.storage.put_tree(local_dir, path, self.lineage(output))
        self.written[output] = Artifact("model", path, self.storage.uri(path), self.fingerprint)
        return manifest

    def adopt(self, output: str, type_: str) -> None:
        """Record an output that remote work committed straight to ``output_path(output)``."""
        path = self.output_path(output)
        if type_ == "dataset":
            self.rows[output] = self.storage.dataset_manifest(path)["rows"]
        else:
            self.storage.tree_manifest(path)
        self.written[output] = Artifact(type_, path, self.storage.uri(path), self.fingerprint)

    def scratch_dir(self) -> str:
        return tempfile.mkdtemp(prefix=f"distill-{self.name}-")

    # -- reporting ---------------------------------------------------------
    def progress(self, description: str, total: int | None = None) -> Progress:
        if self.progress_factory is None:
            return Progress()
        return self.progress_factory(f"{self.name}: {description}", total)

    def log(self, msg: str) -> None:
        log.info("[%s] %s", self.name, msg)
