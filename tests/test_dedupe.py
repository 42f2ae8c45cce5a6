"""dedupe: near duplicates (MinHash LSH) of a lightly edited trace are dropped with a reason."""
import pytest
from conftest import write_jsonl

from pipeline.config import load_config
from pipeline.runner import Runner

TRACE = ("<think> First we add the two numbers of apples that Janet has in her basket, which gives twelve, "
         "then we subtract the three she gave to her neighbour on Monday morning, leaving nine apples, "
         "and finally we double it because her sister brings the same amount again </think> \\boxed{18}")


def _run(tmp_path, rows, params):
    src = write_jsonl(tmp_path / "src.jsonl", rows)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: dd
storage: {{root: {tmp_path}/root}}
stages:
  prompts: {{params: {{path: {src}, answer_field: trace}}}}
  dedupe:
    inputs: {{samples: prompts.prompts}}
    params: {params}
""")
    runner = Runner(load_config(cfg))
    result = runner.run()
    assert result.ok, result.error
    stage = result.manifest["stages"][-1]
    st = runner.storage
    return (st.read_dataset(st.strip(stage["output"]["sft"])).to_pylist(),
            st.read_dataset(st.strip(stage["output"]["dropped"])).to_pylist())


@pytest.mark.parametrize("near", [True, False])
def test_near_duplicate_of_a_lightly_edited_trace(ray_local, tmp_path, near):
    edited = TRACE.replace("Monday morning", "Tuesday morning")
    rows = [
        {"prompt": "Janet's apples, version A?", "trace": TRACE},
        {"prompt": "Janet's apples, version B?", "trace": edited},  # one word of the trace edited
        {"prompt": "Something else entirely?", "trace": "<think> 2 + 2 = 4 </think> \\boxed{4}"},
    ]
    params = ("{completion_field: answer, require_verdict: null, near_dup: {enabled: %s, threshold: 0.5, ngram: 3}}"
              % str(near).lower())
    kept, dropped = _run(tmp_path, rows, params)
    if near:
        assert len(kept) == 2
        assert [d["reason"] for d in dropped] == ["near_duplicate"]
    else:
        assert len(kept) == 3 and dropped == []

