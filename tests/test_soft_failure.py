"""Soft failure: a bad request becomes an errored row; past max_error_rate the stage fails
loudly with a summary of the reasons. The reasons are the real engine's: a prompt longer than
the context, a prompt the chat template refuses, and a request the engine itself rejects."""
import json

import pytest
from conftest import generate_config, write_jsonl

from pipeline.config import load_config
from pipeline.runner import Runner

ENGINE = "{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 2, max_num_seqs: 4}"


def _refusing_template(model: str) -> str:
    """The tiny model's own chat template, except that it raises on a prompt holding
    UNTOKENIZABLE and renders nothing (an empty prompt, which vLLM's add_request rejects) for
    one holding EMPTY-PROMPT."""
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(model).chat_template
    return ("{% for m in messages %}{% if 'UNTOKENIZABLE' in m['content'] %}"
            "{{ raise_exception('this template refuses the prompt') }}{% endif %}{% endfor %}"
            "{% if 'EMPTY-PROMPT' not in messages[-1]['content'] %}" + own + "{% endif %}")


@pytest.mark.engine
def test_error_rate_over_threshold_fails_with_reasons(ray_local, tiny_model, tmp_path):
    long = "Compute " + " + ".join(["1"] * 300) + "."
    rows = ([{"prompt": f"{long} #{i}", "answer": "300"} for i in range(3)]
            + [{"prompt": "Compute 2 + 2. UNTOKENIZABLE", "answer": "4"},
               {"prompt": "Compute 3 + 3. EMPTY-PROMPT", "answer": "6"},
               {"prompt": "Compute 1 + 1.", "answer": "2"}])
    src = write_jsonl(tmp_path / "src.jsonl", rows)
    path = generate_config(tmp_path, "errors", src, tiny_model, "{n: 2, max_tokens: 8, seed: 1}", ENGINE)
    extra = f", max_error_rate: 0.5, chat_template: {json.dumps(_refusing_template(tiny_model))}"
    path.write_text(path.read_text().replace(f"engine: {ENGINE}}}", f"engine: {ENGINE}{extra}}}"))
    result = Runner(load_config(path)).run()
    assert not result.ok
    message = result.stage_errors["generate"]
    assert "10/12 samples errored (83.3% > max_error_rate 50.0%)" in message, message
    assert "prompt_too_long: 6 samples, 3 prompts" in message, message
    assert "tokens >= model context 128" in message  # an example of the reason's detail
    assert "prompt_untokenizable: 2 samples, 1 prompts" in message, message
    assert "this template refuses the prompt" in message
    assert "engine_error: 2 samples, 1 prompts" in message, message  # vLLM's own refusal, one request only
