"""Resource fit from config.json: parameter counts against the model cards, KV bytes per token,
engine replicas and training workers against the GPU table, and a config that cannot fit
failing at plan with the field and the numbers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.config import ConfigError, load_config
from pipeline.sizing import fit
from tests.hub_cache import CONFIGS, lay_out

# (parameters, non-embedding parameters), in billions, as the model cards state them:
# https://huggingface.co/Qwen/Qwen2.5-32B, Qwen2.5-7B, Qwen2.5-1.5B-Instruct, Qwen2.5-0.5B-Instruct,
# https://huggingface.co/Qwen/Qwen3-32B, Qwen3-1.7B-Base ("Number of Parameters (Non-Embedding)")
PUBLISHED = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": (32.5, 31.0),  # Qwen2.5-32B's architecture
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": (7.61, 6.53),  # Qwen2.5(-Math)-7B's architecture
    "Qwen/Qwen2.5-1.5B-Instruct": (1.54, 1.31),
    "Qwen/Qwen2.5-0.5B-Instruct": (0.49, 0.36),
    "Qwen/Qwen3-32B": (32.8, 31.2),
    "Qwen/Qwen3-1.7B-Base": (1.7, 1.4),
}


@pytest.mark.parametrize("repo", sorted(PUBLISHED))
def test_parameter_count_matches_the_model_card(repo):
    a = fit.arch(CONFIGS[repo])
    total, non_emb = PUBLISHED[repo]
    embeddings = a.vocab * a.hidden * (1 if a.tied else 2)
    assert a.params / 1e9 == pytest.approx(total, rel=0.03)
    assert (a.params - embeddings) / 1e9 == pytest.approx(non_emb, rel=0.03)
    assert a.active_params == a.params and a.dtype_bytes == 2


def test_kv_bytes_per_token_and_tensor_parallel_split():
    a = fit.arch(CONFIGS["deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"])
    assert a.kv_bytes_per_token() == 2 * 64 * 8 * 128 * 2 == 256 * 2**10
    assert a.kv_bytes_per_token(tp=4) == a.kv_bytes_per_token() // 4
    small = fit.arch(CONFIGS["Qwen/Qwen2.5-1.5B-Instruct"])  # 2 KV heads: replicated past TP 2
    assert small.kv_bytes_per_token(tp=8) == small.kv_bytes_per_token(tp=2) == small.kv_bytes_per_token() // 2


def test_moe_counts_every_expert_but_activates_k():
    cfg = {"model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
           "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144, "moe_intermediate_size": 768,
           "num_experts": 128, "num_experts_per_tok": 8, "vocab_size": 151936, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16"}  # https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json
    a = fit.arch(cfg)
    assert a.params / 1e9 == pytest.approx(30.5, rel=0.03)  # the card: 30.5B total, 3.3B activated
    assert a.active_params / 1e9 == pytest.approx(3.3, rel=0.05)


def test_engine_fit_arithmetic():
    a = fit.arch(CONFIGS["deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"])
    h100 = fit.gpu("H100")
    one = fit.engine_fit(a, h100, tp=1, max_model_len=32768)
    assert one.weights == a.params * 2 and one.budget == pytest.approx(79.6 * 0.9 * 2**30)
    assert one.need == a.params * 2 + 256 * 2**10 * 32768  # 61.0 GiB + 8 GiB
    assert one.ok and one.full_length_seqs == 1
    assert not fit.engine_fit(a, h100, tp=1, max_model_len=32768, seqs=2).ok
    eight = fit.engine_fit(a, h100, tp=8, max_model_len=32768, seqs=32)
    assert eight.ok and eight.full_length_seqs == int((h100.memory_bytes * 0.9 - a.params * 2 / 8) // (32 * 2**10 * 32768))
    assert not fit.engine_fit(a, fit.gpu("L4"), tp=1, max_model_len=4096).ok  # weights alone: 61 GiB > 20 GiB


def test_training_fit_counts_fp32_weights_grads_and_adam():
    student = fit.arch(CONFIGS["Qwen/Qwen2.5-1.5B-Instruct"])
    f = fit.TrainFit(fit.gpu("H100"), student.params, student.params)
    assert f.need == student.params * 16 and f.ok
    teacher = fit.arch(CONFIGS["deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"])
    assert not fit.TrainFit(fit.gpu("H100"), teacher.params, teacher.params).ok
    lora = fit.lora_trainable(teacher, 16)
    assert lora < teacher.params // 100
    assert fit.TrainFit(fit.gpu("H200"), teacher.params, lora).ok  # frozen fp32 weights: 122 GiB < 140 GiB


def test_gpu_table_has_sources_and_the_common_parts():
    table = fit.gpus()
    for name in ("A100-40G", "A100-80G", "H100", "H200", "L4", "L40S"):
        g = table[name]
        assert g.memory_gib > 0 and g.bandwidth_gbs > 0 and g.bf16_tflops > 0 and g.source.startswith("https://")
    assert table["H200"].bandwidth_gbs / table["H100"].bandwidth_gbs == pytest.approx(4.8 / 3.35)


def _teacher_config(tmp_path: Path, engine: str, sft: str = "") -> Path:
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    path = tmp_path / "fit.yaml"
    path.write_text(f"""
name: fit-test
storage: {{root: {tmp_path / 'root'}}}
stages:
  prompts: {{params: {{path: {src}}}}}
  generate:
    inputs: {{prompts: prompts.prompts}}
    params:
      model: hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-32B
      engine: {engine}
{sft}""")
    return path


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for repo in ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "Qwen/Qwen2.5-1.5B-Instruct"):
        lay_out(tmp_path / "hf" / "hub", repo, {"config.json": CONFIGS[repo]})


def test_a_teacher_that_fits_plans(tmp_path, hf_cache):
    load_config(_teacher_config(tmp_path, "{num_gpus: 1, tensor_parallel_size: 8, max_model_len: 32768, "
                                          "max_num_seqs: 32, resources: {'accelerator_type:H100': 0.001}}"))


def test_overflowing_max_model_len_fails_at_plan_with_the_numbers(tmp_path, hf_cache):
    with pytest.raises(ConfigError) as e:
        load_config(_teacher_config(tmp_path, "{num_gpus: 1, tensor_parallel_size: 8, max_model_len: 131072, "
                                              "max_num_seqs: 32, resources: {'accelerator_type:H100': 0.001}}"))
    msg = str(e.value)
    assert "fit.yaml: stages.generate.params.engine.max_model_len" in msg
    assert "max_model_len 131072" in msg and "tensor_parallel_size 8" in msg and "H100 79.6 GiB" in msg
    assert "32 sequence(s) = 128.0 GiB" in msg  # 32 KiB/token/rank x 131072 x 32


def test_too_small_tensor_parallel_fails_naming_it(tmp_path, hf_cache):
    with pytest.raises(ConfigError, match=r"engine\.tensor_parallel_size: .*does not fit.*L4"):
        load_config(_teacher_config(tmp_path, "{num_gpus: 1, tensor_parallel_size: 2, max_model_len: 4096, "
                                              "resources: {'accelerator_type:L4': 0.001}}"))


def test_an_unknown_accelerator_is_named(tmp_path, hf_cache):
    with pytest.raises(ConfigError, match=r"engine\.resources: unknown accelerator type 'B300'"):
        load_config(_teacher_config(tmp_path, "{num_gpus: 1, resources: {'accelerator_type:B300': 0.001}}"))


def test_training_worker_overflow_fails_at_plan(tmp_path, hf_cache):
    sft = """  sft:
    inputs: {data: prompts.prompts}
    params: {model: hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-32B, num_gpus: 1,
             resources: {'accelerator_type:H100': 0.001}}
"""
    engine = "{num_gpus: 1, tensor_parallel_size: 8, resources: {'accelerator_type:H100': 0.001}, max_model_len: 4096}"
    with pytest.raises(ConfigError) as e:
        load_config(_teacher_config(tmp_path, engine, sft))
    assert "stages.sft.params.model" in str(e.value) and "Adam states" in str(e.value)


def test_model_config_reads_local_folders_and_fsspec_uris(tmp_path):
    import fsspec

    cfg = CONFIGS["Qwen/Qwen2.5-0.5B-Instruct"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert fit.model_config(str(tmp_path)) == cfg
    with fsspec.open("memory://models/m1/config.json", "w") as f:  # a committed artifact on object storage
        f.write(json.dumps(cfg))
    assert fit.model_config("memory://models/m1") == cfg
    assert fit.model_config("memory://models/absent") is None and fit.model_config(str(tmp_path / "no")) is None
