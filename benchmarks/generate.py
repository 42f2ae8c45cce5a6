"""benchmark `generate`: pipeline generate-stage tok/s ÷ raw `vllm.LLM.generate` tok/s.

Same tiny model (2-layer, 256-wide Llama), same prompts, same sampling
(256 sequences x 256 tokens, EOS ignored), one process, run one after the
other. The pipeline side is the generate stage run by the DAG runner: prompts
read from storage, engine in a Ray actor, rows written as Parquet; its
generation time excludes engine start-up, as the baseline's does. A second line,
`generate-with-startup`, compares the whole stage with constructing the
`vllm.LLM` plus generating.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_model, emit, toy_rows  # noqa: E402

N_PROMPTS, MAX_TOKENS = 256, 256
ENGINE = {"max_model_len": 512, "kv_cache_gb": 2, "enforce_eager": True, "dtype": "float32"}


def raw_baseline(model: str, prompts: list[str]) -> tuple[float, float, int]:
    from vllm import LLM, SamplingParams

    t0 = time.time()
    llm = LLM(model=model, max_model_len=ENGINE["max_model_len"], kv_cache_memory_bytes=ENGINE["kv_cache_gb"] * 2**30,
              enforce_eager=True, dtype="float32", seed=0)
    start = time.time() - t0
    tok = llm.get_tokenizer()
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
    ids = [i["input_ids"] if isinstance(i, dict) or hasattr(i, "keys") else i for i in ids]
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, ignore_eos=True, seed=0)
    t0 = time.time()
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], sp, use_tqdm=False)
    gen = time.time() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm, outs
    gc.collect()
    return gen, start, tokens


def pipeline_run(model: str, src: Path, root: str) -> dict:
    from pipeline.config import load_config
    from pipeline.runner import Runner

    Path(root).mkdir(parents=True, exist_ok=True)
    cfg = Path(root) / "bench.yaml"
    cfg.write_text(json.dumps({
        "name": "bench-generate",
        "storage": {"root": root},
        "stages": {
            "prompts": {"params": {"path": str(src)}},
            "generate": {"inputs": {"prompts": "prompts.prompts"}, "params": {
                "model": model,
                "sampling": {"n": 1, "temperature": 1.0, "max_tokens": MAX_TOKENS, "ignore_eos": True},
                "engine": ENGINE}},  # default chunking: 32-prompt chunks, 8 in flight
        },
    }))
    result = Runner(load_config(cfg)).run()
    if not result.ok:
        raise SystemExit(result.error)
    return {s["name"]: s for s in result.manifest["stages"]}["generate"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_model(tmp / "model")
        prompts = [r["prompt"] for r in toy_rows(N_PROMPTS, seed=7)]
        src = tmp / "prompts.jsonl"
        src.write_text("".join(json.dumps({"prompt": p, "answer": "0"}) + "\n" for p in prompts))
        gen, start, tokens = raw_baseline(model, prompts)
        stage = pipeline_run(model, src, str(tmp / "root"))
        m = stage["metrics"]
        ours_gen = stage["seconds"] - m["engine_startup_seconds"]
        emit("generate", m["completion_tokens"] / ours_gen, tokens / gen, "tok/s",
             sequences=N_PROMPTS, max_tokens=MAX_TOKENS)
        emit("generate-with-startup", m["completion_tokens"] / stage["seconds"], tokens / (gen + start), "tok/s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
