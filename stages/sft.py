"""sft: fine-tune a student with TRL's ``SFTTrainer`` on chat rows, on Ray Train; loss on assistant tokens only.

Inputs: ``data`` (a dataset with a ``messages`` column) and the starting model,
as ``params.model`` (a local folder or URI) or an input ``model``.
Output ``model``: the Hugging Face checkpoint (weights + tokenizer) in storage,
committed (manifest last) only once training has finished. Its lineage lists
the exact dataset manifests it trained on (URI, fingerprint, manifest sha256).

Each row becomes TRL's conversational prompt/completion form (all turns but the
last as the prompt, the final assistant turn as the completion), so TRL masks
the loss to the completion whatever the tokenizer's chat template is.

Distribution. A ``ray.train.torch.TorchTrainer`` runs ``num_workers`` workers
(each ``num_cpus`` / ``num_gpus`` / ``resources``); Ray Train sets up the process
group (gloo on CPU, NCCL on GPU) and TRL's trainer runs DDP on it. ``batch_size``
is the *global* batch per optimizer step, split over workers and ``grad_accum``,
so the same config trains the same model on 1 worker or 8 (``num_workers`` is not
part of the fingerprint).

Checkpoints. Every ``checkpoint_every`` optimizer steps (and at the end) each
worker reports its part of the Hugging Face checkpoint (weights, optimizer,
scheduler, RNG states, trainer state) through ``ray.train.report``; Ray Train
writes them under the stage's checkpoint folder in the project's storage (local
or S3, through fsspec), in a run named after the stage fingerprint. A worker
group restarted after a failure (``max_failures``), or a rerun of the stage after
the driver was killed, finds the last reported checkpoint through
``ray.train.get_checkpoint()`` and passes it to ``trainer.train(resume_from_checkpoint=...)``:
training continues at the checkpoint's step + 1, with the same data order.

Batching (``batching``): ``padded`` (each batch padded to its longest row),
``group_by_length`` (length-grouped batches: less padding, a different batch
order), ``padding_free`` (rows concatenated with position ids; correct with
sdpa/eager attention through a block-diagonal mask, fast with FlashAttention; TRL does
not truncate rows to ``max_length`` in this mode).
``benchmarks/sft.py`` measures them; on a CPU ``padded`` is the default (see README).

Progress: workers push step, loss and tokens to a small actor the driver polls,
so the terminal shows step/total, loss, tokens/s, ETA and the checkpoint training
resumed from. The stage record holds the loss curve, tokens/s and, on GPU, MFU.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline import fit, layout, resources
from pipeline.stage import NOT_OUTPUT, Stage, StageContext, StageError

NO_FP = NOT_OUTPUT  # the params marker "does not change output" (``pipeline.stage``)

# Dense peak FLOP/s used for MFU, by GPU name fragment (bf16 tensor cores / fp32).
PEAK_FLOPS = {"H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12),
              "L40S": (362e12, 91.6e12), "L4": (121e12, 30.3e12), "A10G": (125e12, 31.2e12)}


# lm_head: auto takes the model's own forward when one micro-batch's float32 logits fit in this
FULL_LOGITS_BYTES = 256 * 2**20


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    merge: bool = Field(True, description="merge the adapters into the saved weights (a plain checkpoint vLLM loads)")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # the path keys nothing: the model's files key the stage (external_fingerprint, or the wired input's digest)
    model: str | None = Field(None, json_schema_extra=NOT_OUTPUT,
                              description="starting model folder or URI (or wire input 'model')")
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="overrides epochs when > 0")
    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1, description="global batch per optimizer step (all workers, all accumulation steps)")
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=8)
    seed: int = 0
    gradient_checkpointing: bool = False
    bf16: bool = False
    batching: Literal["padded", "group_by_length", "padding_free"] = "padded"
    lm_head: Literal["auto", "fused", "full"] = Field(
        "auto", description="auto: full when a micro-batch's float32 logits (batch_size / grad_accum x "
        "max_length x vocabulary) take at most 256 MiB, fused otherwise (and with padding_free, whose rows are not "
        "truncated); fused: TRL's chunked LM head computes the loss without materializing the "
        "[batch, length, vocab] logits (what large vocabularies need); full: the model's own forward with labels, "
        "faster for small vocabularies (same loss value, other float rounding)")
    lora: LoraSpec | None = None
    # where and how it runs: not part of the fingerprint
    num_workers: int = Field(1, ge=1, json_schema_extra=NO_FP)
    num_cpus: float = Field(2, gt=0, json_schema_extra=NO_FP, description="per worker")
    num_gpus: float = Field(0, ge=0, json_schema_extra=NO_FP, description="per worker")
    resources: dict[str, float] = Field(default_factory=dict, json_schema_extra=NO_FP,
                                        description="custom Ray resources per worker")
    max_failures: int = Field(2, ge=-1, json_schema_extra=NO_FP, description="worker-group restarts; -1: forever")
    checkpoint_every: int = Field(100, ge=1, json_schema_extra=NO_FP, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, json_schema_extra=NO_FP)
    logging_steps: int = Field(10, ge=1, json_schema_extra=NO_FP)

    def per_device_batch(self) -> int:
        return self.batch_size // (self.num_workers * self.grad_accum)

    def resolved_lm_head(self, vocab_size: int) -> str:
        """``lm_head`` with ``auto`` decided. The bound takes the whole global micro-batch (not the
        per-worker share), so the choice depends only on fingerprinted settings and the model."""
        if self.lm_head != "auto":
            return self.lm_head
        if self.batching == "padding_free":
            return "fused"
        micro = -(-self.batch_size // self.grad_accum)
        return "full" if micro * self.max_length * vocab_size * 4 <= FULL_LOGITS_BYTES else "fused"


def to_prompt_completion(messages: list[dict]) -> dict | None:
    """Split chat turns into TRL's conversational prompt/completion; None if the last turn isn't the assistant's."""
    if not messages or messages[-1].get("role") != "assistant" or len(messages) < 2:
        return None
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}


_REASONING_PROBE = "<think>\nreasoning to keep\n</think>\nanswer"


def template_rewrites_reasoning(tok) -> bool:
    """Whether the tokenizer's chat template changes an assistant turn that holds a think
    block, as the DeepSeek-R1-distill template does (it keeps only what follows ``</think>``,
    meant for earlier turns, but TRL renders the trained turn through it too)."""
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _REASONING_PROBE}]
    try:
        return _REASONING_PROBE not in tok.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template that cannot render this probe: leave the rows to TRL
        return False


def rendered_prompt_completion(tok) -> Callable[[list[dict]], dict | None]:
    """Rows as text for a template that rewrites reasoning (``template_rewrites_reasoning``):
    the prompt rendered by the template with its generation prompt (what the engine sends,
    pre-filled ``<think>`` included), the completion the assistant turn as it is (less any
    opening the generation prompt already holds). TRL then appends EOS, trains on the whole
    completion, think block included, and the model sees the context it sees at inference."""
    bos = tok.bos_token if tok.bos_token and tok("x")["input_ids"][:1] == [tok.bos_token_id] else None

    def convert(messages: list[dict]) -> dict | None:
        ex = to_prompt_completion(messages)
        if ex is None:
            return None
        prompt = tok.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=False)
        if bos and prompt.startswith(bos):  # the tokenizer adds it again
            prompt = prompt[len(bos):]
        content = ex["completion"][0]["content"]
        overlap = next((k for k in range(min(len(prompt), len(content), 64), 0, -1) if prompt.endswith(content[:k])), 0)
        return {"prompt": prompt, "completion": content[overlap:]}

    return convert


def _converter(tokenizer_dir: str | None):
    """How chat rows become TRL examples for this model's template: conversational by default,
    rendered text where the template would drop the trained reasoning."""
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        if template_rewrites_reasoning(tok):
            return rendered_prompt_completion(tok)
    return to_prompt_completion


def sft_config(p: Params, output_dir: str, save: bool = False):
    import torch
    from trl import SFTConfig

    return SFTConfig(
        output_dir=output_dir,
        num_train_epochs=p.epochs,
        max_steps=p.max_steps,
        learning_rate=p.learning_rate,
        lr_scheduler_type=p.lr_scheduler,
        warmup_steps=p.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        weight_decay=p.weight_decay,
        per_device_train_batch_size=p.per_device_batch(),
        gradient_accumulation_steps=p.grad_accum,
        # TRL does not truncate padding-free batches (without packing): rows keep their full length
        max_length=None if p.batching == "padding_free" else p.max_length,
        seed=p.seed,
        data_seed=p.seed,
        gradient_checkpointing=p.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if p.gradient_checkpointing else None,
        bf16=p.bf16,
        fp16=False,
        use_cpu=p.num_gpus == 0 or not torch.cuda.is_available(),
        logging_steps=p.logging_steps,
        save_strategy="steps" if save else "no",
        save_steps=p.checkpoint_every,
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        completion_only_loss=True,
        padding_free=p.batching == "padding_free",
        train_sampling_strategy="group_by_length" if p.batching == "group_by_length" else "random",
        ddp_find_unused_parameters=False,
    )


def training_dataset(files: list[str], cache_dir: str, tokenizer_dir: str | None = None):
    """The training rows of a dataset's shards (local Parquet files, in order) as TRL's
    conversational prompt/completion, Arrow-backed and memory-mapped from ``datasets``' cache
    files under ``cache_dir``: a worker streams the shards through, never holding the rows as
    Python objects. A row that is not chat turns ending with the assistant raises. With
    ``tokenizer_dir`` whose template rewrites reasoning, rows are rendered as text instead
    (``rendered_prompt_completion``)."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    ds = Dataset.from_parquet(files, columns=["messages"], cache_dir=cache_dir)
    split = _converter(tokenizer_dir)

    def convert(batch: dict, idx: list[int]) -> dict:
        out: dict[str, list] = {"prompt": [], "completion": []}
        for i, msgs in zip(idx, batch["messages"]):
            ex = split(msgs or [])
            if ex is None:
                raise StageError(f"row {i} of the training data does not end with an assistant turn")
            out["prompt"].append(ex["prompt"])
            out["completion"].append(ex["completion"])
        return out

    return ds.map(convert, batched=True, batch_size=1024, with_indices=True, remove_columns=ds.column_names,
                  cache_file_name=os.path.join(cache_dir, "prompt-completion.arrow"))


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


def build_trainer(model_dir: str, rows, p: Params, output_dir: str, save: bool = False):
    """The SFTTrainer for ``rows``: a ``datasets.Dataset`` of prompt/completion
    (``training_dataset``), or dicts with ``messages``; rows that are not chat turns ending with
    the assistant raise."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if isinstance(rows, Dataset):
        train = rows
    else:
        examples = []
        split = _converter(model_dir)
        for i, r in enumerate(rows):
            ex = split(r["messages"])
            if ex is None:
                raise StageError(f"row {i} of the training data does not end with an assistant turn")
            examples.append(ex)
        train = Dataset.from_list(examples)
    if not len(train):
        raise StageError("no training rows")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    peft_config = None
    if p.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=p.lora.r, lora_alpha=p.lora.alpha, lora_dropout=p.lora.dropout,
                                 target_modules=p.lora.target_modules, task_type="CAUSAL_LM")
    trainer = trainer_class()(model=model, args=sft_config(p, output_dir, save),
                              train_dataset=train, processing_class=tok, peft_config=peft_config)
    trainer.lm_head = p.resolved_lm_head(model.get_output_embeddings().weight.shape[0])
    # without tqdm, transformers prints every log dict to stdout; the stage draws its own progress
    trainer.remove_callback(PrinterCallback)
    return trainer


@functools.cache
def trainer_class():
    """TRL's ``SFTTrainer``; with ``lm_head`` set to ``full`` on an instance, its
    training loss is taken from the model's own forward with labels, the loss a plain PyTorch
    loop computes (summed over completion tokens, divided by the batch's completion tokens
    across ranks, as TRL's), instead of TRL's chunked fused LM head, which also yields per-token
    entropy and top-1 hits on every step. Then ``entropy`` and ``mean_token_accuracy`` are
    computed from the logits on logging steps only (the logged value is that step's, not an
    average since the last log), and the token count is gathered across ranks there too.
    Evaluation, label smoothing, DFT and MoE auxiliary losses always keep TRL's own path."""
    import torch
    from transformers import Trainer
    from trl import SFTTrainer

    class StageSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if (getattr(self, "lm_head", "fused") != "full" or return_outputs or not self.model.training
                    or self.compute_loss_func is not None
                    or self.label_smoother is not None or self.args.loss_type != "nll" or self.aux_loss_enabled):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False
            loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            metrics, gather = self._metrics["train"], self.accelerator.gather_for_metrics
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:  # padding-free: one row of packed sequences
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            self._pending_tokens = getattr(self, "_pending_tokens", 0) + local.detach()
            if (self.state.global_step + 1) % max(1, int(self.args.logging_steps)) == 0:  # the step that is logged
                with torch.no_grad():  # every rank reaches here on the same steps: the gathers match
                    logits = outputs.logits[:, :-1].float()
                    labels = inputs["labels"][:, 1:]
                    mask = labels != -100
                    logp = torch.log_softmax(logits, dim=-1)
                    entropy = -(logp.exp() * logp).sum(-1)
                    n = gather(mask.sum()).sum()
                    ent = gather((entropy * mask).sum()).sum()
                    hit = gather(((logits.argmax(-1) == labels) & mask).sum()).sum()
                    metrics["entropy"].append((ent / n).item() if n > 0 else 0.0)
                    metrics["mean_token_accuracy"].append((hit / n).item() if n > 0 else 0.0)
                    self._total_train_tokens += gather(self._pending_tokens).sum().item() // self._tp_size
                    self._pending_tokens = 0
                    metrics["num_tokens"] = [self._total_train_tokens]
            return loss

    return StageSFTTrainer


def count_tokens(trainer) -> dict:
    """Wrap ``trainer.training_step`` to count the non-padding tokens it trains on."""
    tokens = {"n": 0}
    orig = trainer.training_step

    def counting_step(model, inputs, *a, **kw):
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

    def log(self, step: int, loss: float) -> None:
        self.losses.append((step, loss))

    def checkpoint(self, step: int) -> None:
        self.checkpoints.append(step)

    def finish(self, metrics: dict) -> None:
        self.final = metrics

    def snapshot(self) -> dict:
        return {"starts": list(self.starts), "steps": list(self.steps), "losses": list(self.losses),
                "checkpoints": list(self.checkpoints), "tokens": sum(self.tokens.values()),
                "train_seconds": self.train_seconds(),
                "total_steps": self.total_steps, "final": self.final,
                "last_step": self.steps[-1][1] if self.steps else 0}


SNAPSHOT = layout.TRAIN_SNAPSHOT  # Ray Train's record of the checkpoints it registered


def registered_checkpoint_step(storage, run_dir: str) -> int | None:
    """The step of the last checkpoint Ray Train registered for the run in ``run_dir`` (what a
    restarted worker group or a rerun resumes from), read from its snapshot in storage."""
    try:
        snap = storage.read_json(f"{run_dir}/{SNAPSHOT}")
    except FileNotFoundError:
        return None
    latest = snap.get("latest_checkpoint_result")
    return int(latest["metrics"]["step"]) if latest else None


def state_actor_name(fingerprint: str) -> str:
    """The name of the actor holding a training run's :class:`TrainState` (tests read it)."""
    return f"distill-sft-{fingerprint}"


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
                state.log.remote(st.global_step, float(logs["loss"]))

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
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    import torch

    p = Params.model_validate(config["params"])
    storage = config["storage"]
    state = config["state"]
    rank = ray.train.get_context().get_world_rank()
    if p.num_gpus == 0:
        torch.set_num_threads(max(1, int(p.num_cpus)))
    torch.manual_seed(p.seed)
    model_dir = resources.localize_model(config["model_uri"])
    work = tempfile.mkdtemp(prefix="distill-sft-")
    try:
        files = local_dataset_files(storage, config["data_path"], os.path.join(work, "data"))
        rows = training_dataset(files, os.path.join(work, "datasets-cache"), model_dir)
        trainer = build_trainer(model_dir, rows, p, work, save=True)
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
        if p.lora is not None and p.lora.merge:
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
            "lm_head": trainer.lm_head,
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


def _mfu(p: Params, params_n: int, tok_s: float) -> dict:
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


class SFT(Stage):
    kind: ClassVar[str] = "sft"
    version: ClassVar[str] = "2"  # keyed by this version, bumped by hand, not by a hash of the code
    code_hash: ClassVar[bool] = False
    Params = Params
    inputs: ClassVar[dict] = {"data": "dataset", "model": "model"}
    input_columns: ClassVar[dict] = {"data": {"messages": "messages"}}
    optional_inputs: ClassVar[frozenset] = frozenset({"model"})
    outputs: ClassVar[dict] = {"model": "model"}

    def check(self) -> list[tuple[str, str]]:
        p: Params = self.params
        out = resources.model_params_problems(p, ("model",)) + fit.training_problems(p.model, p)
        if p.batch_size % (p.num_workers * p.grad_accum):
            out.append(("batch_size", f"the global batch {p.batch_size} must be a multiple of "
                                      f"num_workers x grad_accum ({p.num_workers} x {p.grad_accum})"))
        return out

    def external_fingerprint(self) -> dict:
        return resources.model_params_fingerprint(self.params, ("model",))

    def run(self, ctx: StageContext) -> None:
        import ray
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        p: Params = self.params
        storage_path, storage_fs = ray_storage(ctx.storage, ctx.checkpoint_root)
        lineage = lineage_with_data(ctx)
        name = f"train-{ctx.fingerprint}"
        step = registered_checkpoint_step(ctx.storage, f"{ctx.checkpoint_root}/{name}")
        if step is not None:
            ctx.log(f"resuming from the checkpoint at step {step} ({ctx.storage.uri(ctx.checkpoint_root)}/{name})")
        try:  # left over by an earlier attempt in this Ray session
            ray.kill(ray.get_actor(state_actor_name(ctx.fingerprint)))
        except ValueError:
            pass
        state = ray.remote(num_cpus=0)(TrainState).options(name=state_actor_name(ctx.fingerprint)).remote()
        per_worker = {"CPU": p.num_cpus, **({"GPU": p.num_gpus} if p.num_gpus else {}), **p.resources}
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"params": p.model_dump(mode="json"), "storage": ctx.storage, "state": state,
                               "model_uri": ctx.model_uri("model", p.model), "data_path": ctx.inputs["data"].path,
                               "out_path": ctx.output_path("model"), "lineage": lineage},
            scaling_config=ScalingConfig(num_workers=p.num_workers, use_gpu=p.num_gpus > 0,
                                         resources_per_worker=per_worker),
            run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                                 failure_config=FailureConfig(max_failures=p.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=p.keep_checkpoints)),
        )
        outcome: dict = {}

        def fit():
            try:
                outcome["result"] = trainer.fit()
            except BaseException as e:  # reported on the driver thread below
                outcome["error"] = e

        t0 = time.time()
        thread = threading.Thread(target=fit, name="sft-fit", daemon=True)
        thread.start()
        try:
            snap = self._follow(ctx, state, thread, t0)
        finally:
            ray.kill(state)
        seconds = time.time() - t0
        if "error" in outcome:
            err = outcome["error"]
            raise StageError(f"training failed after {len(snap['starts'])} worker start(s): "
                             f"{type(err).__name__}: {err}") from err
        if snap["final"] is None:
            raise StageError("training ended without rank 0 saving the model")
        ctx.adopt("model", "model")
        final = snap["final"]
        tok_s = snap["tokens"] / snap["train_seconds"] if snap["train_seconds"] else 0.0
        starts = []
        for st in (s for s in snap["starts"] if s["rank"] == 0):
            ran = [step for a, step in snap["steps"] if a == st["attempt"]]
            starts.append({"resumed_from_step": st["resumed_from_step"],
                           "first_step": ran[0] if ran else None, "last_step": ran[-1] if ran else None})
        ctx.metrics.update({
            "rows": lineage["trained_on"][0]["rows"],  # from the manifest read once for the lineage
            "steps": final["steps"],
            "planned_steps": snap["total_steps"],
            "steps_run": len(snap["steps"]),
            "train_loss": final["train_loss"],
            "final_loss": snap["losses"][-1][1] if snap["losses"] else None,
            "loss_curve": [[s, round(v, 4)] for s, v in snap["losses"]],
            "seconds": round(seconds, 2),
            "train_seconds": round(snap["train_seconds"], 2),
            "train_tokens": snap["tokens"],
            "tokens_per_second": round(tok_s, 1),
            "num_workers": p.num_workers,
            "lm_head": final["lm_head"],  # as run: lm_head auto decided for this model
            "worker_starts": starts,  # per worker-group start: the checkpoint step it resumed from, first/last step
            "checkpoints": snap["checkpoints"],
            "checkpoint_dir": ctx.storage.uri(f"{ctx.checkpoint_root}/{name}"),
            "non_embedding_parameters": final["non_embedding_parameters"],
            **_mfu(p, final["non_embedding_parameters"], tok_s),
        })
        ctx.log(json.dumps({k: v for k, v in ctx.metrics.items() if k not in ("loss_curve", "worker_starts")}))

    @staticmethod
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
            except Exception:  # the driver keeps waiting on fit(); progress is best effort
                snap = snap or {"starts": [], "steps": [], "losses": [], "checkpoints": [], "tokens": 0,
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
