"""Runs a pipeline DAG: fingerprints, cache lookups, execution on Ray, run manifests.

A stage's fingerprint hashes its kind, code version (see ``Stage.code_hash``),
output-defining params, external resources and its inputs' fingerprints. Paths come
from ``pipeline.layout``: outputs live under ``cache/<kind>/<fingerprint>/<attempt>/``;
the stage record ``cache/<kind>/<fingerprint>/_stage.json`` is written last (exclusive
create) and is what makes the stage count as done. A stage whose record exists is
reported as ``cached`` and does no work; a failed attempt leaves no record, so a
re-run starts that stage afresh in a new attempt folder. Row-level checkpoints live
under ``cache/<kind>/<checkpoint key>/checkpoints/``, keyed by ``Stage.checkpoint_identity()``.

Stage bodies run in the driver and put their heavy work on Ray (engine actors,
verification tasks, training tasks). Ray is started only when some stage has to
run, so a fully cached pipeline returns in seconds.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from . import layout
from .config import PipelineConfig
from .ids import fingerprint
from .provenance import run_provenance
from .secrets import redact
from .stage import Artifact, ProgressFactory, StageContext, StageError
from .storage import AlreadyCommitted, Storage, now_iso, redact_uri

log = logging.getLogger("distill")

RUN_FORMAT = "distill.run/1"


@dataclass
class PlanEntry:
    name: str
    kind: str
    fingerprint: str
    inputs: dict[str, str]  # input -> "stage.output"
    cached: bool
    record_path: str
    record: "StageRecord | None" = None
    checkpoint_key: str = ""


@dataclass
class StageRecord:
    """A stage's commit record (``_stage.json``): what it wrote, written last."""

    name: str
    kind: str
    fingerprint: str
    run_id: str
    attempt: str
    outputs: dict[str, dict]  # output -> {type, path, uri}
    rows: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)  # {kind: {reason: count}}
    seconds: float = 0.0
    created: str = ""

    @classmethod
    def from_json(cls, d: dict) -> "StageRecord":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self) -> dict:
        return dict(self.__dict__)

    def artifacts(self) -> dict[str, Artifact]:
        return {out: Artifact(a["type"], a["path"], a["uri"], self.fingerprint) for out, a in self.outputs.items()}

    def output_uris(self) -> dict[str, str]:
        return {out: a["uri"] for out, a in self.outputs.items()}


@dataclass
class StageRun:
    """One stage's entry in a run manifest."""

    name: str
    kind: str
    fingerprint: str
    inputs: dict[str, str]
    status: str = "pending"  # done, cached, failed, skipped
    seconds: float = 0.0
    output: dict[str, str] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    produced_by_run: str | None = None
    error: str | None = None
    reason: str | None = None

    @classmethod
    def of(cls, entry: PlanEntry) -> "StageRun":
        return cls(entry.name, entry.kind, entry.fingerprint, entry.inputs)

    def settle(self, status: str, record: StageRecord | None = None, **kw: Any) -> "StageRun":
        self.status = status
        if record is not None:
            self.output, self.rows, self.metrics, self.dropped = (record.output_uris(), record.rows, record.metrics,
                                                                  record.dropped)
        for k, v in kw.items():
            setattr(self, k, v)
        return self

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()
                if v is not None or k not in ("produced_by_run", "error", "reason")}


@dataclass
class RunResult:
    run_id: str
    manifest_uri: str
    manifest: dict
    ok: bool
    error: str | None = None
    stage_errors: dict[str, str] = field(default_factory=dict)


@dataclass
class _RunState:
    run_id: str
    started: float
    manifest: dict
    artifacts: dict[tuple[str, str], Artifact] = field(default_factory=dict)
    failed: str | None = None
    stage_errors: dict[str, str] = field(default_factory=dict)


def new_run_id(name: str) -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{name}-{uuid.uuid4().hex[:6]}"


class Runner:
    def __init__(
        self,
        cfg: PipelineConfig,
        address: str | None = None,
        progress_factory: ProgressFactory | None = None,
        on_stage: Callable[[str, str, dict], None] | None = None,
    ):
        self.cfg = cfg
        self.address = address if address is not None else cfg.ray.address
        self.storage = Storage(cfg.storage.root)
        self.progress_factory = progress_factory
        self.on_stage = on_stage or (lambda name, event, info: None)

    # -- planning ----------------------------------------------------------
    def plan(self) -> list[PlanEntry]:
        fps: dict[str, str] = {}
        entries = []
        for name in self.cfg.order():
            node = self.cfg.nodes[name]
            inputs = {inp: f"{up}.{out}" for inp, (up, out) in node.inputs.items()}
            identity = {
                "kind": node.cls.kind,
                "code": node.cls.code_version(),
                "params": node.stage.fingerprint_params(),
                "external": node.stage.external_fingerprint(),
                "inputs": {inp: [fps[up], out] for inp, (up, out) in sorted(node.inputs.items())},
            }
            fp = fps[name] = fingerprint(identity)
            record_path = layout.stage_record(self.storage, node.cls.kind, fp)
            record = self._read_record(record_path)
            entries.append(PlanEntry(name, node.cls.kind, fp, inputs, record is not None, record_path, record,
                                     self._checkpoint_key(node, identity)))
        return entries

    @staticmethod
    def _checkpoint_key(node, identity: dict) -> str:
        """The key of a stage's row-level checkpoints: its ``checkpoint_identity()`` and the
        inputs not in ``checkpoint_ignores_inputs`` (else the stage fingerprint without them)."""
        ignored = node.cls.checkpoint_ignores_inputs
        kept = {k: v for k, v in identity["inputs"].items() if k not in ignored}
        own = node.stage.checkpoint_identity()
        if own is not None:
            return "k" + fingerprint({"kind": node.cls.kind, "identity": own, "inputs": kept})[1:]
        if not ignored:
            return fingerprint(identity)  # the stage fingerprint
        return "k" + fingerprint({**identity, "inputs": kept})[1:]

    def _read_record(self, path: str) -> StageRecord | None:
        try:
            return StageRecord.from_json(self.storage.read_json(path))
        except FileNotFoundError:
            return None

    # -- running -----------------------------------------------------------
    def run(self, run_id: str | None = None) -> RunResult:
        run_id = run_id or new_run_id(self.cfg.name)
        state = _RunState(run_id, time.time(), self._new_manifest(run_id))
        for entry in self.plan():
            state.manifest["stages"].append(self._step(entry, state).to_json())
        return self._finish(state)

    def _new_manifest(self, run_id: str) -> dict:
        return {
            "format": RUN_FORMAT,
            "run_id": run_id,
            "pipeline": self.cfg.name,
            "config_file": self.cfg.path,
            "storage_root": redact_uri(self.cfg.storage.root),
            **run_provenance(self.cfg),  # config_hash, git_commit
            "started": now_iso(),
            "status": "running",
            "stages": [],
        }

    def _step(self, entry: PlanEntry, state: _RunState) -> StageRun:
        """One stage: skipped after a failure, cached if committed (maybe by another run since
        planning), else run."""
        run = StageRun.of(entry)
        if state.failed is not None:
            return run.settle("skipped", reason=f"upstream failure in {state.failed}")
        record = entry.record or self._read_record(entry.record_path)
        if record is not None:
            state.artifacts.update({(entry.name, o): a for o, a in record.artifacts().items()})
            run.settle("cached", record, produced_by_run=record.run_id)
            self.on_stage(entry.name, "cached", run.to_json())
            return run
        return self._execute(entry, run, state)

    def _context(self, entry: PlanEntry, run_id: str, attempt: str, artifacts: dict) -> StageContext:
        node = self.cfg.nodes[entry.name]
        return StageContext(
            name=entry.name,
            kind=entry.kind,
            fingerprint=entry.fingerprint,
            run_id=run_id,
            pipeline=self.cfg.name,
            storage=self.storage,
            inputs={inp: artifacts[(up, out)] for inp, (up, out) in node.inputs.items()},
            output_root=layout.attempt_dir(self.storage, entry.kind, entry.fingerprint, attempt),
            checkpoint_root=layout.checkpoint_root(self.storage, entry.kind, entry.checkpoint_key),
            output_types=dict(node.cls.outputs),
            progress_factory=self.progress_factory,
            output_columns=dict(node.stage.produces()),
            previous=self._previous(entry.name, node.cls.outputs),
        )

    def _previous(self, stage: str, outputs) -> dict[str, dict]:
        """Each output's version before this run (its ``latest/`` pointer): the new version's
        lineage links it, so a nightly run's dataset says what it replaced."""
        prev = {}
        for out in outputs:
            try:
                p = self.storage.read_json(layout.latest_pointer(self.storage, self.cfg.name, stage, out))
            except FileNotFoundError:
                continue
            prev[out] = {k: p[k] for k in ("uri", "fingerprint", "produced_by_run") if k in p}
        return prev

    def _execute(self, entry: PlanEntry, run: StageRun, state: _RunState) -> StageRun:
        self.on_stage(entry.name, "start", run.to_json())
        self._ensure_ray()
        attempt = uuid.uuid4().hex[:8]
        ctx = self._context(entry, state.run_id, attempt, state.artifacts)
        t0 = time.time()
        try:
            self.cfg.nodes[entry.name].stage.run(ctx)
            record = self._commit(entry, ctx, attempt, round(time.time() - t0, 3))
        except Exception as e:  # the run manifest records any stage failure
            msg = redact(str(e) if isinstance(e, StageError) else f"{type(e).__name__}: {e}")  # no secret in a record
            log.debug("stage %s failed:\n%s", entry.name, traceback.format_exc())
            run.settle("failed", seconds=round(time.time() - t0, 3), rows=ctx.rows, metrics=ctx.metrics,
                       dropped=ctx.dropped, error=msg)
            state.failed, state.stage_errors[entry.name] = entry.name, msg
            self.on_stage(entry.name, "failed", run.to_json())
            return run
        state.artifacts.update({(entry.name, o): a for o, a in record.artifacts().items()})
        run.settle("done", record, seconds=record.seconds)
        self.on_stage(entry.name, "done", run.to_json())
        return run

    def _commit(self, entry: PlanEntry, ctx: StageContext, attempt: str, seconds: float) -> StageRecord:
        """Write the stage record (exclusive create). If a concurrent run committed the same
        stage first, its record wins, so every downstream reader sees one version."""
        missing = set(ctx.output_types) - set(ctx.written)
        if missing:
            raise StageError(f"stage {entry.name!r} finished without writing outputs: {', '.join(sorted(missing))}")
        record = StageRecord(
            name=entry.name, kind=entry.kind, fingerprint=entry.fingerprint, run_id=ctx.run_id, attempt=attempt,
            outputs={k: {"type": a.type, "path": a.path, "uri": a.uri} for k, a in ctx.written.items()},
            rows=ctx.rows, metrics=ctx.metrics, dropped=ctx.dropped, seconds=seconds, created=now_iso(),
        )
        try:
            self.storage.write_json(entry.record_path, record.to_json(), exclusive=True)
        except AlreadyCommitted:
            record = StageRecord.from_json(self.storage.read_json(entry.record_path))
        return record

    def _finish(self, state: _RunState) -> RunResult:
        manifest = state.manifest
        if state.failed is None:
            self._update_latest(manifest)
        manifest["status"] = "failed" if state.failed else "done"
        manifest["finished"] = now_iso()
        manifest["seconds"] = round(time.time() - state.started, 3)
        path = layout.run_manifest(self.storage, state.run_id)
        self.storage.write_json(path, manifest, exclusive=True)
        self.storage.put_bytes(layout.latest_run(self.storage), state.run_id.encode())
        error = f"stage {state.failed!r} failed: {state.stage_errors[state.failed]}" if state.failed else None
        return RunResult(state.run_id, self.storage.uri(path), manifest, state.failed is None, error,
                         state.stage_errors)

    def _update_latest(self, manifest: dict) -> None:
        """``latest/<pipeline>/<stage>.<output>``: a pointer to the newest committed version of
        each named output, replaced whole (atomic rename locally, a single PUT on S3)."""
        for s in manifest["stages"]:
            for out, uri in s["output"].items():
                pointer = {"uri": uri, "fingerprint": s["fingerprint"], "run_id": manifest["run_id"],
                           "produced_by_run": s.get("produced_by_run") or manifest["run_id"]}
                self.storage.write_json(layout.latest_pointer(self.storage, self.cfg.name, s["name"], out), pointer)

    def _ensure_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        verbose = os.environ.get("DISTILL_RAY_LOGS") == "1"
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": verbose,
                                  "logging_level": logging.INFO if verbose else logging.ERROR}
        if self.address:
            kwargs["address"] = self.address
        else:
            kwargs["include_dashboard"] = False
            if self.cfg.ray.num_cpus:
                kwargs["num_cpus"] = self.cfg.ray.num_cpus
        log.info("starting Ray (%s)", self.address or "local")
        if self.address:
            ray.init(**kwargs)
        else:  # a Ray started here listens on 127.0.0.1 only
            from .local_ray import init_local_ray

            init_local_ray(**kwargs)


# -- reading run manifests -------------------------------------------------

def list_runs(storage: Storage) -> list[dict]:
    runs = []
    for p in storage.ls(layout.runs_root(storage)):
        if not layout.is_run_dir(p):
            continue
        try:
            runs.append(storage.read_json(f"{p}/{layout.RUN_MANIFEST}"))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            continue
    runs.sort(key=lambda m: m.get("started", ""))
    return runs


def read_run(storage: Storage, run: str) -> dict:
    runs_uri = storage.uri(layout.runs_root(storage))
    if run == "latest":
        try:
            with storage.fs.open(layout.latest_run(storage), "rb") as f:
                run = f.read().decode().strip()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no runs under {runs_uri}") from e
    try:
        return storage.read_json(layout.run_manifest(storage, run))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no run {run!r} under {runs_uri}") from e
