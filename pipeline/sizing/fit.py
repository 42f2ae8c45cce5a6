"""Resource fit, checked at plan time: does each engine replica and each training worker fit
in the memory of the GPU it asks for?

The GPU is the one a stage asks Ray for: the resource ``accelerator_type:<TYPE>`` in the
engine's ``resources`` (generate, evaluate) or the trainer's ``resources`` (sft), with
``<TYPE>`` a key of ``pipeline/sizing/data/gpus.yaml`` (Ray's accelerator names: A100-80G, H100,
H200, L4, ...). A stage without GPUs (``num_gpus: 0``) or without an accelerator type is not
checked (its fit cannot be known), nor is a model wired from an upstream stage (it may not
exist yet at plan time).

The architecture comes from the model's ``config.json`` (``arch``): layers, hidden size,
attention and KV heads, head dim, intermediate size, vocabulary, tied embeddings, dtype,
and the parameter count derived from them (dense and Qwen/DeepSeek-style MoE decoders).

- Engine replica, per GPU: weight bytes ÷ TP + KV bytes per token (per rank) ×
  ``max_model_len`` × concurrent sequences ≤ GPU memory × ``gpu_memory_utilization`` (vLLM's
  default 0.9). Concurrent sequences are ``max_num_seqs`` when set, else 1: vLLM needs at
  least one full-length sequence to fit and admits more as the KV cache allows (the number that
  fit at full length is in the message). KV heads are split across TP ranks (replicated when
  there are fewer heads than ranks).
- Training worker: the trainer loads float32 weights (stages/sft.py), so 4 bytes of weights,
  4 of gradients and 8 of Adam states per trainable parameter (weights only, at 4 bytes, for
  the frozen part under LoRA), replicated on each worker (DDP). Activations are not counted.

Bytes are binary: a GiB is 2**30 bytes.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.sizing import hub

GIB = 2**30
GPUS_FILE = Path(__file__).parent / "data" / "gpus.yaml"
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "fp8": 1, "float8_e4m3fn": 1,
               "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1}
VLLM_DEFAULT_UTILIZATION = 0.9
ACCEL = "accelerator_type:"


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bandwidth_gbs: float
    bf16_tflops: float
    source: str

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB


@functools.cache
def gpus() -> dict[str, GPU]:
    with open(GPUS_FILE) as f:
        raw = yaml.safe_load(f)
    return {k: GPU(k, float(v["memory_gib"]), float(v["bandwidth_gbs"]), float(v["bf16_tflops"]), v["source"])
            for k, v in raw.items()}


def gpu(name: str) -> GPU:
    table = gpus()
    if name not in table:
        raise KeyError(f"unknown accelerator type {name!r} (known: {', '.join(table)}; add it to {GPUS_FILE})")
    return table[name]


def accelerator_of(resources: dict[str, float]) -> str | None:
    """The accelerator type a stage asks Ray for (``accelerator_type:H100``), if any."""
    names = [k[len(ACCEL):] for k in resources if k.startswith(ACCEL)]
    return names[0] if names else None


@dataclass(frozen=True)
class Arch:
    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    dtype_bytes: int
    params: int  # every parameter
    active_params: int  # those used per token (differs from params for MoE)

    def kv_bytes_per_token(self, tp: int = 1, dtype_bytes: int | None = None) -> int:
        """K and V of every layer for one token, on one of ``tp`` tensor-parallel ranks."""
        heads = max(1, math.ceil(self.kv_heads / tp))
        return 2 * self.layers * heads * self.head_dim * (dtype_bytes or self.dtype_bytes)

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes


def _first(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def arch(cfg: dict) -> Arch:
    """Architecture figures of a decoder-only transformer from its ``config.json``."""
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers: the language model
        cfg = {**cfg["text_config"], **{k: v for k, v in cfg.items() if k in ("torch_dtype", "dtype")}}
    try:
        h = int(cfg["hidden_size"])
        layers = int(_first(cfg, "num_hidden_layers", "n_layer"))
        heads = int(_first(cfg, "num_attention_heads", "n_head"))
        vocab = int(cfg["vocab_size"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"config.json has no {e} (not a decoder-only transformer config?)") from None
    kv = int(_first(cfg, "num_key_value_heads", default=heads))
    hd = int(_first(cfg, "head_dim", default=h // heads))
    inter = int(_first(cfg, "intermediate_size", "n_inner", default=4 * h))
    tied = bool(cfg.get("tie_word_embeddings", True))
    dtype = str(_first(cfg, "torch_dtype", "dtype", default="float32")).replace("torch.", "")
    dbytes = DTYPE_BYTES.get(dtype, 4)
    mt = str(cfg.get("model_type", ""))

    bias = mt == "qwen2" or bool(cfg.get("attention_bias"))
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    if bias:
        attn += heads * hd + 2 * kv * hd
    if mt.startswith("qwen3"):
        attn += 2 * hd  # q_norm, k_norm
    dense_mlp = 3 * h * inter  # gated (SwiGLU) MLP
    experts = _first(cfg, "num_experts", "n_routed_experts")
    per_layer = attn + 2 * h
    if experts:
        e, k = int(experts), int(_first(cfg, "num_experts_per_tok", default=1))
        moe_inter = int(_first(cfg, "moe_intermediate_size", default=inter))
        shared = int(_first(cfg, "n_shared_experts", default=0)) * 3 * h * moe_inter
        shared += 3 * h * int(cfg.get("shared_expert_intermediate_size") or 0)
        moe_all, moe_active = e * 3 * h * moe_inter + h * e + shared, k * 3 * h * moe_inter + h * e + shared
        dense_layers = int(_first(cfg, "first_k_dense_replace", default=0))
        total = dense_layers * (per_layer + dense_mlp) + (layers - dense_layers) * (per_layer + moe_all)
        active = dense_layers * (per_layer + dense_mlp) + (layers - dense_layers) * (per_layer + moe_active)
    else:
        total = active = layers * (per_layer + dense_mlp)
    head_and_embed = vocab * h * (1 if tied else 2) + h
    return Arch(mt, layers, h, heads, kv, hd, inter, vocab, tied, dbytes, total + head_and_embed,
                active + head_and_embed)


def model_config(uri: str | None) -> dict | None:
    """The ``config.json`` of a model param (hub reference or local folder), or None."""
    if not uri:
        return None
    if hub.is_hub(uri):
        return hub.config(uri)
    if "://" not in uri:
        p = Path(uri) / "config.json"
        return json.loads(p.read_text()) if p.is_file() else None
    import fsspec

    try:
        with fsspec.open(f"{uri.rstrip('/')}/config.json", "rb") as f:  # a committed model artifact
            return json.loads(f.read())
    except (FileNotFoundError, OSError):
        return None


def _gib(b: float) -> str:
    return f"{b / GIB:.1f} GiB"


@dataclass
class EngineFit:
    gpu: GPU
    budget: float  # bytes usable on each GPU
    weights: float  # per GPU
    kv_per_token: int  # per GPU
    max_model_len: int
    seqs: int
    tp: int
    utilization: float

    @property
    def need(self) -> float:
        return self.weights + self.kv_per_token * self.max_model_len * self.seqs

    @property
    def ok(self) -> bool:
        return self.need <= self.budget

    @property
    def full_length_seqs(self) -> int:
        """How many sequences of ``max_model_len`` fit in what the weights leave."""
        return max(0, int((self.budget - self.weights) // max(1, self.kv_per_token * self.max_model_len)))

    def describe(self) -> str:
        return (f"per GPU: weights {_gib(self.weights * self.tp)} / tensor_parallel_size {self.tp} = "
                f"{_gib(self.weights)} + KV cache {self.kv_per_token / 2**10:.0f} KiB/token x max_model_len "
                f"{self.max_model_len} x {self.seqs} sequence(s) = {_gib(self.kv_per_token * self.max_model_len * self.seqs)}"
                f" -> {_gib(self.need)}, against {self.gpu.name} {self.gpu.memory_gib:g} GiB x "
                f"gpu_memory_utilization {self.utilization:g} = {_gib(self.budget)}; "
                f"{self.full_length_seqs} full-length sequence(s) fit")


def engine_fit(a: Arch, g: GPU, *, tp: int, max_model_len: int, seqs: int = 1, utilization: float | None = None,
               dtype: str = "auto", kv_cache_dtype: str | None = None) -> EngineFit:
    wbytes = DTYPE_BYTES.get(dtype, a.dtype_bytes) if dtype != "auto" else a.dtype_bytes
    kvbytes = DTYPE_BYTES.get(kv_cache_dtype or "", wbytes)
    util = utilization or VLLM_DEFAULT_UTILIZATION
    return EngineFit(g, g.memory_bytes * util, a.params * wbytes / tp, a.kv_bytes_per_token(tp, kvbytes),
                     max_model_len, seqs, tp, util)


def _gpu_and_config(model: str | None, spec, field: str) -> tuple[GPU, dict] | list[tuple[str, str]]:
    """(GPU, model config) that ``spec`` (an EngineSpec or training params: ``resources``,
    ``num_gpus``) runs ``model`` on; else the problems to report: none when there is nothing to
    check (no GPU type, no config; a hub error is the model check's), or an unknown GPU type."""
    accel = accelerator_of(spec.resources)
    if spec.num_gpus <= 0 or accel is None:
        return []
    try:
        g = gpu(accel)
    except KeyError as e:
        return [(field, e.args[0])]
    try:
        cfg = model_config(model)
    except hub.HubError:
        return []  # reported by the model check
    return [] if cfg is None else (g, cfg)


def engine_problems(model: str | None, engine, prefix: str = "engine", max_len_default: int | None = None) -> list[tuple[str, str]]:
    """``(field, message)`` when a replica of ``engine`` (an EngineSpec) serving ``model`` does
    not fit its GPU; nothing when it fits or cannot be checked (no GPU type, no config)."""
    got = _gpu_and_config(model, engine, f"{prefix}.resources")
    if not isinstance(got, tuple):
        return got
    g, cfg = got
    a = arch(cfg)
    max_len = engine.max_model_len or int(cfg.get("max_position_embeddings") or max_len_default or 0)
    if not max_len:
        return []
    f = engine_fit(a, g, tp=engine.tensor_parallel_size, max_model_len=max_len, seqs=engine.max_num_seqs or 1,
                   utilization=engine.gpu_memory_utilization, dtype=engine.dtype,
                   kv_cache_dtype=engine.options.get("kv_cache_dtype"))
    if f.ok:
        return []
    field = "tensor_parallel_size" if f.weights > f.budget else "max_model_len"
    hint = ("raise tensor_parallel_size or pick a larger GPU" if field == "tensor_parallel_size" else
            "lower max_model_len or max_num_seqs, raise tensor_parallel_size or pick a larger GPU")
    return [(f"{prefix}.{field}", f"{model} does not fit: {f.describe()}; {hint}")]


@dataclass
class TrainFit:
    gpu: GPU
    params: int
    trainable: int

    @property
    def need(self) -> float:
        return self.params * 4 + self.trainable * (4 + 8)

    @property
    def ok(self) -> bool:
        return self.need <= self.gpu.memory_bytes

    def describe(self) -> str:
        return (f"per worker: float32 weights {_gib(self.params * 4)} + gradients {_gib(self.trainable * 4)} + "
                f"Adam states {_gib(self.trainable * 8)} = {_gib(self.need)} ({self.params / 1e9:.2f}B parameters, "
                f"{self.trainable / 1e9:.2f}B trainable), against {self.gpu.name} {self.gpu.memory_gib:g} GiB")


def lora_trainable(a: Arch, rank: int) -> int:
    """LoRA adapters on every attention and MLP projection (an upper bound of the usual targets)."""
    q, kv, o = (a.hidden, a.heads * a.head_dim), (a.hidden, a.kv_heads * a.head_dim), (a.heads * a.head_dim, a.hidden)
    mlp = [(a.hidden, a.intermediate)] * 2 + [(a.intermediate, a.hidden)]
    return a.layers * sum(rank * (i + o_) for i, o_ in [q, kv, kv, o, *mlp])


def training_problems(model: str | None, params, prefix: str = "") -> list[tuple[str, str]]:
    """``(field, message)`` when one training worker of ``params`` (sft's) does not fit its GPU."""
    got = _gpu_and_config(model, params, f"{prefix}resources")
    if not isinstance(got, tuple):
        return got
    g, cfg = got
    a = arch(cfg)
    lora = getattr(params, "lora", None)
    trainable = lora_trainable(a, lora.r) if lora is not None and hasattr(lora, "r") else a.params
    f = TrainFit(g, a.params, trainable)
    if f.ok:
        return []
    return [(f"{prefix}model", f"{model} does not fit one training worker: {f.describe()}; use LoRA or a larger GPU")]
