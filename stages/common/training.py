"""Training on Ray Train, shared by the training stages (``sft``, ``dpo``).

A ``ray.train.torch.TorchTrainer`` runs ``num_workers`` workers; each builds the stage's TRL
trainer (its *recipe*, a ``module:function``), resumes from the last checkpoint Ray Train
registered, reports every saved Hugging Face checkpoint through ``ray.train.report`` and
pushes step, loss and tokens to a small actor the driver polls for progress. Rank 0 commits
the model (manifest last) once training has finished. See ``stages/sft.py`` for the contract.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from pipeline.core import resources
from pipeline.core.stage import NOT_OUTPUT, Stage, StageContext, StageError
from pipeline.store import layout


class TrainResources(BaseModel):
    """Where and how a training stage runs: no part of its fingerprint."""

    model_config = ConfigDict(extra="forbid")
    num_workers: int = Field(1, ge=1, json_schema_extra=NOT_OUTPUT)
    num_cpus: float = Field(2, gt=0, json_schema_extra=NOT_OUTPUT, description="per worker")
    num_gpus: float = Field(0, ge=0, json_schema_extra=NOT_OUTPUT, description="per worker")
    resources: dict[str, float] = Field(default_factory=dict, json_schema_extra=NOT_OUTPUT,
                                        description="custom Ray resources per worker")
    max_failures: int = Field(2, ge=-1, json_schema_extra=NOT_OUTPUT, description="worker-group restarts; -1: forever")
    checkpoint_every: int = Field(100, ge=1, json_schema_extra=NOT_OUTPUT,
                                  description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, json_schema_extra=NOT_OUTPUT)
    logging_steps: int = Field(10, ge=1, json_schema_extra=NOT_OUTPUT)


class TrainParams(TrainResources):
    """The settings every training stage declares alike; a stage adds its own, with ``batch_size``
    (the global batch per optimizer step) and its schedule's defaults."""

    model_config = ConfigDict(extra="forbid")
    # the path keys nothing: the model's files key the stage (external_fingerprint, or the wired input's digest)
    model: str | None = Field(None, json_schema_extra=NOT_OUTPUT,
                              description="starting model folder or URI (or wire input 'model')")
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="overrides epochs when > 0")
    grad_accum: int = Field(1, ge=1)
    seed: int = 0
    bf16: bool = False

    def per_device_batch(self) -> int:
        """One worker's share of one accumulation step of the global batch."""
        return self.batch_size // (self.num_workers * self.grad_accum)


class TrainingStage(Stage):
    """What the training stages (sft, dpo, grpo) share: inputs ``data`` and an optional ``model``
    (else ``params.model``), output ``model``, keyed by the starting model's files, and the
    checks of a global batch split over workers. Params need ``model``, ``batch_size``,
    ``grad_accum`` and ``TrainResources`` (``TrainParams`` has them but ``batch_size``)."""

    code_hash: ClassVar[bool] = False
    inputs: ClassVar[dict] = {"data": "dataset", "model": "model"}
    optional_inputs: ClassVar[frozenset] = frozenset({"model"})
    outputs: ClassVar[dict] = {"model": "model"}

    def check(self) -> list[tuple[str, str]]:
        p = self.params
        out = resources.model_params_problems(p, ("model",)) + self.more_problems()
        if p.batch_size % (p.num_workers * p.grad_accum):
            out.append(("batch_size", (f"the global batch {p.batch_size} must be a multiple of "
                                       f"num_workers x grad_accum ({p.num_workers} x {p.grad_accum})")))
        return out

    def more_problems(self) -> list[tuple[str, str]]:
        """A stage's own problems found at plan, besides the shared ones."""
        return []

    def external_fingerprint(self) -> dict:
        return resources.model_params_fingerprint(self.params, ("model",))


# Dense peak FLOP/s used for MFU, by GPU name fragment (bf16 tensor cores / fp32).
PEAK_FLOPS = {"H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12),
              "L40S": (362e12, 91.6e12), "L4": (121e12, 30.3e12), "A10G": (125e12, 31.2e12)}


def local_dataset_files(storage, path: str, dest: str) -> list[str]:
    """Local paths of a committed dataset's shards, in order: the shards themselves on a local
    root, else copies streamed into ``dest``."""
    manifest = storage.dataset_manifest(path)
    files = [f"{path.rstrip('/')}/{s['path']}" for s in manifest["shards"]]
    if storage.is_local:
        return files
    os.makedirs(dest, exist_ok=True)
    out = []
    for i, f in enumerate(files):
        local = os.path.join(dest, f"{i:06d}.parquet")
        storage.fs.get(f, local)
        out.append(local)
    return out


def count_tokens(trainer) -> dict:
    """Wrap ``trainer.training_step`` to count the non-padding tokens it trains on."""
    tokens = {"n": 0}
    orig = trainer.training_step

    def counting_step(model, inputs, *a, **kw):
        if not hasattr(inputs, "get") or inputs.get("input_ids") is None:  # GRPO's examples: not counted here
            return orig(model, inputs, *a, **kw)
        mask = inputs.get("attention_mask")
        ids = inputs["input_ids"]
        if mask is not None and mask.shape == ids.shape:
            tokens["n"] += int(mask.sum())
        else:  # padding-free batches carry no mask: every token is real
            tokens["n"] += int(ids.numel())
        return orig(model, inputs, *a, **kw)

    trainer.training_step = counting_step
    return tokens


def non_embedding_parameters(model) -> int:
    emb = {id(p) for m in model.modules() if m.__class__.__name__ == "Embedding" for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


# -- driver <-> workers ---------------------------------------------------------------

class TrainState:
    """What the workers tell the driver (held by a small Ray actor): starts, steps, losses,
    checkpoints, token counts. Worker attempts are numbered from 0 as the group (re)starts."""

    def __init__(self):
        self.starts: list[dict] = []
        self.steps: list[tuple[int, int]] = []  # (attempt, optimizer step) as rank 0 finished it
        self.losses: list[tuple[int, float]] = []
        self.curves: dict[str, list[tuple[int, float]]] = {}  # the trainer's other logged figures (dpo: rewards/*)
        self.checkpoints: list[int] = []
        self.tokens: dict[tuple[int, int], int] = {}
        self.total_steps: int | None = None
        self.final: dict | None = None
        self.step_times: dict[int, float] = {}  # attempt -> when rank 0 last finished a step

    def train_seconds(self) -> float:
        """Time spent in training steps (each worker group from its first to its last step)."""
        begin = {s["attempt"]: s["time"] for s in self.starts if s["rank"] == 0}
        return sum(t - begin[a] for a, t in self.step_times.items() if a in begin)

    def start(self, rank: int, pid: int, resumed_from: int | None, total_steps: int) -> int:
        attempt = sum(1 for s in self.starts if s["rank"] == rank)  # each group (re)start starts every rank once
        self.starts.append({"attempt": attempt, "rank": rank, "pid": pid, "resumed_from_step": resumed_from,
                            "time": time.time()})
        self.total_steps = total_steps
        return attempt

    def step(self, attempt: int, rank: int, step: int, tokens: int) -> None:
        self.tokens[(attempt, rank)] = tokens
        if rank == 0:
            self.steps.append((attempt, step))
            self.step_times[attempt] = time.time()

    def log(self, step: int, loss: float, extra: dict | None = None) -> None:
        self.losses.append((step, loss))
        for k, v in (extra or {}).items():
            self.curves.setdefault(k, []).append((step, v))

    def checkpoint(self, step: int) -> None:
        self.checkpoints.append(step)

    def finish(self, metrics: dict) -> None:
        self.final = metrics

    def snapshot(self) -> dict:
        return {"starts": list(self.starts), "steps": list(self.steps), "losses": list(self.losses),
                "curves": {k: list(v) for k, v in self.curves.items()},
                "checkpoints": list(self.checkpoints), "tokens": sum(self.tokens.values()),
                "train_seconds": self.train_seconds(),
                "total_steps": self.total_steps, "final": self.final,
                "last_step": self.steps[-1][1] if self.steps else 0}


SNAPSHOT = layout.TRAIN_SNAPSHOT  # Ray Train's record of the checkpoints it registered


class TornSnapshot(ValueError):
    """Ray Train's checkpoint snapshot does not parse: its writer was killed mid-write."""


def registered_checkpoint_step(storage, run_dir: str, tries: int = 5) -> int | None:
    """The step of the last checkpoint Ray Train registered for the run in ``run_dir`` (what a
    restarted worker group or a rerun resumes from), read from its snapshot in storage.

    On a local filesystem Ray Train rewrites the snapshot in place (truncate, then write), so a
    read during a write can see part of it: such a read is retried, and a snapshot that still
    does not parse (its writer was killed mid-write) raises :class:`TornSnapshot`."""
    path = f"{run_dir}/{SNAPSHOT}"
    for attempt in range(tries):
        try:
            snap = storage.read_json(path)
            break
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if attempt == tries - 1:
                raise TornSnapshot(f"Ray Train's checkpoint snapshot {storage.uri(path)} does not parse "
                                   f"({type(e).__name__} at byte {getattr(e, 'pos', '?')})") from None
            time.sleep(0.2)
    latest = snap.get("latest_checkpoint_result")
    return int(latest["metrics"]["step"]) if latest else None


def state_actor_name(fingerprint: str) -> str:
    """The name of the actor holding a training run's :class:`TrainState` (tests read it)."""
    return f"distill-train-{fingerprint}"


# logged figures kept per step beside the loss: DPO's rewards and log-probs; GRPO's mean reward,
# completion lengths and truncation rate, the share of each verification reason, the KL to the
# reference, the policy's entropy and the share of groups whose rewards were all equal (no signal)
CURVE_PREFIXES = ("rewards/", "logps/", "reward", "completions/mean_length", "completions/clipped_ratio", "verify/",
                  "kl", "entropy", "frac_reward_zero_std")


def _report_callback(state, rank: int, resumed_from: int | None, tokens: dict):
    """A transformers callback: progress to the driver; each saved checkpoint reported to Ray Train."""
    import ray
    import ray.train
    from transformers import TrainerCallback

    class ReportToRayTrain(TrainerCallback):
        attempt = 0

        def on_train_begin(self, args, st, control, **kw):
            self.attempt = ray.get(state.start.remote(rank, os.getpid(), resumed_from, st.max_steps))

        def on_step_end(self, args, st, control, **kw):
            state.step.remote(self.attempt, rank, st.global_step, tokens["n"])

        def on_log(self, args, st, control, logs=None, **kw):
            if rank == 0 and logs and "loss" in logs:
                extra = {k: float(v) for k, v in logs.items() if k.startswith(CURVE_PREFIXES)
                         and isinstance(v, (int, float))}
                state.log.remote(st.global_step, float(logs["loss"]), extra)

        def on_save(self, args, st, control, **kw):
            src = os.path.join(args.output_dir, f"checkpoint-{st.global_step}")
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if os.path.isdir(src):
                    shutil.copytree(src, os.path.join(tmp, "checkpoint"))
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                # a barrier: every worker reports once per save
                ray.train.report({"step": st.global_step}, checkpoint=ckpt,
                                 checkpoint_dir_name=f"checkpoint_{st.global_step:08d}")
            if rank == 0:
                state.checkpoint.remote(st.global_step)

    return ReportToRayTrain()


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker: localize the model and the data, build the stage's trainer
    (``config["recipe"]``, ``module:function`` called as ``f(model_dir, files, params, work)``),
    resume from Ray Train's checkpoint if there is one, train, and (rank 0) commit the model."""
    import importlib

    import ray
    import ray.train
    import torch

    from pipeline.core import resources

    params = config["params"]
    storage = config["storage"]
    state = config["state"]
    rank = ray.train.get_context().get_world_rank()
    if not params.get("num_gpus"):
        torch.set_num_threads(max(1, int(params.get("num_cpus", 1))))
    torch.manual_seed(params.get("seed", 0))
    model_dir = resources.localize_model(config["model_uri"])
    work = tempfile.mkdtemp(prefix="distill-train-")
    try:
        files = local_dataset_files(storage, config["data_path"], os.path.join(work, "data"))
        module, _, fn = config["recipe"].partition(":")
        trainer = getattr(importlib.import_module(module), fn)(model_dir, files, params, work)
        tokens = count_tokens(trainer)
        resume, resumed_from = None, None
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            local = ckpt.to_directory(os.path.join(work, "resume"))
            resume = os.path.join(local, "checkpoint")
            with open(os.path.join(resume, "trainer_state.json")) as f:
                resumed_from = int(json.load(f)["global_step"])
        trainer.add_callback(_report_callback(state, rank, resumed_from, tokens))
        t0 = time.time()
        result = trainer.train(resume_from_checkpoint=resume)
        seconds = time.time() - t0
        if rank != 0:
            return
        final = os.path.join(work, "final")
        model = trainer.model
        if getattr(trainer, "merge_adapters", False):  # LoRA merged into the saved weights
            model = model.merge_and_unload()
        model.save_pretrained(final)
        trainer.processing_class.save_pretrained(final)
        out_path = config["out_path"]
        if not storage.exists(f"{out_path}/_manifest.json"):  # a restarted group may find it committed
            storage.put_tree(final, out_path, config["lineage"])
        ray.get(state.finish.remote({
            "steps": trainer.state.global_step,
            "train_loss": round(result.training_loss, 4),
            "last_attempt_seconds": round(seconds, 2),
            "non_embedding_parameters": non_embedding_parameters(model),
            **getattr(trainer, "stage_metrics", {}),  # what the recipe adds (sft: lm_head as run)
        }))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ray_storage(storage, path: str):
    """(storage_path, storage_filesystem) for Ray Train's ``RunConfig``: a local folder as is,
    anything else through the project's fsspec filesystem."""
    if storage.is_local:
        return os.path.abspath(path), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return storage.strip(path), PyFileSystem(FSSpecHandler(storage.fs))


def lineage_with_data(ctx: StageContext) -> dict:
    lineage = ctx.lineage("model")
    data = ctx.inputs["data"]
    raw = ctx.storage.fs.cat_file(f"{data.path}/_manifest.json")
    lineage["trained_on"] = [{"uri": data.uri, "fingerprint": data.fingerprint,
                              "manifest_sha256": hashlib.sha256(raw).hexdigest(),
                              "rows": json.loads(raw).get("rows")}]
    return lineage


def mfu(p, params_n: int, tok_s: float) -> dict:
    """MFU on a known GPU (``p``: num_gpus, num_workers, bf16); nothing on a CPU."""
    import torch

    if p.num_gpus == 0 or not torch.cuda.is_available():
        return {}
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    if peak is None:
        return {"gpu": name}
    per_gpu = peak[0] if p.bf16 else peak[1]
    flops = 6 * params_n * tok_s  # forward + backward, non-embedding parameters
    return {"gpu": name, "mfu": round(flops / (per_gpu * p.num_workers), 4)}


def run_training(ctx: StageContext, p, recipe: str, metrics: dict | None = None) -> dict:
    """Train on Ray Train from a stage's driver: ``p`` (a params model with the fields of
    ``TrainParams``), ``recipe`` (``module:function`` building the trainer on each worker, see
    ``train_loop``). The stage's inputs are ``data`` and ``model``, its output ``model``.
    Fills the stage record (loss curve, tokens/s, worker starts, checkpoints, MFU; ``metrics``
    added) and returns the last snapshot of the workers' state."""
    storage = ray_storage(ctx.storage, ctx.checkpoint_root)
    lineage = lineage_with_data(ctx)
    name = f"train-{ctx.fingerprint}"
    _prepare_resume(ctx, name)
    state = _fresh_state_actor(ctx.fingerprint)
    trainer = _torch_trainer(p, _loop_config(ctx, p, recipe, state, lineage), name, storage)
    t0 = time.time()
    outcome, snap = _fit_following(ctx, trainer, state, t0)
    seconds = time.time() - t0
    _raise_unless_saved(outcome, snap)
    ctx.adopt("model", "model")
    ctx.metrics.update({**_training_record(ctx, p, snap, lineage, name, seconds), **(metrics or {})})
    ctx.log(json.dumps({k: v for k, v in ctx.metrics.items() if k not in ("loss_curve", "worker_starts", "curves")}))
    return snap


def _prepare_resume(ctx: StageContext, name: str) -> None:
    """Log the checkpoint step the run ``name`` resumes from; a torn snapshot is moved aside (step 0)."""
    try:
        step = registered_checkpoint_step(ctx.storage, f"{ctx.checkpoint_root}/{name}")
    except TornSnapshot as e:  # Ray Train would fail on it: set it aside and train from the start
        snap = f"{ctx.checkpoint_root}/{name}/{SNAPSHOT}"
        ctx.storage.fs.mv(snap, f"{snap}.torn")
        ctx.log(f"{e}: moved to {SNAPSHOT}.torn; training starts from step 0")
        step = None
    if step is not None:
        ctx.log(f"resuming from the checkpoint at step {step} ({ctx.storage.uri(ctx.checkpoint_root)}/{name})")


def _fresh_state_actor(fingerprint: str):
    """A new named :class:`TrainState` actor for the run, replacing one an earlier attempt left."""
    import ray

    try:  # left over by an earlier attempt in this Ray session
        ray.kill(ray.get_actor(state_actor_name(fingerprint)))
    except ValueError:
        pass
    return ray.remote(num_cpus=0)(TrainState).options(name=state_actor_name(fingerprint)).remote()


def _loop_config(ctx: StageContext, p, recipe: str, state, lineage: dict) -> dict:
    """What ``train_loop`` gets on every worker: params, storage, state actor, recipe, paths, lineage."""
    return {"params": p.model_dump(mode="json"), "storage": ctx.storage, "state": state,
            "recipe": recipe, "model_uri": ctx.model_uri("model", p.model),
            "data_path": ctx.inputs["data"].path, "out_path": ctx.output_path("model"),
            "lineage": lineage}


def _torch_trainer(p, loop_config: dict, name: str, storage: tuple):
    """Ray Train's ``TorchTrainer`` running ``train_loop`` on ``p``'s workers, its run ``name`` in ``storage``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = storage
    per_worker = {"CPU": p.num_cpus, **({"GPU": p.num_gpus} if p.num_gpus else {}), **p.resources}
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=p.num_workers, use_gpu=p.num_gpus > 0,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=p.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=p.keep_checkpoints)),
    )


def _fit_following(ctx: StageContext, trainer, state, t0: float) -> tuple[dict, dict]:
    """Fit on a thread while drawing progress, then kill the state actor; the outcome and the last snapshot."""
    import ray

    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 (reported on the driver thread by run_training)
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="train-fit", daemon=True)
    thread.start()
    try:
        snap = _follow(ctx, state, thread, t0)
    finally:
        ray.kill(state)
    return outcome, snap


def _raise_unless_saved(outcome: dict, snap: dict) -> None:
    """Raise a StageError when the fit failed or ended without rank 0 saving the model."""
    if "error" in outcome:
        err = outcome["error"]
        raise StageError(f"training failed after {len(snap['starts'])} worker start(s): "
                         f"{type(err).__name__}: {err}") from err
    if snap["final"] is None:
        raise StageError("training ended without rank 0 saving the model")


def _worker_starts(snap: dict) -> list[dict]:
    """Per worker-group start: the checkpoint step it resumed from and the first and last step it ran."""
    starts = []
    for st in (s for s in snap["starts"] if s["rank"] == 0):
        ran = [step for a, step in snap["steps"] if a == st["attempt"]]
        starts.append({"resumed_from_step": st["resumed_from_step"],
                       "first_step": ran[0] if ran else None, "last_step": ran[-1] if ran else None})
    return starts


def _training_record(ctx: StageContext, p, snap: dict, lineage: dict, name: str, seconds: float) -> dict:
    """The stage record's training figures, from the workers' last snapshot."""
    final = snap["final"]
    tok_s = snap["tokens"] / snap["train_seconds"] if snap["train_seconds"] else 0.0
    starts = _worker_starts(snap)
    known = {"steps", "train_loss", "last_attempt_seconds", "non_embedding_parameters"}
    return {
        "rows": lineage["trained_on"][0]["rows"],  # from the manifest read once for the lineage
        "steps": final["steps"],
        "planned_steps": snap["total_steps"],
        "steps_run": len(snap["steps"]),
        "train_loss": final["train_loss"],
        "final_loss": snap["losses"][-1][1] if snap["losses"] else None,
        "loss_curve": [[s, round(v, 4)] for s, v in snap["losses"]],
        **({"curves": {k: [[s, round(v, 4)] for s, v in c] for k, c in snap["curves"].items()}}
           if snap.get("curves") else {}),
        "seconds": round(seconds, 2),
        "train_seconds": round(snap["train_seconds"], 2),
        "train_tokens": snap["tokens"],
        "tokens_per_second": round(tok_s, 1),
        "num_workers": p.num_workers,
        **{k: v for k, v in final.items() if k not in known},  # the recipe's own (sft: lm_head as run)
        "worker_starts": starts,  # per worker-group start: the checkpoint step it resumed from, first/last step
        "checkpoints": snap["checkpoints"],
        "checkpoint_dir": ctx.storage.uri(f"{ctx.checkpoint_root}/{name}"),
        "non_embedding_parameters": final["non_embedding_parameters"],
        **mfu(p, final["non_embedding_parameters"], tok_s),
    }


def _follow(ctx: StageContext, state, thread: threading.Thread, t0: float) -> dict:
    """Poll the workers' state and draw it until training ends; the last snapshot."""
    import ray

    bar = ctx.progress("training", None)
    said_resume: set[int] = set()
    snap: dict = {}
    while True:
        alive = thread.is_alive()
        try:
            snap = ray.get(state.snapshot.remote(), timeout=30)
        except Exception:  # noqa: BLE001 (the driver keeps waiting on fit(); progress is best effort)
            snap = snap or {"starts": [], "steps": [], "losses": [], "curves": {}, "checkpoints": [], "tokens": 0,
                            "train_seconds": 0.0, "total_steps": None, "final": None, "last_step": 0}
        for s in snap["starts"]:
            if s["rank"] == 0 and s["attempt"] not in said_resume:
                said_resume.add(s["attempt"])
                where = (f"resumed from checkpoint at step {s['resumed_from_step']}"
                         if s["resumed_from_step"] is not None else "from step 0")
                ctx.log(f"worker group start {s['attempt'] + 1}: {where}")
        total, step = snap["total_steps"], snap["last_step"]
        elapsed = time.time() - t0
        info = []
        if snap["losses"]:
            info.append(f"loss {snap['losses'][-1][1]:.3f}")
        if snap["tokens"] and snap["train_seconds"]:
            info.append(f"{snap['tokens'] / snap['train_seconds']:,.0f} tok/s")
        first = next((s["resumed_from_step"] or 0 for s in reversed(snap["starts"]) if s["rank"] == 0), 0)
        if total and step > first:
            rate = (step - first) / max(elapsed, 1e-9)
            info.append(f"ETA {max(0.0, (total - step) / rate):.0f}s")
        if first:
            info.append(f"resumed @ {first}")
        bar.update(step, total, "  ".join(info))
        if not alive:
            break
        thread.join(timeout=1.0)
    bar.close()
    return snap
