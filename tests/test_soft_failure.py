"""Soft failure: a bad request becomes an errored row; past max_error_rate the stage fails
loudly with a summary of the reasons."""
import pytest
from conftest import generate_config, write_jsonl

from pipeline.config import load_config
from pipeline.runner import Runner

ENGINE = "{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 2, max_num_seqs: 4}"


@pytest.mark.engine
def test_error_rate_over_threshold_fails_with_reasons(ray_local, tiny_model, tmp_path):
    long = "Compute " + " + ".join(["1"] * 300) + "."
    rows = [{"prompt": f"{long} #{i}", "answer": "300"} for i in range(3)] + [{"prompt": "Compute 1 + 1.", "answer": "2"}]
    src = write_jsonl(tmp_path / "src.jsonl", rows)
    cfg = generate_config(tmp_path, "errors", src, tiny_model, "{n: 2, max_tokens: 8, seed: 1}",
                          ENGINE + "\n    max_error_rate: 0.5").read_text()
    path = tmp_path / "errors.yaml"
    path.write_text(cfg.replace(f"engine: {ENGINE}\n    max_error_rate: 0.5}}",
                                f"engine: {ENGINE}, max_error_rate: 0.5}}"))
    result = Runner(load_config(path)).run()
    assert not result.ok
    message = result.stage_errors["generate"]
    assert "6/8 samples errored (75.0% > max_error_rate 50.0%)" in message
    assert "prompt_too_long: 6 samples, 3 prompts" in message
    assert "tokens >= model context 128" in message  # an example of the reason's detail
