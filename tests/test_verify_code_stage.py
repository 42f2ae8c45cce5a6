"""A small code dataset with function-call tests (HumanEval- and MBPP-shaped), with a
stdin/stdout row among them, verified end to end through the verify stage on Ray."""
import json
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pytest
from conftest import output_rows, run_stages, write_jsonl
from pydantic import BaseModel, ConfigDict

from pipeline.core.stage import Stage, StageContext
from stages.common import sandbox as sb


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str


class SamplesFile(Stage):
    """Sample rows (completions already written) read from a JSONL file: stands in for generate."""

    kind: ClassVar[str] = "samples_file"
    Params = _Params
    outputs: ClassVar[dict] = {"samples": "dataset"}

    def run(self, ctx: StageContext) -> None:
        rows = [json.loads(line) for line in open(self.params.path)]
        schema = pa.schema([(k, pa.int64() if k == "sample_index" else pa.string()) for k in rows[0]])
        ctx.write_dataset("samples", [pa.Table.from_pylist(rows, schema=schema)], schema)


def _code(src: str) -> str:
    return f"<think>\nwrite the function\n</think>\n```python\n{src}\n```\n"


HE_TESTS = json.dumps({"test": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n",
                       "entry_point": "total"})
MBPP_TESTS = json.dumps({"test_list": ["assert is_even(2)", "assert not is_even(3)"]})
STDIO_TESTS = json.dumps([{"input": "2 3\n", "output": "5\n"}])

# (completion, tests, test_kind, expected verdict, expected reason)
ROWS = [
    (_code("def total(xs):\n    return sum(xs)"), HE_TESTS, "function_call", "correct", "ok"),
    (_code("def total(xs):\n    return sum(xs) + 1"), HE_TESTS, "function_call", "rejected", "wrong_output"),
    (_code("def total(xs):\n    return xs[0] + total(xs[1:])"), HE_TESTS, None, "rejected", "runtime_error"),
    (_code("def is_even(n):\n    return n % 2 == 0"), MBPP_TESTS, None, "correct", "ok"),
    (_code("def is_even(n):\n    return True"), MBPP_TESTS, "function_call", "rejected", "wrong_output"),
    (_code("def is_even(n):\n    while True:\n        pass"), MBPP_TESTS, None, "rejected", "time_limit"),
    (_code("a, b = map(int, input().split())\nprint(a + b)"), STDIO_TESTS, "stdio", "correct", "ok"),
    (_code("def total(xs):\n    return sum(xs)"), STDIO_TESTS, "function_call", "error", "bad_tests"),
    ("<think>\nno code\n</think>\nI cannot do it.", HE_TESTS, "function_call", "rejected", "no_code_block"),
]


@pytest.fixture
def sandbox_here():
    if sb.detect_isolation() is None:
        pytest.skip(f"no sandbox here: {sb.isolation_error()}")


def test_verify_stage_checks_function_call_tests(ray_local, tmp_path: Path, sandbox_here):
    rows = [{"prompt_id": f"p{i // 3}", "sample_index": i % 3, "prompt": "write it", "answer": "",
             "completion": c, "finish_reason": "stop", "error": None, "tests": t, "test_kind": k}
            for i, (c, t, k, _, _) in enumerate(ROWS)]
    src = write_jsonl(tmp_path / "samples.jsonl", rows)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: verify-code
storage: {{root: {tmp_path}/root}}
stages:
  samples: {{uses: {__name__}:SamplesFile, params: {{path: {src}}}}}
  verify:
    inputs: {{samples: samples.samples}}
    params: {{checker: auto, code: {{timeout_s: 5, cpu_seconds: 10}}, workers: 2}}
""")
    # timeout_s 5: under two test shards a fresh interpreter in the sandbox took over 2 s to run a
    # two-assert test (CI=true clean clone, 2026-12-03); only the looping row waits for the limit
    records, storage = run_stages(cfg)
    out = output_rows(storage, records["verify"], "verified")
    assert [(r["verdict"], r["reason"]) for r in out] == [(v, reason) for *_, v, reason in ROWS]
    assert [r["test_kind"] for r in out] == [k for _, _, k, _, _ in ROWS]  # the rows keep saying their kind
    assert out[1]["detail"] == "failed: assert candidate([1, 2, 3]) == 6"
    assert out[4]["detail"] == "failed: assert not is_even(3)"
    assert "RecursionError" in out[2]["detail"] or "IndexError" in out[2]["detail"]
    assert "def total" in out[0]["extracted"]
    metrics = records["verify"]["metrics"]
    assert metrics["code_checks"] == len(ROWS) and metrics["correct"] == 3
    assert metrics["reasons"]["wrong_output"] == 2
