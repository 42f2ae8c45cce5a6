"""benchmark `machine`: this machine's speed on the demo's toy teacher, so a reader can scale the
demo's wall time (README) to their own machine.

The model is the shape of the demo's teacher until 2026-12-03 (a 4-layer, 256-wide Llama, a
tokenizer trained here on toy arithmetic, random weights; speed does not depend on them), kept so
that ratios compare across days.

- `machine-train`: tokens/s of a plain PyTorch training loop (forward with labels, backward,
  AdamW) on batches of 32 toy solutions, on all cores.
- `machine-generate`: completion tokens/s of vLLM generating 256 tokens for 128 prompts at
  once (``LLM.generate``, ``ignore_eos``, the demo's engine settings).

Each line's ``baseline`` is the same measurement on the developer's machine where the demo's
times in the README were taken (``REFERENCE``), so ``ratio`` is this machine's speed relative to
that one: a demo taking T minutes there takes about T / ratio here (generation and training
are most of it). Each side runs ``RUNS`` times; the median is reported with min/max.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_model, emit, summary, toy_rows  # noqa: E402

# measured with this script on the developer's machine (2 cores, 24 GiB), idle, medians of 3 runs
# (train 4,617-5,013, generate 4,067-4,447 tok/s), 2026-12-02; demo_minutes: a fresh clone's
# `make demo` (install included) scaled to that speed: the recipe of 2026-12-04 took 6 min 19 s
# on a fresh clone with this script at ratios 1.12 (train) and 1.21 (generate) just after, so
# 6.31 x 1.17 = 7.4 minutes at ratio 1 (the install, 43 s of it, may not scale so)
REFERENCE = {"train": 4845.0, "generate": 4270.0, "demo_minutes": 7.4}
RUNS = int(os.environ.get("BENCH_RUNS", "3"))


def train_tokens_per_second(model_dir: str, steps: int = 12, batch: int = 32) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rows = toy_rows(steps * batch, seed=1)
    texts = [f"<|user|>{r['prompt']}<|assistant|>{r['solution']}<|end|>" for r in rows]
    tokens, t0 = 0, None
    for i in range(steps + 2):  # two warm-up steps
        enc = tok(texts[(i % steps) * batch:(i % steps + 1) * batch], padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        if i == 2:
            t0 = time.perf_counter()
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= 2:
            tokens += int(enc["attention_mask"].sum())
    return tokens / (time.perf_counter() - t0)


def generate_tokens_per_second(llm, prompts: int = 128, max_tokens: int = 256) -> float:
    from vllm import SamplingParams

    rows = toy_rows(prompts, seed=2)
    params = SamplingParams(n=1, temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=0)
    t0 = time.perf_counter()
    out = llm.generate([f"<|user|>{r['prompt']}<|assistant|>" for r in rows], params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in out) / (time.perf_counter() - t0)


def main() -> None:
    from vllm import LLM

    model = build_model(Path(tempfile.mkdtemp(prefix="machine-")) / "teacher", layers=4, hidden=256, max_pos=512)
    train = summary([train_tokens_per_second(model) for _ in range(RUNS)])
    llm = LLM(model=model, max_model_len=512, kv_cache_memory_bytes=2**30, enforce_eager=True, max_num_seqs=256)
    generate_tokens_per_second(llm, prompts=16, max_tokens=32)  # warm-up
    gen = summary([generate_tokens_per_second(llm) for _ in range(RUNS)])
    for name, s in (("train", train), ("generate", gen)):
        ratio = s["median"] / REFERENCE[name]
        emit(f"machine-{name}", s["median"], REFERENCE[name], "tok/s", min=round(s["min"], 1), max=round(s["max"], 1),
             runs=s["runs"], cpus=os.cpu_count(),
             demo_minutes_estimate=round(REFERENCE["demo_minutes"] / ratio, 1))


if __name__ == "__main__":
    main()
