"""`distill datasets ls/show/head --json` report what the datasets really hold (local and S3)."""
import json
import uuid

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.storage import Storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return f"s3://{request.getfixturevalue('s3_bucket')}/{uuid.uuid4().hex[:8]}"


def _write(st: Storage, rel: str, rows: list[dict], stage: str, output: str, shard_rows: int = 3) -> str:
    path = st.path(rel)
    w = st.dataset_writer(path, {"run_id": "run-1", "stage": stage, "output": output, "fingerprint": "f" * 20,
                                 "parents": {}}, rows_per_shard=shard_rows)
    w.write(pa.Table.from_pylist(rows))
    w.commit()
    return st.uri(path)


def _json(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_ls_show_head(root):
    st = Storage(root)
    verified = [{"prompt_id": f"p{i % 3}", "source": "gsm8k" if i < 5 else "math", "completion_tokens": 10 * i,
                 "verdict": "correct" if i % 2 else "rejected", "reason": "ok" if i % 2 else "wrong_answer"}
                for i in range(8)]
    chat = [{"prompt_id": "p0", "messages": [{"role": "user", "content": "1+1?"},
                                             {"role": "assistant", "content": "<think>x</think> \\boxed{2}"}]}]
    v_uri = _write(st, "cache/verify/abc/1/verified", verified, "verify", "verified")
    c_uri = _write(st, "cache/dedupe/def/1/sft", chat, "dedupe", "sft")

    listed = _json(["datasets", "ls", root, "--json"])
    by_name = {d["name"]: d for d in listed}
    assert set(by_name) == {"verify.verified", "dedupe.sft"}
    assert by_name["verify.verified"]["rows"] == 8 and by_name["verify.verified"]["shards"] == 3
    assert by_name["dedupe.sft"]["rows"] == 1 and by_name["dedupe.sft"]["run"] == "run-1"
    assert by_name["verify.verified"]["bytes"] == sum(s["bytes"] for s in st.dataset_manifest(st.path("cache/verify/abc/1/verified"))["shards"])

    info = _json(["datasets", "show", v_uri, "--json"])
    assert info["rows"] == 8 and info["prompts"] == 3
    assert info["verdicts"] == {"rejected": 4, "correct": 4}
    assert info["reasons"] == {"wrong_answer": 4, "ok": 4}
    assert info["sources"] == {"gsm8k": 5, "math": 3}
    assert sum(b["count"] for b in info["completion_tokens_histogram"]) == 8
    assert info["lineage"]["stage"] == "verify" and info["schema"]["completion_tokens"] == "int64"

    rows = _json(["datasets", "head", v_uri, "-n", "4", "--json"])
    assert rows == verified[:4]  # crosses a shard boundary in order
    assert _json(["datasets", "head", c_uri, "--json"]) == chat
    text = CliRunner().invoke(app, ["datasets", "head", c_uri]).output
    assert "user: 1+1?" in text and "assistant: <think>x</think>" in text


def test_show_missing_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["datasets", "show", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "no committed dataset" in result.output
    result = CliRunner().invoke(app, ["datasets", "ls", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "nothing at" in result.output


def test_diff(root):
    st = Storage(root)
    a = [{"prompt_id": p, "completion_tokens": t, "verdict": v}
         for p, t, v in [("p1", 10, "correct"), ("p1", 20, "rejected"), ("p2", 30, "rejected")]]
    b = [{"prompt_id": p, "completion_tokens": t, "verdict": v}
         for p, t, v in [("p1", 10, "correct"), ("p1", 40, "correct"), ("p3", 50, "correct"), ("p3", 60, "rejected")]]
    ua = _write(st, "cache/verify/a/1/verified", a, "verify", "verified")
    ub = _write(st, "cache/verify/b/1/verified", b, "verify", "verified")
    d = _json(["datasets", "diff", ua, ub, "--json"])
    assert d["rows"] == {"a": 3, "b": 4, "delta": 1}
    assert d["prompts"]["added"] == ["p3"] and d["prompts"]["removed"] == ["p2"]
    assert d["length"]["a"]["mean"] == 20 and d["length"]["b"]["mean"] == 40 and d["length"]["mean_shift"] == 20
    # pass rate per prompt: a = [0.5, 0.0], b = [1.0, 0.5]
    assert d["pass_rate"]["a"]["mean"] == 0.25 and d["pass_rate"]["b"]["mean"] == 0.75
    text = CliRunner().invoke(app, ["datasets", "diff", ua, ub]).output
    assert "rows 3 -> 4 (+1)" in text and "1 added, 1 removed" in text
