"""Runs a pipeline DAG: fingerprints, cache lookups, execution on Ray, run manifests.

A stage's fingerprint hashes its kind, code version, output-defining params,
external resources and its inputs' fingerprints. Its outputs live under
``cache/<kind>/<fingerprint>/<attempt>/``; the stage record
``cache/<kind>/<fingerprint>/_stage.json`` is written last (exclusive create)
and is what makes the stage count as done. A stage whose record exists is
reported as ``cached`` and does no work; a failed attempt leaves no record, so a
re-run starts that stage afresh in a new attempt folder.

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

from .config import PipelineConfig
from .ids import fingerprint
from .stage import Artifact, ProgressFactory, StageContext, StageError
from .storage import STAGE_RECORD, AlreadyCommitted, Storage, now_iso, redact_uri

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
    record: dict | None = None
    checkpoint_key: str = ""


@dataclass
class RunResult:
    run_id: str
    manifest_uri: str
    manifest: dict
    ok: bool
    error: str | None = None
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
            fp = fingerprint(identity)
            ignored = node.cls.checkpoint_ignores_inputs
            ckpt = fp if not ignored else "k" + fingerprint(
                {**identity, "inputs": {k: v for k, v in identity["inputs"].items() if k not in ignored}})[1:]
            fps[name] = fp
            record_path = self.storage.path("cache", node.cls.kind, fp, STAGE_RECORD)
            record = self._read_record(record_path)
            entries.append(PlanEntry(name, node.cls.kind, fp, inputs, record is not None, record_path, record, ckpt))
        return entries

    def _read_record(self, path: str) -> dict | None:
        try:
            return self.storage.read_json(path)
        except FileNotFoundError:
            return None

    # -- running -----------------------------------------------------------
    def run(self) -> RunResult:
        run_id = new_run_id(self.cfg.name)
        started = time.time()
        manifest: dict[str, Any] = {
            "format": RUN_FORMAT,
            "run_id": run_id,
            "pipeline": self.cfg.name,
            "config_file": self.cfg.path,
            "storage_root": redact_uri(self.cfg.storage.root),
            "started": now_iso(),
            "status": "running",
            "stages": [],
        }
        plan = self.plan()
        artifacts: dict[tuple[str, str], Artifact] = {}
        failed: str | None = None
        stage_errors: dict[str, str] = {}
        for entry in plan:
            node = self.cfg.nodes[entry.name]
            rec: dict[str, Any] = {"name": entry.name, "kind": entry.kind, "fingerprint": entry.fingerprint, "inputs": entry.inputs}
            if failed is not None:
                rec.update(status="skipped", seconds=0.0, output={}, rows={}, metrics={}, reason=f"upstream failure in {failed}")
                manifest["stages"].append(rec)
                continue
            if entry.record is None:
                # Another run may have committed it since planning.
                entry.record = self._read_record(entry.record_path)
            if entry.record is not None:
                stage_rec = entry.record
                rec.update(status="cached", seconds=0.0, output={k: v["uri"] for k, v in stage_rec["outputs"].items()},
                           rows=stage_rec.get("rows", {}), metrics=stage_rec.get("metrics", {}),
                           produced_by_run=stage_rec.get("run_id"))
                for out, a in stage_rec["outputs"].items():
                    artifacts[(entry.name, out)] = Artifact(a["type"], a["path"], a["uri"], entry.fingerprint)
                manifest["stages"].append(rec)
                self.on_stage(entry.name, "cached", rec)
                continue
            self.on_stage(entry.name, "start", rec)
            self._ensure_ray()
            attempt = uuid.uuid4().hex[:8]
            ctx = StageContext(
                name=entry.name,
                kind=entry.kind,
                fingerprint=entry.fingerprint,
                run_id=run_id,
                storage=self.storage,
                inputs={inp: artifacts[(up, out)] for inp, (up, out) in node.inputs.items()},
                output_root=self.storage.path("cache", entry.kind, entry.fingerprint, attempt),
                checkpoint_root=self.storage.path("cache", entry.kind, entry.checkpoint_key, "checkpoints"),
                output_types=dict(node.cls.outputs),
                progress_factory=self.progress_factory,
            )
            t0 = time.time()
            try:
                node.stage.run(ctx)
                missing = set(node.cls.outputs) - set(ctx.written)
                if missing:
                    raise StageError(f"stage {entry.name!r} finished without writing outputs: {', '.join(sorted(missing))}")
                seconds = round(time.time() - t0, 3)
                stage_rec = {
                    "name": entry.name,
                    "kind": entry.kind,
                    "fingerprint": entry.fingerprint,
                    "run_id": run_id,
                    "attempt": attempt,
                    "outputs": {k: {"type": a.type, "path": a.path, "uri": a.uri} for k, a in ctx.written.items()},
                    "rows": ctx.rows,
                    "metrics": ctx.metrics,
                    "seconds": seconds,
                    "created": now_iso(),
                }
                try:
                    self.storage.write_json(entry.record_path, stage_rec, exclusive=True)
                except AlreadyCommitted:
                    # A concurrent run finished the same stage first: use its outputs, so
                    # every downstream reader sees one consistent version.
                    stage_rec = self.storage.read_json(entry.record_path)
                for out, a in stage_rec["outputs"].items():
                    artifacts[(entry.name, out)] = Artifact(a["type"], a["path"], a["uri"], entry.fingerprint)
                rec.update(status="done", seconds=seconds, output={k: v["uri"] for k, v in stage_rec["outputs"].items()},
                           rows=stage_rec["rows"], metrics=stage_rec["metrics"])
                self.on_stage(entry.name, "done", rec)
            except Exception as e:  # the run manifest records any stage failure
                seconds = round(time.time() - t0, 3)
                msg = str(e) if isinstance(e, StageError) else f"{type(e).__name__}: {e}"
                log.debug("stage %s failed:\n%s", entry.name, traceback.format_exc())
                rec.update(status="failed", seconds=seconds, output={}, rows=ctx.rows, metrics=ctx.metrics, error=msg)
                failed = entry.name
                stage_errors[entry.name] = msg
                self.on_stage(entry.name, "failed", rec)
            manifest["stages"].append(rec)

        if failed is None:
            self._update_latest(manifest)
        manifest["status"] = "failed" if failed else "done"
        manifest["finished"] = now_iso()
        manifest["seconds"] = round(time.time() - started, 3)
        run_dir = self.storage.path("runs", run_id)
        self.storage.write_json(f"{run_dir}/manifest.json", manifest, exclusive=True)
        self.storage.put_bytes(self.storage.path("runs", "_latest"), run_id.encode())
        uri = self.storage.uri(f"{run_dir}/manifest.json")
        error = f"stage {failed!r} failed: {stage_errors[failed]}" if failed else None
        return RunResult(run_id, uri, manifest, failed is None, error, stage_errors)

    def _update_latest(self, manifest: dict) -> None:
        """``latest/<pipeline>/<stage>.<output>``: a pointer to the newest committed version of
        each named output, replaced whole (atomic rename locally, a single PUT on S3)."""
        for s in manifest["stages"]:
            for out, uri in s["output"].items():
                pointer = {"uri": uri, "fingerprint": s["fingerprint"], "run_id": manifest["run_id"],
                           "produced_by_run": s.get("produced_by_run", manifest["run_id"])}
                self.storage.write_json(self.storage.path("latest", self.cfg.name, f"{s['name']}.{out}"), pointer)

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
        ray.init(**kwargs)


# -- reading run manifests -------------------------------------------------

def list_runs(storage: Storage) -> list[dict]:
    runs = []
    for p in storage.ls(storage.path("runs")):
        mpath = f"{p}/manifest.json"
        if p.rsplit("/", 1)[-1].startswith("_"):
            continue
        try:
            runs.append(storage.read_json(mpath))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            continue
    runs.sort(key=lambda m: m.get("started", ""))
    return runs


def read_run(storage: Storage, run: str) -> dict:
    if run == "latest":
        try:
            with storage.fs.open(storage.path("runs", "_latest"), "rb") as f:
                run = f.read().decode().strip()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no runs under {storage.uri(storage.path('runs'))}") from e
    try:
        return storage.read_json(storage.path("runs", run, "manifest.json"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no run {run!r} under {storage.uri(storage.path('runs'))}") from e
