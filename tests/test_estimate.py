"""`distill plan --estimate`: the decode roofline, 6·N·D training, figures from the latest
prompt_stats and a calibration from the last run under the root, money, and --json."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.core.config import ConfigError, load_config
from pipeline.sizing import estimate, fit
from pipeline.store import layout
from pipeline.store.storage import Storage
from tests.hub_cache import CONFIGS

QWEN_05 = fit.arch(CONFIGS["Qwen/Qwen2.5-0.5B-Instruct"])
R1_32 = fit.arch(CONFIGS["deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"])
H100 = fit.gpu("H100")


def test_decode_roofline_by_hand():
    r = estimate.decode_seconds(R1_32, H100, samples=64, prompt_tokens=100, completion_tokens=1000, tp=8,
                                max_num_seqs=64)
    weights, kv = R1_32.params * 2, 2 * 64 * 8 * 128 * 2
    step = (weights + kv * 64 * (100 + 500)) / (3350e9 * 8)
    prefill = 64 * 2 * R1_32.params * 100 / (989e12 * 8)
    assert r["concurrent"] == 64 and r["bound"] == "memory"
    assert r["seconds"] == pytest.approx(1000 * step + prefill)


def test_a_trace_costs_the_square_of_its_length():
    """One sequence at a time: the KV read per step grows with the length, so doubling a long
    trace nearly quadruples its cost once the KV cache outweighs the weights."""
    def cost(t):
        return estimate.decode_seconds(QWEN_05, H100, samples=1, prompt_tokens=0, completion_tokens=t,
                                       max_num_seqs=1)["seconds"]
    w, kv, bw = QWEN_05.params * 2, QWEN_05.kv_bytes_per_token(), 3350e9
    for t in (1_000, 30_000, 100_000):
        assert cost(t) == pytest.approx(t * (w + kv * t / 2) / bw)  # a T + b T^2
    assert cost(2_000) / cost(1_000) < 2.1  # short traces: the weights dominate
    assert cost(200_000) / cost(100_000) > 2.7  # long ones: the KV cache (linear would be 2)


def test_compute_bound_when_the_batch_is_large():
    r = estimate.decode_seconds(QWEN_05, fit.gpu("L4"), samples=10_000, prompt_tokens=0, completion_tokens=16,
                                max_num_seqs=4096)
    assert r["bound"] == "compute"


def test_training_is_six_n_d_at_the_stated_mfu():
    s = estimate.train_seconds(QWEN_05, H100, tokens=1e9, mfu=0.4, workers=8)
    assert s == pytest.approx(6 * QWEN_05.params * 1e9 / (989e12 * 0.4 * 8))


def _model(tmp_path: Path) -> Path:
    d = tmp_path / "qwen05"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(CONFIGS["Qwen/Qwen2.5-0.5B-Instruct"]))
    return d


def _config(tmp_path: Path, estimate_block: str) -> Path:
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    path = tmp_path / "est.yaml"
    path.write_text(f"""
name: est-test
storage: {{root: {tmp_path / 'root'}}}
{estimate_block}
stages:
  prompts: {{params: {{path: {src}}}}}
  generate:
    inputs: {{prompts: prompts.prompts}}
    params:
      model: {_model(tmp_path)}
      sampling: {{n: 4, max_tokens: 2048}}
      engine: {{replicas: 2, num_gpus: 1, max_model_len: 4096, resources: {{'accelerator_type:H100': 0.001}}}}
  verify: {{inputs: {{samples: generate.samples}}}}
  dedupe: {{inputs: {{samples: verify.verified}}}}
  sft:
    inputs: {{data: dedupe.sft}}
    params: {{model: {_model(tmp_path)}, epochs: 2, max_length: 4096, num_workers: 4, num_gpus: 1,
             resources: {{'accelerator_type:H100': 0.001}}}}
""")
    return path


BLOCK = """estimate:
  prompts: 10000
  expected_completion_tokens: 1000
  expected_prompt_tokens: 100
  keep_fraction: 0.5
  mfu: 0.3
"""


def _cli_estimate(path: Path, *extra: str) -> dict:
    res = CliRunner().invoke(app, ["plan", str(path), "--estimate", "--json", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_plan_estimate_json_with_stated_figures_and_price(tmp_path):
    est = _cli_estimate(_config(tmp_path, BLOCK), "--price-per-gpu-hour", "2.5")
    gen, sft = est["stages"]
    assert (gen["stage"], gen["cost"], gen["gpu"], gen["gpus"]) == ("generate", "decode", "H100", 2)
    assert gen["samples"] == 40_000 and gen["completion_tokens"] == 40_000_000  # 10,000 prompts x n 4 x 1,000
    assert gen["sources"] == {"prompts": "estimate.prompts", "completion_tokens": "estimate.expected_completion_tokens",
                              "samples_per_prompt": "sampling.n"}
    want = estimate.decode_seconds(QWEN_05, H100, samples=40_000, prompt_tokens=100, completion_tokens=1000, replicas=2)
    assert gen["seconds"] == pytest.approx(want["seconds"], rel=1e-3)
    assert gen["gpu_hours"] == pytest.approx(gen["seconds"] * 2 / 3600, rel=1e-3)
    # training: the kept half of the samples, 2 epochs of prompt + completion tokens, on 4 workers
    assert sft["cost"] == "train" and sft["samples"] == 20_000 and sft["train_tokens"] == 20_000 * 2 * 1100
    assert sft["seconds"] == pytest.approx(6 * QWEN_05.params * 44e6 / (989e12 * 0.3 * 4), rel=1e-3)
    assert sft["cost_usd"] == pytest.approx(sft["gpu_hours"] * 2.5, abs=0.01)
    assert est["total"]["gpu_hours"] == pytest.approx(gen["gpu_hours"] + sft["gpu_hours"], rel=1e-3)
    assert est["total"]["cost_usd"] == pytest.approx(gen["cost_usd"] + sft["cost_usd"], abs=0.02)


def test_unknown_prompts_is_an_error_naming_what_to_state(tmp_path):
    res = CliRunner().invoke(app, ["plan", str(_config(tmp_path, "")), "--estimate"])
    assert res.exit_code == 1
    assert "stages.generate: prompts unknown" in res.output and "estimate.prompts" in res.output


def test_a_bad_estimate_block_names_the_file_and_field(tmp_path):
    with pytest.raises(ConfigError, match=r"est\.yaml: estimate\.mfu"):
        load_config(_config(tmp_path, "estimate: {mfu: 3}"))
    with pytest.raises(ConfigError, match=r"est\.yaml: estimate\.stages\.generate\.promts: unknown key"):
        load_config(_config(tmp_path, "estimate: {stages: {generate: {promts: 3}}}"))


def _fake_last_run(root: Path, *, samples: int, tokens: int, prompts: int, seconds: float, startup: float) -> None:
    """What a finished run of est-test's generate stage leaves under the root: its record, the
    latest pointer, and its prompt_stats."""
    st = Storage(str(root))
    ps = st.path("cache", "generate", "gfake", "a1", "prompt_stats")
    w = st.dataset_writer(ps)
    per = samples // prompts
    w.write(pa.table({"prompt_id": [f"p{i}" for i in range(prompts)], "samples": [per] * prompts,
                      "completion_tokens": [tokens // prompts] * prompts}))
    w.commit()
    st.write_json(layout.stage_record(st, "generate", "gfake"), {
        "name": "generate", "kind": "generate", "fingerprint": "gfake", "run_id": "run-1", "attempt": "a1",
        "outputs": {"prompt_stats": {"type": "dataset", "path": ps, "uri": st.uri(ps)}},
        "metrics": {"samples": samples, "completion_tokens": tokens, "engine_startup_seconds": startup},
        "seconds": seconds})
    st.write_json(layout.latest_pointer(st, "est-test", "generate", "samples"),
                  {"uri": "x", "fingerprint": "gfake", "run_id": "run-1", "produced_by_run": "run-1"})


def test_figures_and_calibration_from_the_last_run_under_the_root(tmp_path):
    path = _config(tmp_path, BLOCK)
    _fake_last_run(tmp_path / "root", samples=3000, tokens=3000 * 700, prompts=1000, seconds=130.0, startup=30.0)
    gen = _cli_estimate(path)["stages"][0]
    assert gen["completion_tokens_per_sample"] == 700 and gen["samples"] == 10_000 * 3
    assert gen["sources"]["completion_tokens"] == "prompt_stats of run run-1"
    predicted_then = estimate.decode_seconds(QWEN_05, H100, samples=3000, prompt_tokens=100, completion_tokens=700,
                                             replicas=2)["seconds"]
    assert gen["calibration"] == pytest.approx(100.0 / predicted_then, rel=1e-3)
    assert gen["calibrated_from"] == "run run-1"
    raw = estimate.decode_seconds(QWEN_05, H100, samples=30_000, prompt_tokens=100, completion_tokens=700,
                                  replicas=2)["seconds"]
    assert gen["raw_seconds"] == pytest.approx(raw, rel=1e-3)
    assert gen["startup_seconds"] == 30.0  # the last run's engine start-up, added once
    assert gen["seconds"] == pytest.approx(raw * gen["calibration"] + 30.0, rel=1e-3)
