"""The prompts and dedupe stages through the runner: quarantine with reasons, no lost rows, caching."""
import json

import pytest
from conftest import output_rows, run_stages, write_jsonl

from pipeline.core.config import load_config
from pipeline.core.runner import Runner
from pipeline.views.runs import load_run


@pytest.fixture
def source(tmp_path):
    rows = [
        {"question": "What is 2 + 2?", "answer": "4", "level": 1},
        {"question": "What is 3 + 5?"},  # missing answer
        {"question": "   ", "answer": "1"},  # empty prompt
        '{"question": "broken json", ',
        {"question": "What is  2 + 2?", "answer": "4"},  # same prompt after normalisation
        {"question": "Half of 9?", "answer": 4.5},
        [1, 2, 3],
    ]
    path = write_jsonl(tmp_path / "src.jsonl", rows)
    with open(path, "ab") as f:
        f.write(b'{"question": "bad \xff bytes", "answer": "1"}\n')
    return path


def _cfg(tmp_path, source):
    p = tmp_path / "p.yaml"
    p.write_text(f"""
name: prompts-only
storage: {{root: {tmp_path}/root}}
stages:
  prompts:
    params: {{path: {source}, prompt_field: question, answer_field: answer}}
""")
    return load_config(p)


def test_bad_rows_are_quarantined_with_reasons(ray_local, tmp_path, source):
    stages, st = run_stages(_cfg(tmp_path, source))
    rec = stages["prompts"]
    good, bad = output_rows(st, rec, "prompts"), output_rows(st, rec, "quarantine")
    assert len(good) + len(bad) == 8  # no input row is lost
    assert [g["answer"] for g in good] == ["4", "4.5"]
    assert json.loads(good[0]["metadata"]) == {"level": 1}
    reasons = {b["row_number"]: b["reason"] for b in bad}
    assert reasons[2] == "missing answer field 'answer'"
    assert reasons[3] == "empty prompt field 'question'"
    assert reasons[4].startswith("invalid JSON")
    assert reasons[5].startswith("duplicate prompt")
    assert reasons[7].startswith("expected a JSON object")
    assert reasons[8].startswith("invalid UTF-8")
    assert rec["dropped"]["quarantined"]["missing answer field 'answer'"] == 1
    assert list(rec["dropped"]) == ["quarantined"] and sum(rec["dropped"]["quarantined"].values()) == len(bad)
    # the counts per reason are in both datasets' manifests too, under the one key
    for output in ("prompts", "quarantine"):
        stats = st.dataset_manifest(st.strip(rec["output"][output]))["stats"]
        assert stats == {"input_rows": 8, "dropped": rec["dropped"]}

    again = Runner(_cfg(tmp_path, source)).run()
    assert [s["status"] for s in again.manifest["stages"]] == ["cached"]
    assert load_run("latest", st)[1]["run_id"] == again.run_id

    # editing the source file changes the fingerprint
    with open(source, "a") as f:
        f.write(json.dumps({"question": "new one?", "answer": "1"}) + "\n")
    third = Runner(_cfg(tmp_path, source)).run()
    assert third.manifest["stages"][0]["status"] == "done"
    assert third.manifest["stages"][0]["rows"]["prompts"] == 3

    # the latest pointer names the newest version, and the inspection CLI follows it
    from typer.testing import CliRunner

    from pipeline.cli.main import app

    pointer = st.read_json(st.path("latest", "prompts-only", "prompts.prompts"))
    assert pointer["uri"] == third.manifest["stages"][0]["output"]["prompts"]
    shown = CliRunner().invoke(app, ["datasets", "show", st.path("latest", "prompts-only", "prompts.prompts"), "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)["rows"] == 3


def test_parquet_source_with_field_names(ray_local, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"problem": ["1+1?", "2+2?", None], "solution": ["2", "4", "x"], "level": [1, 2, 3]}),
                   tmp_path / "src.parquet")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: pq
storage: {{root: {tmp_path}/root}}
stages:
  prompts: {{params: {{path: {tmp_path}/src.parquet, prompt_field: problem, answer_field: solution, source: mine}}}}
""")
    stages, st = run_stages(cfg)
    rec = stages["prompts"]
    good, bad = output_rows(st, rec, "prompts"), output_rows(st, rec, "quarantine")
    assert [(g["prompt"], g["answer"], g["source"]) for g in good] == [("1+1?", "2", "mine"), ("2+2?", "4", "mine")]
    assert json.loads(good[1]["metadata"]) == {"level": 2}
    assert [(b["row_number"], b["reason"]) for b in bad] == [(3, "empty prompt field 'problem'")]
