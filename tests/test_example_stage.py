"""The worked example in stages/README.md: its stage code and config, run as written."""
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_jsonl
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.core.config import ConfigError, load_config
from pipeline.core.runner import Runner

DOC = (REPO / "stages" / "README.md").read_text()


def _block(lang: str) -> str:
    (block,) = re.findall(rf"```{lang}\n(.*?)```", DOC, re.S)
    return block


@pytest.fixture
def example(tmp_path, monkeypatch):
    """The README's module importable as ``length_filter``, its config with the prompts file
    and a storage root in tmp_path."""
    (tmp_path / "length_filter.py").write_text(_block("python"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "length_filter", raising=False)
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Compute {i} + {i}.", "answer": str(2 * i)} for i in range(8)])
    cfg = tmp_path / "p.yaml"
    cfg.write_text(_block("yaml").replace("path: prompts.jsonl", f"path: {tmp_path / 'prompts.jsonl'}")
                   + f"storage: {{root: {tmp_path / 'root'}}}\n")
    return cfg


def test_readme_filter_stage_runs_and_reports_its_drops(ray_local, example):
    code = _block("python").strip().splitlines()
    assert len(code) <= 25 and any(line.startswith("class LengthFilter(FilterStage)") for line in code)
    result = Runner(load_config(example)).run()
    assert result.ok, result.error
    stage = {s["name"]: s for s in result.manifest["stages"]}["length_filter"]
    # answers 0, 2, 4, 6, 8 have one character; 10, 12, 14 have two
    assert stage["rows"] == {"kept": 3} and stage["metrics"]["kept"] == 3
    assert stage["dropped"] == {"removed": {"shorter_than_2": 5}}
    shown = CliRunner().invoke(app, ["datasets", "show", stage["output"]["kept"], "--json"])
    info = json.loads(shown.output)
    assert info["rows"] == 3 and info["dropped"] == {"removed": {"shorter_than_2": 5}}
    assert [s["name"] for s in info["funnel"]] == ["prompts.prompts", "length_filter.kept"]
    assert set(info["schema"]) == {"prompt_id", "prompt", "answer", "source", "metadata"}  # passed through
    text = CliRunner().invoke(app, ["datasets", "show", stage["output"]["kept"]]).output
    assert "removed: shorter_than_2=5" in text


def test_readme_filter_wiring_error_is_caught_by_plan(example, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    monkeypatch.setattr(Runner, "_ensure_ray", lambda *a, **k: pytest.fail("Ray was started"))
    example.write_text(example.read_text().replace("column: answer", "column: completion"))
    result = CliRunner().invoke(app, ["plan", str(example)])
    assert result.exit_code == 2
    expected = ("stages.length_filter.inputs.rows: prompts.prompts: no column 'completion' "
                "(needs string; has: prompt_id, prompt, answer, source, metadata)")
    assert expected in " ".join(result.output.split())
    assert expected in DOC.replace("\n", " ").replace("`", "")  # the README quotes the real message
    with pytest.raises(ConfigError):
        load_config(Path(example))
