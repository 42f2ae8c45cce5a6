"""The interface between the pipeline and its stages.

A stage declares:
- ``kind`` and ``version`` (bump ``version`` when outputs change meaning);
- ``Params``: a pydantic model (``extra="forbid"``) validated from the config;
- ``inputs`` / ``outputs``: artifact name -> type (``dataset`` or ``model``);
  inputs listed in ``optional_inputs`` may be left unwired;
- ``external_fingerprint()``: hashes of anything outside the DAG it reads
  (source files, model folders), so the cache notices when they change;
- ``check()``: problems found before Ray starts (missing files), as
  ``(field, message)`` pairs;
- ``run(ctx)``: the work, reading inputs and writing outputs through ``ctx``.

Params fields marked ``Field(..., json_schema_extra={"fingerprint": False})``
(replica counts, resources, batch sizes) do not change a stage's fingerprint.
"""
from __future__ import annotations

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

from .ids import sha256_hex
from .storage import Storage

log = logging.getLogger("distill")


def _source(module: ModuleType) -> str:
    try:
        return inspect.getsource(module)
    except (OSError, TypeError):
        return module.__name__


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


class StageError(RuntimeError):
    """A stage failed for a reason worth showing the user as-is."""


class Stage:
    kind: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    Params: ClassVar[type[BaseModel]]
    inputs: ClassVar[dict[str, str]] = {}
    optional_inputs: ClassVar[frozenset[str]] = frozenset()
    outputs: ClassVar[dict[str, str]] = {}
    # Inputs whose content does not key the stage's checkpoints: a stage that works per row
    # (e.g. generation per prompt) can then reuse what it committed for other inputs, so
    # adding rows to a source only pays for the new rows.
    checkpoint_ignores_inputs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str, params: BaseModel):
        self.name = name
        self.params = params

    @classmethod
    def code_version(cls) -> str:
        """``version`` plus a hash of the stage module's source and of the sibling modules it
        uses (same top-level package, transitively): editing a stage or a helper it
        imports invalidates its cache."""
        module = inspect.getmodule(cls)
        if module is None:
            return cls.version
        sources = [_source(m) for m in sorted(_local_modules(module), key=lambda m: m.__name__)]
        return f"{cls.version}:{sha256_hex(chr(0).join(sources))[:12]}"

    def fingerprint_params(self) -> dict:
        return fingerprint_params(self.params)

    def external_fingerprint(self) -> dict:
        return {}

    def check(self) -> list[tuple[str, str]]:
        return []

    def run(self, ctx: "StageContext") -> None:
        raise NotImplementedError


def fingerprint_params(params: BaseModel) -> dict:
    """The params that define a stage's output: fields not marked ``fingerprint: False``,
    recursing into nested models."""
    out = {}
    for name, f in type(params).model_fields.items():
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        if not extra.get("fingerprint", True):
            continue
        value = getattr(params, name)
        if isinstance(value, BaseModel):
            out[name] = fingerprint_params(value)
        else:
            out[name] = params.model_dump(mode="json", include={name})[name]
    return out


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
    progress_factory: ProgressFactory | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    written: dict[str, Artifact] = field(default_factory=dict)

    # -- lineage -----------------------------------------------------------
    def lineage(self, output: str) -> dict:
        return {
            "run_id": self.run_id,
            "stage": self.name,
            "kind": self.kind,
            "output": output,
            "fingerprint": self.fingerprint,
            "parents": {k: {"uri": a.uri, "fingerprint": a.fingerprint} for k, a in self.inputs.items()},
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
        manifest = writer.commit(schema, stats=stats)
        self.rows[output] = manifest["rows"]
        path = self.output_path(output)
        self.written[output] = Artifact("dataset", path, self.storage.uri(path), self.fingerprint)
        return manifest

    def write_dataset(self, output: str, tables: Iterable[pa.Table], schema: pa.Schema | None = None,
                      stats: dict | None = None) -> dict:
        """Write and commit an output; ``stats`` (e.g. ``{"removed": {reason: count}}``) goes
        into its manifest, so inspection reads it without the run records."""
        writer = self.dataset_writer(output)
        writer.write_many(tables)
        return self.commit_dataset(output, writer, schema, stats)

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
