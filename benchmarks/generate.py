"""benchmarks `generate`, `generate-startup`, `generate-variable`, `generate-variable-single` and
`generate-longtail` (with `-chunked` and `-async`).

Every side runs on a warm engine, ``BENCH_RUNS`` (default 3) times, interleaved (rounds
alternate which side goes first); each line gives the ratio of medians, the worst/best pairing
(``ratio_min``/``ratio_max``), the ratio within each round (``round_ratios``) and every run.

- `generate`: the generate stage's tok/s (run by the DAG runner: prompts read from storage,
  the engine in a Ray actor kept warm across runs (``DISTILL_KEEP_ENGINES=1``), each 32-prompt
  chunk committed as a checkpoint, the samples written as Parquet; each run in a fresh storage
  root, so nothing is cached; the stage's seconds, start-up excluded) ÷ raw ``vllm.LLM.generate``
  over the same prompts in this process. 256 prompts x 256 tokens (EOS ignored), a 2-layer,
  256-wide Llama. The line carries the stage's ``overhead`` metric per run: the CPU seconds of
  the stage's driver thread and of the engine actor's own code outside the engine, ÷ the
  engine's busy seconds (``overhead_fraction``), and the same with whole processes
  (``overhead_fraction_upper``, Ray's and vLLM's front-end threads included).
- `generate-startup`: seconds to a ready engine actor (the first stage run) ÷ constructing
  ``vllm.LLM`` here, once each (ratio = baseline ÷ ours: higher is better).
- `generate-variable`: outputs that end at a natural EOS, lengths spread over far more than
  10x: a tiny Llama built so that EOS has probability 1/``MEAN_LEN`` at every step (the other
  logits equal), so lengths are geometric (about 1 to 5x the mean; ``lengths`` gives the
  quantiles). The stage (``batch_size`` 32, ``chunks_in_flight`` 8) ÷ raw ``LLM.generate`` called
  chunk by chunk, 32 prompts at a time, each call waiting for its longest output, as a
  synchronous pipeline does. `generate-variable-single`: the same stage run ÷ one
  ``LLM.generate`` call over all prompts, the best a synchronous caller can do. Every side uses
  the stage's per-prompt seeds and prompt tokens, so all sides generate the same tokens
  (``tokens`` per side).

- `generate-longtail`: R1-like long tails. A Llama built so that each output ends at a natural
  EOS after a geometric number of tokens whose mean is drawn per output from a lognormal
  (``build_longtail_model``): p50 about half the mean, p99 over 8x p50 (``lengths``).
  ``16 x BENCH_LONGTAIL_WINDOW`` prompts; every engine caps running sequences at the window
  (``max_num_seqs``) and the stage keeps ``max_inflight`` = the window per replica, refilled
  per request. Against one ``LLM.generate`` over all prompts (`generate-longtail`), chunked
  ``LLM.generate`` with chunks of the window (`generate-longtail-chunked`: distilabel's and
  open-r1's pattern), and vLLM's ``AsyncLLM`` driven by an asyncio loop of the window's
  concurrency (`generate-longtail-async`: NeMo-Skills' pattern). ``mean_running``: completion
  tokens per engine iteration, per side.

Run: ``python benchmarks/generate.py [generate] [generate-variable] [generate-longtail]`` (all by
default).
Settings through the environment: ``BENCH_RUNS``; ``BENCH_PROMPTS``, ``BENCH_TOKENS`` (`generate`);
``BENCH_VARIABLE_PROMPTS``, ``BENCH_MEAN_LEN``, ``BENCH_VARIABLE_MAX_TOKENS``; ``BENCH_LONGTAIL_WINDOW``
(16), ``BENCH_LONGTAIL_PROMPTS`` (16 x the window), ``BENCH_LONGTAIL_RUNS`` (5), ``BENCH_LONGTAIL_MEDIAN`` (30),
``BENCH_LONGTAIL_SIGMA`` (0.7), ``BENCH_LONGTAIL_MAX_MODEL_LEN`` (2048), ``BENCH_LONGTAIL_HIDDEN``
(512, at least the vocabulary); ``BENCH_LAYERS``,
``BENCH_HIDDEN`` (the built models); ``BENCH_MODEL`` (a model folder for `generate` instead of
the built one); ``BENCH_ENGINE`` (JSON merged into the engine settings, for both sides).

On a GPU node (vLLM with CUDA installed; not measurable in this project yet: the device image
has no vLLM)::

    BENCH_ENGINE='{"num_gpus": 1, "dtype": "bfloat16", "enforce_eager": false,
                   "gpu_memory_utilization": 0.45, "kv_cache_gb": null, "max_model_len": 4096}' \\
    BENCH_PROMPTS=2048 BENCH_TOKENS=1024 BENCH_VARIABLE_PROMPTS=4096 BENCH_MEAN_LEN=400 \\
    BENCH_VARIABLE_MAX_TOKENS=3072 BENCH_LAYERS=24 BENCH_HIDDEN=2048 python benchmarks/generate.py

(two engines share the GPU: the raw one in this process and the stage's in its actor, hence
0.45 each; or set ``BENCH_MODEL=/models/Qwen2.5-7B-Instruct`` for `generate`).

The long-tail case on a GPU, at NeMo-Skills' concurrency (three engines share the GPU: the raw
``LLM``, the ``AsyncLLM`` and the stage's actor, hence 0.3 each), R1-like lengths scaled to the
context (median class length 1,500 tokens, sigma 0.7: mean about 1,850, p99 over 13,000 is
truncated at 16k)::

    BENCH_ENGINE='{"num_gpus": 1, "dtype": "bfloat16", "enforce_eager": false,
                   "gpu_memory_utilization": 0.3, "kv_cache_gb": null}' \
    BENCH_LONGTAIL_WINDOW=512 BENCH_LONGTAIL_MEDIAN=1500 BENCH_LONGTAIL_MAX_MODEL_LEN=16384 \
    BENCH_LAYERS=24 python benchmarks/generate.py generate-longtail

Roofline. Decoding is bound by memory traffic: each engine step reads every weight once and
each running sequence's KV cache, so tokens/s <= B x HBM_bandwidth / (weight_bytes + B x
kv_bytes_per_token x context), for B sequences in the batch. The 2-layer, 256-wide Llama here
has 1.4M parameters (5.6 MB in float32): on an H200 (4.8 TB/s) the bound is over 10^5 steps/s,
so with 256 sequences it never binds; the real limit is the host: vLLM's per-step CPU work
(scheduling, sampling, detokenising: on the order of 5-10 ms per step eagerly), i.e. about
25k-50k tok/s at B = 256. This is why the benchmark is a test of the pipeline's overhead and
scheduling, not of the model: on a 2-core CPU the engine step itself is the bound and the
pipeline must not add to it. For a 7B model in bfloat16 (15 GB of weights, 57 KB of KV per
token with 4 KV heads x 128 x 28 layers) on an H200: 4.8e12 / (15e9 + 256 x 57e3 x 1024) = 160
steps/s, about 41k tok/s at B = 256 and context 1k, a bound a measurement should reach within
~70% (attention kernels and sampling are not free). A pipeline ratio near 1 then means the
pipeline costs nothing next to the engine; `generate-variable` > 1 means it keeps the batch
full where a synchronous loop lets it drain.
"""
from __future__ import annotations

import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RUNS, build_model, emit, emit_medians, interleaved, toy_rows  # noqa: E402

N_PROMPTS = int(os.environ.get("BENCH_PROMPTS", "256"))
MAX_TOKENS = int(os.environ.get("BENCH_TOKENS", "256"))
VAR_PROMPTS = int(os.environ.get("BENCH_VARIABLE_PROMPTS", "256"))
MEAN_LEN = int(os.environ.get("BENCH_MEAN_LEN", "64"))
VAR_MAX_TOKENS = int(os.environ.get("BENCH_VARIABLE_MAX_TOKENS", "448"))
LAYERS, HIDDEN = int(os.environ.get("BENCH_LAYERS", "2")), int(os.environ.get("BENCH_HIDDEN", "256"))
BATCH_SIZE = 32  # the stage's default chunk (EngineSpec.batch_size)
ENGINE = {"max_model_len": 512, "kv_cache_gb": 1, "enforce_eager": True, "dtype": "float32",
          **json.loads(os.environ.get("BENCH_ENGINE", "{}"))}


def build_stopping_model(out: Path, mean_len: int) -> str:
    """A Llama whose next token is uniform over the vocabulary except EOS, which has probability
    1/``mean_len`` at every step, whatever the context: outputs end at a natural EOS after a
    geometric number of tokens. The residual stream is the token embedding alone (attention and
    MLP outputs zeroed, their compute still done), one embedding dimension holds a constant, and
    the output head reads only that dimension, into the EOS logit."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    build_model(out, layers=LAYERS, hidden=HIDDEN, max_pos=ENGINE["max_model_len"])
    tok = AutoTokenizer.from_pretrained(out)
    model = LlamaForCausalLM.from_pretrained(out)
    model.config.tie_word_embeddings = False
    cfg = model.config
    fresh = LlamaForCausalLM(cfg)  # untied head
    fresh.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        emb = fresh.model.embed_tokens.weight
        emb.normal_(0, 0.02)
        emb[:, 0] = 1.0
        for layer in fresh.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        fresh.model.norm.weight.fill_(1.0)
        h0 = 1.0 / math.sqrt((1.0 + (cfg.hidden_size - 1) * 0.02**2) / cfg.hidden_size)  # normed dim 0
        vocab = cfg.vocab_size
        bias = math.log((vocab - 1) / (mean_len - 1))  # P(eos) = e^b / (e^b + vocab - 1) = 1 / mean_len
        fresh.lm_head.weight.zero_()
        fresh.lm_head.weight[tok.eos_token_id, 0] = bias / h0
    fresh.save_pretrained(out)
    return str(out)


def write_prompts(path: Path, n: int, seed: int) -> list[tuple[str, str]]:
    """The (prompt_id, prompt) pairs the prompts stage will make, duplicates dropped as it does."""
    from pipeline.core.ids import prompt_id

    seen: dict[str, str] = {}
    for r in toy_rows(n * 2, seed=seed):
        seen.setdefault(prompt_id(r["prompt"]), r["prompt"])
        if len(seen) == n:
            break
    path.write_text("".join(json.dumps({"prompt": p, "answer": "0"}) + "\n" for p in seen.values()))
    return list(seen.items())


class Raw:
    """``vllm.LLM`` in this process, with the engine settings the stage's actor gets, fed the
    token ids the stage's actor builds (chat template, then the tokenizer)."""

    def __init__(self, model: str, engine: dict | None = None):
        t0 = time.time()  # importing vLLM counts, as it does in the stage's actor
        from vllm import LLM

        from stages.common.engine import EngineSpec

        self.llm = LLM(model=model, **EngineSpec(**(engine or ENGINE)).llm_kwargs())
        self.startup = time.time() - t0
        self.tok = self.llm.get_tokenizer()
        self.max_len = self.llm.llm_engine.model_config.max_model_len
        self.steps = 0  # engine steps, as the stage's actor counts them (tokens / steps: mean batch)
        engine, step = self.llm.llm_engine, self.llm.llm_engine.step

        def counted():
            self.steps += 1
            return step()

        engine.step = counted

    def ids(self, prompt: str) -> list[int]:
        text = self.tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=False)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def requests(self, prompts: list[tuple[str, str]], max_tokens: int, ignore_eos: bool):
        """(prompts, params) as the stage sends them: its per-prompt seed (``request_seed``)."""
        from vllm import SamplingParams

        from stages.common.engine import request_seed

        ps, sps = [], []
        for pid, prompt in prompts:
            ids = self.ids(prompt)
            ps.append({"prompt_token_ids": ids})
            sps.append(SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=min(max_tokens, self.max_len - len(ids)),
                                      seed=request_seed(0, pid), ignore_eos=ignore_eos))
        return ps, sps

    def run(self, ps: list, sps: list, chunk: int | None = None) -> tuple[float, list[int]]:
        """Seconds and output lengths of generating ``ps``: one call, or calls of ``chunk``."""
        step = chunk or len(ps)
        lengths: list[int] = []
        t0 = time.perf_counter()
        for i in range(0, len(ps), step):
            outs = self.llm.generate(ps[i : i + step], sps[i : i + step], use_tqdm=False)
            lengths += [len(o.outputs[0].token_ids) for o in outs]
        return time.perf_counter() - t0, lengths

    def close(self) -> None:
        engine = self.llm.llm_engine
        del engine.step  # the counting wrapper (a reference cycle through the engine)
        engine.engine_core.shutdown()  # its processes, now: this process must not wait for them at exit
        del self.llm, engine
        gc.collect()


class Stage:
    """The generate stage through the DAG runner, each run in a fresh storage root."""

    def __init__(self, tmp: Path, name: str, model: str, src: Path, sampling: dict, engine: dict | None = None):
        self.tmp, self.name, self.model, self.src, self.sampling = tmp, name, model, src, sampling
        self.engine = engine or {**ENGINE, "batch_size": BATCH_SIZE}  # 8 chunks' worth in flight (default)
        self.records: list[dict] = []

    def run(self) -> dict:
        from pipeline.core.config import load_config
        from pipeline.core.runner import Runner

        root = self.tmp / f"{self.name}-{len(self.records)}"
        root.mkdir(parents=True)
        cfg = root / "bench.yaml"
        cfg.write_text(json.dumps({
            "name": f"bench-{self.name}", "storage": {"root": str(root)},
            "stages": {
                "prompts": {"params": {"path": str(self.src)}},
                "generate": {"inputs": {"prompts": "prompts.prompts"}, "params": {
                    "model": self.model, "sampling": {"n": 1, "temperature": 1.0, "seed": 0, **self.sampling},
                    "engine": self.engine}},
            },
        }))
        result = Runner(load_config(cfg)).run()
        if not result.ok:
            raise SystemExit(result.error)
        stage = {s["name"]: s for s in result.manifest["stages"]}["generate"]
        stage["busy_seconds"] = stage["seconds"] - stage["metrics"].get("engine_startup_seconds", 0.0)
        self.records.append(stage)
        return stage


def bench_generate(tmp: Path) -> None:
    model = os.environ.get("BENCH_MODEL") or build_model(tmp / "model", layers=LAYERS, hidden=HIDDEN)
    prompts = write_prompts(tmp / "prompts.jsonl", N_PROMPTS, seed=7)
    stage = Stage(tmp, "generate", model, tmp / "prompts.jsonl", {"max_tokens": MAX_TOKENS, "ignore_eos": True})
    first = stage.run()  # starts the engine actor (kept), and warms it
    raw = Raw(model)
    ps, sps = raw.requests(prompts, MAX_TOKENS, ignore_eos=True)
    raw.run(ps[:BATCH_SIZE], sps[:BATCH_SIZE])  # warm up
    raw_tokens: list[int] = []
    raw_steps: list[int] = []

    def raw_side() -> float:
        steps = raw.steps
        secs, lengths = raw.run(ps, sps)
        raw_tokens.append(sum(lengths))
        raw_steps.append(raw.steps - steps)
        return sum(lengths) / secs

    def ours() -> float:
        s = stage.run()
        return s["metrics"]["completion_tokens"] / s["busy_seconds"]

    r = interleaved({"raw": raw_side, "ours": ours}, alternate=True)
    runs = stage.records[1:]
    over = [s["metrics"]["overhead"] for s in runs]
    emit_medians("generate", r["ours"], r["raw"], "tok/s", sequences=len(prompts), max_tokens=MAX_TOKENS,
                 tokens={"ours": runs[0]["metrics"]["completion_tokens"], "baseline": raw_tokens[0]},
                 engine_steps={"ours": [s["metrics"]["overhead"]["engine_steps"] for s in runs], "baseline": raw_steps},
                 overhead_fraction=[o["fraction"] for o in over],
                 overhead_fraction_upper=[o["fraction_upper"] for o in over],
                 overhead=over[len(over) // 2])
    startup = first["metrics"]["engine_startup_seconds"]
    emit("generate-startup", startup, raw.startup, "s", lower_is_better=True,
         note="once each: the stage's first run (engine actor ready) vs constructing vllm.LLM here")
    raw.close()
    from stages.common.engine import shutdown_kept

    shutdown_kept()


def quantiles(lengths: list[int]) -> dict:
    s = sorted(lengths)
    q = {f"p{p}": s[min(len(s) - 1, int(p / 100 * len(s)))] for p in (5, 50, 95)}
    return {"min": s[0], **q, "max": s[-1], "mean": round(sum(s) / len(s), 1),
            "p95_over_p5": round(q["p95"] / max(1, q["p5"]), 1)}


def bench_variable(tmp: Path) -> None:
    model = build_stopping_model(tmp / "stopping-model", MEAN_LEN)
    prompts = write_prompts(tmp / "var-prompts.jsonl", VAR_PROMPTS, seed=11)
    stage = Stage(tmp, "variable", model, tmp / "var-prompts.jsonl", {"max_tokens": VAR_MAX_TOKENS})
    stage.run()  # starts the engine actor (kept), and warms it
    raw = Raw(model)
    ps, sps = raw.requests(prompts, VAR_MAX_TOKENS, ignore_eos=False)
    raw.run(ps[:BATCH_SIZE], sps[:BATCH_SIZE])  # warm up
    lengths: dict[str, list[int]] = {}
    steps: dict[str, list[int]] = {"chunked": [], "single": []}

    def raw_side(chunk: int | None, name: str):
        def run() -> float:
            before = raw.steps
            secs, lens = raw.run(ps, sps, chunk)
            lengths[name] = lens
            steps[name].append(raw.steps - before)
            return sum(lens) / secs
        return run

    def ours() -> float:
        s = stage.run()
        return s["metrics"]["completion_tokens"] / s["busy_seconds"]

    r = interleaved({"chunked": raw_side(BATCH_SIZE, "chunked"), "ours": ours, "single": raw_side(None, "single")},
                    alternate=True)
    raw.close()
    from stages.common.engine import shutdown_kept

    shutdown_kept()
    runs = stage.records[1:]
    tokens = {"ours": runs[-1]["metrics"]["completion_tokens"], "chunked": sum(lengths["chunked"]),
              "single": sum(lengths["single"])}
    common = {"sequences": len(prompts), "max_tokens": VAR_MAX_TOKENS, "mean_len": MEAN_LEN, "batch_size": BATCH_SIZE,
              "lengths": quantiles(lengths["single"]), "tokens": tokens,
              "truncated": sum(n >= VAR_MAX_TOKENS for n in lengths["single"]),
              "engine_steps": {"ours": [s["metrics"]["overhead"]["engine_steps"] for s in runs], **steps},
              "overhead_fraction": [s["metrics"]["overhead"]["fraction"] for s in runs]}
    emit_medians("generate-variable", r["ours"], r["chunked"], "tok/s",
                 baseline_is=f"LLM.generate per chunk of {BATCH_SIZE}", **common)
    emit_medians("generate-variable-single", r["ours"], r["single"], "tok/s",
                 baseline_is="one LLM.generate over all prompts", **common)


LT_WINDOW = int(os.environ.get("BENCH_LONGTAIL_WINDOW", "16"))
# 16 x the window and 5 runs per side: at 8 x and 3 runs (about 5 s a run here) the round
# ratios of one idle invocation spread over 0.76-1.04, too wide to read a 5% difference from
LT_PROMPTS = int(os.environ.get("BENCH_LONGTAIL_PROMPTS", str(16 * LT_WINDOW)))
LT_RUNS = int(os.environ.get("BENCH_LONGTAIL_RUNS", str(max(RUNS, 5))))
LT_MEDIAN = float(os.environ.get("BENCH_LONGTAIL_MEDIAN", "30"))  # median of the per-class mean lengths
LT_SIGMA = float(os.environ.get("BENCH_LONGTAIL_SIGMA", "0.7"))
LT_MAX_LEN = int(os.environ.get("BENCH_LONGTAIL_MAX_MODEL_LEN", "2048"))
LT_HIDDEN = int(os.environ.get("BENCH_LONGTAIL_HIDDEN", "512"))


def build_longtail_model(out: Path, median: float, sigma: float) -> str:
    """A Llama whose outputs end at a natural EOS after a long-tailed number of tokens.

    The residual stream is the current token's one-hot embedding (attention and MLP outputs
    zeroed, their compute still done; ``hidden`` >= the vocabulary). After the prompt the first
    token is uniform over the vocabulary; from then on every token repeats itself, and ends with
    probability 1/L_t per step, with L_t drawn once per token from a lognormal (median
    ``median``, ``sigma``): each output is geometric with its first token's mean length, and the
    mixture has p50 about half its mean and p99 over 8x its p50 (``lengths`` in the line)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    build_model(out, layers=LAYERS, hidden=LT_HIDDEN, max_pos=LT_MAX_LEN)
    tok = AutoTokenizer.from_pretrained(out)
    model = LlamaForCausalLM.from_pretrained(out)
    cfg = model.config
    vocab, hidden = cfg.vocab_size, cfg.hidden_size
    if hidden < vocab:
        raise SystemExit(f"BENCH_LONGTAIL_HIDDEN {hidden} < vocabulary {vocab}: embeddings cannot be one-hot")
    cfg.tie_word_embeddings = False
    fresh = LlamaForCausalLM(cfg)
    fresh.load_state_dict(model.state_dict(), strict=False)
    templated = tok.apply_chat_template([{"role": "user", "content": "1 + 1"}], add_generation_prompt=True, tokenize=False)
    tail = set(tok(templated, add_special_tokens=False)["input_ids"][-2:])  # what precedes the first output token
    uniform = tail | {tok.eos_token_id, tok.pad_token_id} - {None}
    rng = np.random.default_rng(0)
    mean_len = np.maximum(1.5, np.exp(np.log(median) + sigma * rng.standard_normal(vocab)))
    stay = 30.0  # logit of repeating: every other token (EOS aside) has logit 0, e^-30 apart
    scale = math.sqrt(hidden)  # a one-hot row after RMSNorm: sqrt(hidden) in its dimension
    with torch.no_grad():
        fresh.model.embed_tokens.weight.zero_()
        fresh.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        for layer in fresh.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        fresh.model.norm.weight.fill_(1.0)
        head = fresh.lm_head.weight
        head.zero_()
        for t in range(vocab):
            if t in uniform:
                continue  # zero logits: uniform next token
            h = 1.0 / mean_len[t]
            head[t, t] = stay / scale
            head[tok.eos_token_id, t] = (stay + math.log(h / (1 - h))) / scale
    fresh.save_pretrained(out)
    return str(out)


class AsyncSide:
    """vLLM's own async engine (``AsyncLLM``) in this process, driven by an asyncio loop that
    keeps ``concurrency`` requests in flight, starting one as each ends (NeMo-Skills' pattern)."""

    def __init__(self, model: str, engine: dict):
        import asyncio

        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from stages.common.engine import EngineSpec

        self.loop = asyncio.new_event_loop()
        kw = EngineSpec(**engine).llm_kwargs()
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **kw))

    def run(self, ps: list, sps: list, concurrency: int) -> tuple[float, list[int]]:
        import asyncio

        from vllm.sampling_params import RequestOutputKind

        async def main() -> list[int]:
            sem = asyncio.Semaphore(concurrency)
            run_id = time.time_ns()

            async def one(i: int) -> int:
                async with sem:
                    sp = sps[i].clone()
                    sp.output_kind = RequestOutputKind.FINAL_ONLY
                    final = None
                    async for out in self.llm.generate(ps[i], sp, request_id=f"{run_id}-{i}"):
                        final = out
                    return len(final.outputs[0].token_ids)

            return list(await asyncio.gather(*(one(i) for i in range(len(ps)))))

        t0 = time.perf_counter()
        lengths = self.loop.run_until_complete(main())
        return time.perf_counter() - t0, lengths

    def close(self) -> None:
        self.llm.shutdown()
        self.loop.close()


def iterations() -> tuple[float, float]:
    """vLLM's own count of engine iterations (and tokens) in this process, from its Prometheus
    histogram ``vllm:iteration_tokens_total`` (engines made with ``disable_log_stats: false``)."""
    from vllm.v1.metrics.reader import Histogram, get_metrics_snapshot

    count = total = 0.0
    for m in get_metrics_snapshot():
        if isinstance(m, Histogram) and m.name == "vllm:iteration_tokens_total":
            count, total = count + m.count, total + m.sum
    return count, total


def bench_longtail(tmp: Path) -> None:
    """`generate-longtail`: the stage (per-request refill, ``max_inflight`` = the window) against
    one ``LLM.generate`` over all prompts, ``LLM.generate`` per chunk of the window, and vLLM's
    async engine with an asyncio loop of the window's concurrency. Every engine caps running
    sequences at the window (``max_num_seqs``); all sides send the same token ids with the
    stage's seeds, so they generate the same tokens. ``mean_running`` per side: completion
    tokens ÷ engine iterations (the mean running sequences per decode step); the iterations
    of the async engine and of the stage's engine actor from vLLM's own stats (Prometheus
    ``vllm:iteration_tokens_total``), those of ``LLM.generate`` (whose offline engine records
    none) from its ``step`` calls. ``engine_seconds``: the stage's time inside its engine."""
    import ray

    model = build_longtail_model(tmp / "longtail-model", LT_MEDIAN, LT_SIGMA)
    prompts = write_prompts(tmp / "lt-prompts.jsonl", LT_PROMPTS, seed=13)
    engine = {**ENGINE, "max_model_len": LT_MAX_LEN, "max_num_seqs": LT_WINDOW,
              "options": {**ENGINE.get("options", {}), "disable_log_stats": False}}
    max_tokens = LT_MAX_LEN - 64
    stage = Stage(tmp, "longtail", model, tmp / "lt-prompts.jsonl", {"max_tokens": max_tokens},
                  engine={**engine, "max_inflight": LT_WINDOW, "batch_size": BATCH_SIZE})
    from stages.common.engine import _KEPT

    stage_its: list[float] = []

    def actor_iterations() -> float:
        pool = next(iter(_KEPT.values()))
        stats = ray.get(pool.actors[0].vllm_stats.remote())
        return stats.get("vllm:iteration_tokens_total", {}).get("count", 0.0)

    stage.run()  # starts the engine actor (kept), and warms it
    raw = Raw(model, engine)
    ps, sps = raw.requests(prompts, max_tokens, ignore_eos=False)
    raw.run(ps[:LT_WINDOW], sps[:LT_WINDOW])  # warm up
    asy = AsyncSide(model, engine)
    asy.run(ps[:LT_WINDOW], sps[:LT_WINDOW], LT_WINDOW)  # warm up
    lengths: dict[str, list[int]] = {}
    its: dict[str, list[float]] = {"single": [], "chunked": [], "async": []}

    def raw_side(chunk: int | None, name: str):
        def run() -> float:
            steps = raw.steps  # LLM.generate's engine steps (its Prometheus stats stay empty offline)
            secs, lens = raw.run(ps, sps, chunk)
            its[name].append(raw.steps - steps)
            lengths[name] = lens
            return sum(lens) / secs
        return run

    def async_side() -> float:
        c0, _ = iterations()
        secs, lens = asy.run(ps, sps, LT_WINDOW)
        its["async"].append(iterations()[0] - c0)
        lengths["async"] = lens
        return sum(lens) / secs

    def ours() -> float:
        before = actor_iterations()
        s = stage.run()
        stage_its.append(actor_iterations() - before)
        return s["metrics"]["completion_tokens"] / s["busy_seconds"]

    r = interleaved({"single": raw_side(None, "single"), "ours": ours, "chunked": raw_side(LT_WINDOW, "chunked"),
                     "async": async_side}, runs=LT_RUNS, alternate=True)
    asy.close()
    raw.close()
    from stages.common.engine import shutdown_kept

    shutdown_kept()
    runs = stage.records[1:]
    tokens = {"ours": runs[-1]["metrics"]["completion_tokens"],
              **{k: sum(v) for k, v in lengths.items()}}

    def mean_running(tok: int, it: list[float]) -> list[float | None]:
        return [round(tok / i, 2) if i else None for i in it]

    running = {"ours": mean_running(tokens["ours"], stage_its),
               **{k: mean_running(tokens[k], its[k]) for k in its}}
    q = quantiles(lengths["single"])
    q["p99"] = sorted(lengths["single"])[min(len(prompts) - 1, int(0.99 * len(prompts)))]
    q["p50_over_mean"] = round(q["p50"] / q["mean"], 2)
    q["p99_over_p50"] = round(q["p99"] / max(1, q["p50"]), 1)
    common = {"sequences": len(prompts), "window": LT_WINDOW, "max_tokens": max_tokens, "lengths": q,
              "tokens": tokens, "truncated": sum(n >= max_tokens for n in lengths["single"]),
              "mean_running": running, "overhead_fraction": [s["metrics"]["overhead"]["fraction"] for s in runs],
              "engine_seconds": [s["metrics"]["overhead"]["engine_s"] for s in runs],
              "busy_seconds": [round(s["busy_seconds"], 3) for s in runs]}
    emit_medians("generate-longtail", r["ours"], r["single"], "tok/s",
                 baseline_is="one LLM.generate over all prompts (max_num_seqs = window)", **common)
    emit_medians("generate-longtail-chunked", r["ours"], r["chunked"], "tok/s",
                 baseline_is=f"LLM.generate per chunk of {LT_WINDOW} (the window)", **common)
    emit_medians("generate-longtail-async", r["ours"], r["async"], "tok/s",
                 baseline_is=f"vLLM AsyncLLM driven by an asyncio loop of {LT_WINDOW} concurrent requests", **common)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["DISTILL_KEEP_ENGINES"] = "1"  # the stage's engine stays warm across runs
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # stdout: the JSON lines, mostly
    which = sys.argv[1:] or ["generate", "generate-variable", "generate-longtail"]
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if "generate" in which:
                bench_generate(Path(tmp))
            if "generate-variable" in which:
                bench_variable(Path(tmp))
            if "generate-longtail" in which:
                bench_longtail(Path(tmp))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
