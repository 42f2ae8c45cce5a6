"""Runs a pipeline DAG: fingerprints, cache lookups, execution on Ray, run manifests.

A stage's fingerprint (its cache key) hashes its own definition (kind, code version, see
``Stage.code_hash``; output-defining params; external files and models) and the *content
digest* of each input, read from the input's manifest, never from its data: a dataset's
digest combines its shards' row-hash sums and its schema (``ids.dataset_digest``: the
same rows give the same digest whatever the shard boundaries or row order), a model's its
files' sha256s. So a stage re-run that writes the same rows (a comment edited in a module
it imports) leaves every downstream stage cached: early cutoff. An input from a stage that
is not ``deterministic()`` is keyed by that stage's fingerprint instead. A stage's key is
known only once its inputs are committed: ``plan()`` gives provisional keys for stages
downstream of one that has to run, and ``run()`` computes the real key (and looks up the
cache) just before each stage. The record keeps the key's parts (hashed), so ``plan`` names
why a stage would run: its code, a param, an input digest or an external file. Paths come
from ``pipeline.store.layout``: outputs live under ``cache/<kind>/<fingerprint>/<attempt>/``;
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
from typing import Any, Callable

from pipeline.core.config import PipelineConfig
from pipeline.core.ids import dataset_digest, fingerprint, model_digest, new_run_id
from pipeline.core.provenance import run_provenance
from pipeline.core.stage import Artifact, ProgressFactory, StageContext, StageError, flat_params
from pipeline.sizing import hub
from pipeline.store import layout
from pipeline.store.secrets import redact
from pipeline.store.storage import AlreadyCommitted, Storage, now_iso, redact_uri

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
    # an input is not committed yet: the fingerprint is provisional until that stage has run
    provisional: bool = False
    identity: dict = field(default_factory=dict, repr=False)
    reason: str | None = None  # why it would run (``plan(explain=True)``)


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
    key: dict = field(default_factory=dict)  # the key's parts, hashed (``key_parts``): why a later plan re-runs
    digests: dict[str, str] = field(default_factory=dict)  # output -> content digest
    deterministic: bool = True  # False: downstream stages key on this fingerprint, not on the digests

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


PENDING = "pending:"  # an input not committed yet: keys downstream of it are provisional
FP = "fp:"  # an input from a stage that is not deterministic: keyed by its fingerprint


def key_parts(identity: dict) -> dict:
    """A stage key's parts as stored in its record: kind and code as they are, each param
    (dotted name), external resource and input as a short hash, so ``plan`` can say which
    one changed and no param value (which may hold a secret) is written anywhere."""
    return {"kind": identity["kind"], "code": identity["code"],
            "params": {k: fingerprint(v) for k, v in flat_params(identity["params"]).items()},
            "external": {k: fingerprint(v) for k, v in flat_params(identity["external"]).items()},
            "inputs": dict(identity["inputs"])}


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
    def plan(self, explain: bool = False) -> list[PlanEntry]:
        """Each stage's key and whether it is cached. Downstream of a stage that has to run,
        keys are provisional (``PlanEntry.provisional``). ``explain``: also say why each stage
        that is not cached would run (reads the previous version's record)."""
        keys: dict[tuple[str, str], str] = {}
        entries = []
        for name in self.cfg.order():
            entry = self._entry(name, keys)
            keys.update(self._output_keys(entry))
            if explain and not entry.cached:
                entry.reason = self.why(entry)
            entries.append(entry)
        return entries

    def _entry(self, name: str, keys: dict[tuple[str, str], str]) -> PlanEntry:
        """A stage's key from its definition and its inputs' keys (``_output_keys``)."""
        node = self.cfg.nodes[name]
        inputs = {inp: f"{up}.{out}" for inp, (up, out) in node.inputs.items()}
        identity = {
            "kind": node.cls.kind,
            "code": node.cls.code_version(),
            "params": node.stage.fingerprint_params(),
            "external": node.stage.external_fingerprint(),
            "inputs": {inp: keys[(up, out)] for inp, (up, out) in sorted(node.inputs.items())},
        }
        provisional = any(v.startswith(PENDING) for v in identity["inputs"].values())
        fp = fingerprint(identity)
        record_path = layout.stage_record(self.storage, node.cls.kind, fp)
        record = None if provisional else self._read_record(record_path)
        return PlanEntry(name, node.cls.kind, fp, inputs, record is not None, record_path, record,
                         self._checkpoint_key(node, identity), provisional, identity)

    def _output_keys(self, entry: PlanEntry, record: "StageRecord | None" = None) -> dict[tuple[str, str], str]:
        """What keys downstream stages for each output of ``entry``: its content digest once
        committed (from the record, else the manifest), the stage fingerprint for a stage that is
        not deterministic, ``pending:<fingerprint>`` while it is not committed."""
        node = self.cfg.nodes[entry.name]
        record = record or entry.record
        if record is None:
            known = not entry.provisional and not node.stage.deterministic()
            return {(entry.name, out): (FP if known else PENDING) + entry.fingerprint for out in node.cls.outputs}
        if not record.deterministic:
            return {(entry.name, out): FP + record.fingerprint for out in record.outputs}
        digests = record.digests or self._digests(record.artifacts())
        return {(entry.name, out): digests[out] for out in record.outputs}

    def _digests(self, artifacts: dict[str, Artifact]) -> dict[str, str]:
        """Each output's content digest, from its manifest (no data is read)."""
        out = {}
        for name, a in artifacts.items():
            if a.type == "dataset":
                out[name] = dataset_digest(self.storage.dataset_manifest(a.path))
            else:
                out[name] = model_digest(self.storage.tree_manifest(a.path))
        return out

    @staticmethod
    def _checkpoint_key(node, identity: dict) -> str:
        """The key of a stage's row-level checkpoints: its ``checkpoint_identity()`` and the
        inputs not in ``checkpoint_ignores_inputs`` (else the stage fingerprint without them).
        Inputs key by content, so checkpoints survive an upstream re-run that wrote the same rows."""
        ignored = node.cls.checkpoint_ignores_inputs
        kept = {k: v for k, v in identity["inputs"].items() if k not in ignored}
        own = node.stage.checkpoint_identity()
        if own is not None:
            return "k" + fingerprint({"kind": node.cls.kind, "identity": own, "inputs": kept})[1:]
        if not ignored:
            return fingerprint(identity)  # the stage fingerprint
        return "k" + fingerprint({**identity, "inputs": kept})[1:]

    # -- why a stage runs ----------------------------------------------------
    def why(self, entry: PlanEntry) -> str:
        """The first reason ``entry`` is not cached, against the version of the stage the
        pipeline's ``latest/`` pointer names: its code, a param, an external file, an input
        digest; or that there is no earlier version, or one from before content keys."""
        prev = self._previous_record(entry)
        if prev is None:
            return f"new: no committed version of stage {entry.name!r} in pipeline {self.cfg.name!r}"
        if not prev.key:
            return (f"key format: {entry.name!r} was committed ({prev.fingerprint}) before cache keys followed "
                    "content; it runs once under the new key")
        now, was = key_parts(entry.identity), prev.key
        if now["kind"] != was.get("kind"):
            return f"code: kind {was.get('kind')} -> {now['kind']}"
        if now["code"] != was.get("code"):
            return f"code: version {was.get('code')} -> {now['code']}"
        for part, label in (("params", "param"), ("external", "external file")):
            a, b = now[part], was.get(part) or {}
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    return f"{label}: {k}"
        a, b = now["inputs"], was.get("inputs") or {}
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                src = entry.inputs.get(k, "?")
                if (a.get(k) or "").startswith(PENDING):
                    up = src.split(".")[0]
                    return (f"input digest: {k} <- {src} is not written yet ({up} runs first); "
                            f"cached if {up} writes the same rows")
                return f"input digest: {k} <- {src}"
        return f"not in cache: {self.storage.uri(entry.record_path)} is missing"

    def _previous_record(self, entry: PlanEntry) -> "StageRecord | None":
        node = self.cfg.nodes[entry.name]
        for out in node.cls.outputs:
            try:
                p = self.storage.read_json(layout.latest_pointer(self.storage, self.cfg.name, entry.name, out))
            except FileNotFoundError:
                continue
            if p.get("fingerprint"):
                return self._read_record(layout.stage_record(self.storage, entry.kind, p["fingerprint"]))
        return None

    def _read_record(self, path: str) -> StageRecord | None:
        try:
            return StageRecord.from_json(self.storage.read_json(path))
        except FileNotFoundError:
            return None

    # -- running -----------------------------------------------------------
    def run(self, run_id: str | None = None) -> RunResult:
        run_id = run_id or new_run_id(self.cfg.name)
        state = _RunState(run_id, time.time(), self._new_manifest(run_id))
        keys: dict[tuple[str, str], str] = {}
        for name in self.cfg.order():
            # the real key, from the inputs committed by now: a re-run upstream that wrote the
            # same rows leaves this stage cached
            entry = self._entry(name, keys)
            run = self._step(entry, state)
            state.manifest["stages"].append(run.to_json())
            if run.status in ("done", "cached"):
                keys.update(self._output_keys(entry, entry.record or self._read_record(entry.record_path)))
            else:  # skipped after a failure: nothing downstream runs
                keys.update({(name, out): PENDING + entry.fingerprint for out in self.cfg.nodes[name].cls.outputs})
        return self._finish(state)

    def _new_manifest(self, run_id: str) -> dict:
        return {
            "format": RUN_FORMAT,
            "run_id": run_id,
            "pipeline": self.cfg.name,
            "config_file": self.cfg.path,
            "storage_root": redact_uri(self.cfg.storage.root),
            **run_provenance(self.cfg),  # config_hash, git_commit
            **hub.run_models(self.cfg),  # hub models: the commit sha each reference was pinned to
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
        try:
            run.reason = self.why(entry)
        except Exception as e:  # a reason is information only: an unreadable old record must not stop the run
            run.reason = f"unknown ({type(e).__name__})"
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
            key=key_parts(entry.identity), digests=self._digests(
                {k: Artifact(a.type, a.path, a.uri, entry.fingerprint) for k, a in ctx.written.items()}),
            deterministic=self.cfg.nodes[entry.name].stage.deterministic(),
        )
        try:
            self.storage.write_json(entry.record_path, record.to_json(), exclusive=True)
        except AlreadyCommitted:
            record = StageRecord.from_json(self.storage.read_json(entry.record_path))
        return record

    def _fence(self, run_id: str) -> dict | None:
        """The lease fence of a scheduled run (``DISTILL_FENCE``), when it is this run's."""
        from pipeline.store.lease import current_fence

        fence = current_fence()
        return fence if fence and fence.get("run_id") == run_id else None

    def _finish(self, state: _RunState) -> RunResult:
        manifest = state.manifest
        fence = self._fence(state.run_id)
        if fence:
            manifest["fence"] = {k: fence[k] for k in ("lease", "epoch", "run_id")}
        refused: list[dict] = []
        if state.failed is None:
            refused += self._update_latest(manifest, fence)
        if refused:
            manifest["fencing_refused"] = refused
        manifest["status"] = "failed" if state.failed else "done"
        manifest["finished"] = now_iso()
        manifest["seconds"] = round(time.time() - state.started, 3)
        path = layout.run_manifest(self.storage, state.run_id)
        self.storage.write_json(path, manifest, exclusive=True)
        if fence is None:
            self.storage.put_bytes(layout.latest_run(self.storage), state.run_id.encode())
        else:  # runs/_latest moves only forward in epochs: the fence of the run it names is in its manifest
            from pipeline.store.lease import fenced_put

            def run_fence(data: bytes) -> dict | None:
                return self.storage.read_json(layout.run_manifest(self.storage, data.decode().strip())).get("fence")

            newer = fenced_put(self.storage, layout.latest_run(self.storage), state.run_id.encode(), fence, run_fence)
            if newer:
                refused.append({"pointer": self.storage.uri(layout.latest_run(self.storage)), "newer": newer})
        if refused:
            self._record_refused(fence, state.run_id, refused)
        error = f"stage {state.failed!r} failed: {state.stage_errors[state.failed]}" if state.failed else None
        return RunResult(state.run_id, self.storage.uri(path), manifest, state.failed is None, error,
                         state.stage_errors)

    def _update_latest(self, manifest: dict, fence: dict | None = None) -> list[dict]:
        """``latest/<pipeline>/<stage>.<output>``: a pointer to the newest committed version of
        each named output, replaced whole (atomic rename locally, a single PUT on S3). With a
        ``fence`` (a scheduled run), a compare-and-swap that refuses to replace a pointer of a
        newer epoch of the same lease: a zombie run cannot move ``latest/`` back. Returns the
        refused writes."""
        refused = []
        for s in manifest["stages"]:
            for out, uri in s["output"].items():
                pointer = {"uri": uri, "fingerprint": s["fingerprint"], "run_id": manifest["run_id"],
                           "produced_by_run": s.get("produced_by_run") or manifest["run_id"]}
                path = layout.latest_pointer(self.storage, self.cfg.name, s["name"], out)
                if fence is None:
                    self.storage.write_json(path, pointer)
                    continue
                import json

                from pipeline.store.lease import fenced_put

                pointer["fence"] = {k: fence[k] for k in ("lease", "epoch", "run_id")}
                newer = fenced_put(self.storage, path, json.dumps(pointer, indent=2).encode(), fence,
                                   lambda data: json.loads(data).get("fence"))
                if newer:
                    refused.append({"pointer": self.storage.uri(path), "newer": newer})
        return refused

    def _record_refused(self, fence: dict, run_id: str, refused: list[dict]) -> None:
        """A zombie's refused writes: logged, and recorded in its schedule's history."""
        log.warning("run %s (epoch %s of lease %s) is not the newest: %d pointer write(s) refused: %s",
                    run_id, fence["epoch"], fence["lease"], len(refused), refused)
        try:
            from pipeline.store.history import record

            root = Storage(fence["root"]) if fence.get("root") else self.storage
            record(root, fence["lease"], "fenced", run_id,
                   {"run_id": run_id, "epoch": fence["epoch"], "refused": refused,
                    "detail": f"run {run_id} of epoch {fence['epoch']} finished after a newer run; "
                              "its pointer writes were refused"})
        except Exception as e:  # the record is best effort; the manifest has it too
            log.warning("recording the refused writes of %s: %s", run_id, e)

    def _ensure_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        verbose = os.environ.get("DISTILL_RAY_LOGS") == "1"
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": verbose,
                                  "logging_level": logging.INFO if verbose else logging.ERROR}
        remote = self.address not in (None, "", "local")  # "local" takes the loopback path too
        if remote:
            kwargs["address"] = self.address
        else:
            kwargs["include_dashboard"] = False
            if self.cfg.ray.num_cpus:
                kwargs["num_cpus"] = self.cfg.ray.num_cpus
        log.info("starting Ray (%s)", self.address or "local")
        if remote:
            ray.init(**kwargs)
        else:  # a Ray started here listens on 127.0.0.1 only
            from pipeline.ops.local_ray import init_local_ray

            init_local_ray(**kwargs)
