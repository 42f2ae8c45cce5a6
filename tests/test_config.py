"""Config errors: exit code 2, before Ray starts, naming the field and the file."""
from pathlib import Path

import pytest
from conftest import write_jsonl
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.core.config import ConfigError, load_config


def _write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "q.jsonl", [{"prompt": "1+1?", "answer": "2"}])


def _problems(path, overrides=None):
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return e.value.problems


def test_valid_config_loads_and_orders(tmp_path, prompts_file):
    p = _write(tmp_path, f"""
name: ok
storage: {{root: {tmp_path}/root}}
stages:
  verify: {{inputs: {{samples: generate.samples}}}}
  prompts: {{params: {{path: {prompts_file}}}}}
  generate: {{inputs: {{prompts: prompts.prompts}}, params: {{model: {tmp_path}}}}}
""")
    (tmp_path / "config.json").write_text("{}")
    cfg = load_config(p)
    assert cfg.order() == ["prompts", "generate", "verify"]
    assert cfg.nodes["verify"].inputs == {"samples": ("generate", "samples")}


def test_unknown_key_names_field_and_file(tmp_path, prompts_file):
    p = _write(tmp_path, f"""
name: bad
stages:
  prompts: {{params: {{path: {prompts_file}, promt_field: q}}}}
""")
    (line,) = _problems(p)
    assert str(p) in line and "stages.prompts.params.promt_field" in line and "unknown key" in line


def test_unknown_top_level_key_and_wrong_type(tmp_path, prompts_file):
    p = _write(tmp_path, f"""
name: bad
storrage: {{root: x}}
stages:
  prompts: {{params: {{path: {prompts_file}, limit: many}}}}
""")
    problems = _problems(p)
    assert any("storrage" in x and "unknown key" in x for x in problems)
    p2 = _write(tmp_path, f"name: bad\nstages:\n  prompts: {{params: {{path: {prompts_file}, limit: many}}}}\n", "p2.yaml")
    (line,) = _problems(p2)
    assert "stages.prompts.params.limit" in line and "integer" in line and "'many'" in line


def test_missing_prompt_file(tmp_path):
    p = _write(tmp_path, f"name: bad\nstages:\n  prompts: {{params: {{path: {tmp_path}/nope.jsonl}}}}\n")
    (line,) = _problems(p)
    assert "stages.prompts.params.path" in line and "nope.jsonl" in line and str(p) in line


def test_missing_model_path(tmp_path, prompts_file):
    p = _write(tmp_path, f"""
name: bad
stages:
  prompts: {{params: {{path: {prompts_file}}}}}
  generate: {{inputs: {{prompts: prompts.prompts}}, params: {{model: {tmp_path}/no-such-model}}}}
""")
    (line,) = _problems(p)
    assert "stages.generate.params.model" in line and "model path not found" in line


def test_wiring_errors(tmp_path, prompts_file):
    p = _write(tmp_path, f"""
name: bad
stages:
  prompts: {{params: {{path: {prompts_file}}}}}
  verify: {{inputs: {{samples: prompts}}}}
  dedupe: {{inputs: {{samples: nowhere.x}}}}
  generate: {{inputs: {{prompt: prompts.prompts}}}}
  mystery: {{uses: no_such_kind}}
""")
    text = "\n".join(_problems(p))
    assert "stages.verify.inputs.samples" in text and "name one as prompts.OUTPUT" in text
    assert "stages.dedupe.inputs.samples: no stage named 'nowhere'" in text
    assert "stages.generate.inputs.prompt: unknown input" in text
    assert "stages.generate.inputs.prompts: required input is not wired" in text
    assert "stages.mystery.uses: unknown stage kind 'no_such_kind'" in text


def test_cycle_is_reported(tmp_path):
    p = _write(tmp_path, """
name: loop
stages:
  a: {uses: verify, inputs: {samples: b.verified}}
  b: {uses: verify, inputs: {samples: a.verified}}
""")
    (line,) = _problems(p)
    assert "dependency cycle" in line


def test_set_overrides_and_include(tmp_path, prompts_file):
    _write(tmp_path, f"name: base\nstages:\n  prompts: {{params: {{path: {prompts_file}}}}}\n", "base.yaml")
    p = _write(tmp_path, "name: child\ninclude: [base.yaml]\nstages:\n  dedupe: {inputs: {samples: prompts.prompts}, "
                         "params: {completion_field: answer, require_verdict: null}}\n")
    cfg = load_config(p, ["stages.prompts.params.limit=5", "storage.root=s3://b/x"])
    assert cfg.nodes["prompts"].stage.params.limit == 5
    assert cfg.storage.root == "s3://b/x"
    assert set(cfg.nodes) == {"prompts", "dedupe"}
    (line,) = _problems(p, ["stages.prompts.params.limit=-1"])
    assert "stages.prompts.params.limit" in line and str(tmp_path / "base.yaml") in line


def test_cli_exits_2_with_the_message(tmp_path):
    p = _write(tmp_path, "name: bad\nstages:\n  prompts: {params: {path: /nonexistent/q.jsonl}}\n")
    for cmd in (["run", str(p)], ["plan", str(p)]):
        result = CliRunner().invoke(app, cmd)
        assert result.exit_code == 2
        assert "stages.prompts.params.path" in result.output and "/nonexistent/q.jsonl" in result.output
    result = CliRunner().invoke(app, ["run", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "config file not found" in result.output


@pytest.mark.parametrize("name", ["toy-teacher.yaml", "demo.yaml", "cluster.example.yaml"])
def test_shipped_configs_validate(name):
    """The configs in configs/ load, wire and validate (the cluster one only changes resources)."""
    from conftest import REPO

    cfg = load_config(REPO / "configs" / name)
    assert cfg.order()[0] == "toy_task"
    if name == "cluster.example.yaml":
        assert cfg.storage.root.startswith("s3://")
        gen = cfg.nodes["generate"].stage.params
        assert gen.engine.tensor_parallel_size == 2 and gen.sampling.budget.max_thinking_tokens == 12000


def test_a_stage_needing_a_module_that_is_not_installed_fails_at_plan(tmp_path, monkeypatch):
    """``Stage.requires``: plan names the stage, the module and how to install it, before Ray."""
    (tmp_path / "needy_stage.py").write_text(
        "from typing import ClassVar\nfrom pydantic import BaseModel\nfrom pipeline.core.stage import Stage\n"
        "class Params(BaseModel):\n    pass\n"
        "class Needy(Stage):\n    kind: ClassVar[str] = 'needy'\n    Params = Params\n"
        "    requires: ClassVar[tuple] = ('json', 'no_such_module_for_distill', 'no_such_pkg_for_distill.sub')\n"
        "    def run(self, ctx):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    p = _write(tmp_path, "name: needs\nstages:\n  needy: {uses: 'needy_stage:Needy'}\n")
    (line,) = _problems(p)
    assert line.startswith(f"{p}: stages.needy.uses: stage kind 'needy' needs no_such_module_for_distill, "
                           "no_such_pkg_for_distill.sub, which cannot be imported here"), line
    result = CliRunner().invoke(app, ["plan", str(p)])
    assert result.exit_code == 2 and "no_such_module_for_distill" in result.output


def test_every_registered_stage_declares_what_it_needs_and_it_is_installed_here():
    from pipeline.core import registry
    from pipeline.core.stage import missing_modules

    heavy = {"generate": "vllm", "evaluate": "vllm", "hard_prompts": "vllm", "sft": "trl", "dpo": "trl", "grpo": "trl",
             "verify": "math_verify"}
    for kind, module in heavy.items():
        assert module in registry.load(kind).requires, kind
    for kind in registry.kinds():
        assert not missing_modules(registry.load(kind).requires), kind
