"""Soft failure: a bad request becomes an errored row; past max_error_rate the stage fails
loudly with a summary of the reasons. The reasons are the real engine's: a prompt longer than
the context, a prompt the chat template refuses, and a request vLLM itself rejects (an empty
prompt). The template (conftest's R1_LIKE_TEMPLATE) and engine are test_templates.py's."""
import json

import pytest
from conftest import R1_LIKE_TEMPLATE, write_jsonl

from pipeline.core.config import load_config
from pipeline.core.runner import Runner


@pytest.mark.engine
def test_error_rate_over_threshold_fails_with_reasons(ray_local, solver_model, tmp_path):
    long = "Compute " + " + ".join(["1"] * 300) + "."
    rows = ([{"prompt": f"{long} #{i}", "answer": "300"} for i in range(3)]
            + [{"prompt": "Compute 2 + 2. UNTOKENIZABLE", "answer": "4"},
               {"prompt": "Compute 3 + 3. EMPTY-PROMPT", "answer": "6"},
               {"prompt": "Compute 1 + 1.", "answer": "2"}])
    src = write_jsonl(tmp_path / "src.jsonl", rows)
    path = tmp_path / "errors.yaml"
    path.write_text(f"""
name: errors
storage: {{root: {tmp_path}/root}}
stages:
  prompts: {{params: {{path: {src}}}}}
  generate:
    inputs: {{prompts: prompts.prompts}}
    params:
      model: {solver_model}
      chat_template: {json.dumps(R1_LIKE_TEMPLATE)}
      chat_template_kwargs: {{enable_thinking: true}}
      sampling: {{n: 2, max_tokens: 8, seed: 1}}
      engine: {{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 2}}
      max_error_rate: 0.5
""")
    result = Runner(load_config(path)).run()
    assert not result.ok
    message = result.stage_errors["generate"]
    assert "10/12 samples errored (83.3% > max_error_rate 50.0%)" in message, message
    assert "prompt_too_long: 6 samples, 3 prompts" in message, message
    assert "tokens >= model context 128" in message  # an example of the reason's detail
    assert "prompt_untokenizable: 2 samples, 1 prompts" in message, message
    assert "this template refuses the prompt" in message
    assert "engine_error: 2 samples, 1 prompts" in message, message  # vLLM's own refusal, one request only
