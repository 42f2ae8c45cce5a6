"""A Hugging Face cache laid out locally (no network): ``models--ORG--NAME/{refs/BRANCH,
snapshots/<sha>/...}``, as huggingface_hub writes it, and the architecture figures of the
recipes' models.

The figures are those of each model's published ``config.json`` (the URL above each; the
architecture keys only, as published; not downloaded by the tests). Parameter counts derived
from them are checked against the model cards' published sizes in tests/test_fit.py.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

CONFIGS: dict[str, dict] = {
    # https://huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-32B/blob/main/config.json
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120,
        "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "vocab_size": 152064, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "rope_theta": 1000000.0, "rms_norm_eps": 1e-05},
    # https://huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-7B/blob/main/config.json
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "max_position_embeddings": 131072, "vocab_size": 152064, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "rope_theta": 10000, "rms_norm_eps": 1e-06},
    # https://huggingface.co/Qwen/Qwen2.5-1.5B-Instruct/blob/main/config.json
    "Qwen/Qwen2.5-1.5B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536,
        "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "vocab_size": 151936, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "rope_theta": 1000000.0, "rms_norm_eps": 1e-06},
    # https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct/blob/main/config.json
    "Qwen/Qwen2.5-0.5B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "vocab_size": 151936, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "rope_theta": 1000000.0, "rms_norm_eps": 1e-06},
    # https://huggingface.co/Qwen/Qwen3-32B/blob/main/config.json
    "Qwen/Qwen3-32B": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 5120, "head_dim": 128,
        "intermediate_size": 25600, "num_hidden_layers": 64, "num_attention_heads": 64, "num_key_value_heads": 8,
        "max_position_embeddings": 40960, "vocab_size": 151936, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "rope_theta": 1000000, "rms_norm_eps": 1e-06},
    # https://huggingface.co/Qwen/Qwen3-1.7B-Base/blob/main/config.json
    "Qwen/Qwen3-1.7B-Base": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2048, "head_dim": 128,
        "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "max_position_embeddings": 32768, "vocab_size": 151936, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "rope_theta": 1000000, "rms_norm_eps": 1e-06},
}


def fake_sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def lay_out(hub_cache: Path, repo: str, files: dict[str, str | dict], sha: str | None = None,
            branch: str | None = "main") -> str:
    """Write a snapshot of ``repo`` at ``sha`` into ``hub_cache`` (``$HF_HOME/hub``), and point
    ``branch`` at it (None: a commit reachable only by its sha). Returns the sha."""
    sha = sha or fake_sha(f"{repo}:{json.dumps(files, sort_keys=True)}")
    base = hub_cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / sha
    snap.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (snap / name).write_text(json.dumps(content) if isinstance(content, dict) else content)
    if branch:
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / branch).write_text(sha)
    return sha


def lay_out_recipes(hub_cache: Path) -> dict[str, str]:
    """Every recipe model's config.json at a sha of its own, on ``main``: repo -> sha."""
    return {repo: lay_out(hub_cache, repo, {"config.json": cfg}) for repo, cfg in CONFIGS.items()}
