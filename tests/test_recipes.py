"""The recipes in configs/recipes/ plan offline against a locally laid-out Hugging Face cache of
their models (architecture figures from the published config.json files: tests/hub_cache.py),
carry the published settings with a comment on each hyperparameter, fail at plan when altered
to overflow their GPUs, and estimate their cost."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.core.config import ConfigError, load_config
from pipeline.core.runner import Runner
from pipeline.sizing import hub
from tests.hub_cache import lay_out_recipes

RECIPES = Path(__file__).resolve().parent.parent / "configs" / "recipes"
NAMES = ["r1-distill-math", "qwen3-thinking", "gsm8k-small"]
HYPER = re.compile(r"^\s*(learning_rate|lr_scheduler|warmup_ratio|epochs|max_length|temperature|top_p|max_tokens|"
                   r"system_prompt|prompt_template|max_model_len|tensor_parallel_size|max_num_seqs|sampling|"
                   r"expected_completion_tokens|prompts|mfu|keep_fraction|samples_per_prompt|n|target_correct|"
                   r"max_samples|batch_size|gradient_checkpointing|bf16|batching):")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> dict[str, str]:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return lay_out_recipes(tmp_path / "hf" / "hub")


def _overrides(tmp_path: Path, name: str, *more: str) -> list[str]:
    src = tmp_path / "math.jsonl"
    src.write_text(json.dumps({"problem": "What is 1+1?", "answer": "2"}) + "\n")
    sets = [f"storage.root={tmp_path / 'root'}"]
    if name != "gsm8k-small":  # the math recipes read the user's problem set
        sets.append(f"stages.prompts.params.path={src}")
    return sets + list(more)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_plans_offline_with_models_pinned(tmp_path, hf_cache, name):
    cfg = load_config(RECIPES / f"{name}.yaml", _overrides(tmp_path, name))
    entries = Runner(cfg).plan()
    assert entries and not any(e.cached for e in entries)
    models = hub.run_models(cfg)["models"]
    for stage, fields in models.items():
        for f in fields.values():
            assert f["revision"] == "main" and f["sha"] == hf_cache[f["repo"]], (stage, f)
    assert {"generate", "student_sft"} <= set(models)


@pytest.mark.parametrize("name", NAMES)
def test_every_hyperparameter_line_says_its_source(name):
    lines = (RECIPES / f"{name}.yaml").read_text().splitlines()
    missing = [line.strip() for i, line in enumerate(lines)  # a comment on the line, or on the line above
               if HYPER.match(line) and "#" not in line and not line.rstrip().endswith(":")
               and not (i and lines[i - 1].strip().startswith("#"))]
    assert not missing, f"{name}: hyperparameters without a source comment: {missing}"


def test_r1_recipe_has_the_published_settings(tmp_path, hf_cache):
    cfg = load_config(RECIPES / "r1-distill-math.yaml", _overrides(tmp_path, "r1-distill-math"))
    gen = cfg.nodes["generate"].stage.params
    assert gen.model.startswith("hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-32B@")
    assert (gen.sampling.temperature, gen.sampling.top_p, gen.sampling.max_tokens) == (0.6, 0.95, 32768)
    assert gen.system_prompt is None and gen.sampling.strategy == "adaptive"
    prompt = cfg.nodes["prompts"].stage.params.prompt_template
    assert "Please reason step by step, and put your final answer within \\boxed{{}}." in prompt
    assert cfg.nodes["verify"].stage.params.checker == "math" and "dedupe" in cfg.nodes
    assert set(cfg.nodes["decontaminate"].stage.params.eval_sets) == {"gsm8k", "math500", "aime24", "amc23"}
    sft = cfg.nodes["student_sft"].stage.params
    assert sft.model.startswith("hf://Qwen/Qwen2.5-1.5B-Instruct@")
    assert (sft.learning_rate, sft.warmup_ratio, sft.max_length, sft.batching) == (4e-5, 0.03, 32768, "padded")
    for stage in ("eval_math500", "eval_aime24"):
        ev = cfg.nodes[stage].stage.params
        assert ev.sampling.n >= 8 and 1 in ev.ks
    assert "math500" in cfg.nodes["math500_prompts"].stage.params.path
    assert "aime24" in cfg.nodes["aime24_prompts"].stage.params.path


@pytest.mark.parametrize("alteration, field, numbers", [
    ("stages.generate.params.engine.max_model_len=65536", "stages.generate.params.engine.max_model_len",
     ["max_model_len 65536", "x 56 sequence(s) = 112.0 GiB", "H100 79.6 GiB"]),
    ("stages.generate.params.engine.tensor_parallel_size=4", "stages.generate.params.engine.max_model_len",
     ["/ tensor_parallel_size 4 = 15.3 GiB", "64 KiB/token"]),
    ("stages.generate.params.engine.tensor_parallel_size=1", "stages.generate.params.engine.max_model_len",
     ["/ tensor_parallel_size 1 = 61.0 GiB"]),
])
def test_r1_recipe_altered_to_overflow_fails_at_plan(tmp_path, hf_cache, alteration, field, numbers):
    with pytest.raises(ConfigError) as e:
        load_config(RECIPES / "r1-distill-math.yaml", _overrides(tmp_path, "r1-distill-math", alteration))
    msg = str(e.value)
    assert f"r1-distill-math.yaml: {field}" in msg
    for n in numbers:
        assert n in msg, msg


def test_gsm8k_small_teacher_on_an_l4_fails_with_the_weights(tmp_path, hf_cache):
    with pytest.raises(ConfigError, match=r"engine\.tensor_parallel_size: .*DeepSeek-R1-Distill-Qwen-7B.*L4"):
        load_config(RECIPES / "gsm8k-small.yaml", _overrides(
            tmp_path, "gsm8k-small", "stages.generate.params.engine.resources={'accelerator_type:L4': 0.001}",
            "stages.generate.params.engine.gpu_memory_utilization=0.5"))


@pytest.mark.parametrize("name", NAMES)
def test_recipe_estimate(tmp_path, hf_cache, name):
    cfg_args = [a for s in _overrides(tmp_path, name) for a in ("--set", s)]
    res = CliRunner().invoke(app, ["plan", str(RECIPES / f"{name}.yaml"), *cfg_args, "--estimate", "--json",
                                   "--price-per-gpu-hour", "2.5"])
    assert res.exit_code == 0, res.output
    est = json.loads(res.stdout)
    assert not est["problems"]
    kinds = {s["stage"]: s["cost"] for s in est["stages"]}
    assert kinds["generate"] == "decode" and kinds["student_sft"] == "train"
    assert all(s["gpu"] == "H100" and s["gpu_hours"] > 0 for s in est["stages"])
    assert est["total"]["cost_usd"] == pytest.approx(est["total"]["gpu_hours"] * 2.5, abs=0.1)


@pytest.mark.parametrize("name", ["r1-distill-math", "gsm8k-small"])
def test_r1_distill_format_accepts_a_prefilled_think(tmp_path, hf_cache, name):
    """The R1-distill template pre-fills "<think>\\n": completions start inside the reasoning.
    The recipes' format gates require the block to be closed, not opened by the model."""
    from stages.common.checkers import format_gate

    cfg = load_config(RECIPES / f"{name}.yaml", _overrides(tmp_path, name))
    for stage in ("generate", "verify"):
        fmt = cfg.nodes[stage].stage.params.format
        assert format_gate("1 plus 1 is 2.\n</think>\n\\boxed{2}", "stop", fmt) == (None, "\n\\boxed{2}")
        assert format_gate("1 plus 1 is 2. \\boxed{2}", "stop", fmt)[0][0] == "missing_think"  # never closed
