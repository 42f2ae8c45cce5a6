"""Experiment matrices: ``matrix:`` expansion in pipeline configs, its wiring rules and its
errors (each naming the file and the field), through load_config and the plan. No Ray."""
from pathlib import Path

import pytest
from conftest import write_jsonl
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.core.config import ConfigError, load_config, parse_variant, variant_name
from pipeline.core.runner import Runner


@pytest.fixture
def src(tmp_path):
    return write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"{i}+1?", "answer": str(i + 1)} for i in range(5)])


def _write(tmp_path: Path, body: str, matrix: str = "{seed: [0, 1, 2], data: [a, b]}", name: str = "m.yaml") -> Path:
    p = tmp_path / name
    p.write_text(f"name: m\nstorage: {{root: {tmp_path}/root}}\nmatrix: {matrix}\nstages:\n{body}")
    return p


def _problems(path, overrides=None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return e.value.problems


def _body(src, extra: str = "") -> str:
    return f"""  prompts: {{params: {{path: {src}}}}}
  a: {{uses: subsample, inputs: {{data: prompts.prompts}}, params: {{n: 3}}}}
  b: {{uses: subsample, inputs: {{data: prompts.prompts}}, params: {{n: 4}}}}
  pick:
    uses: subsample
    matrix: [seed, data]
    inputs: {{data: "{{data}}.data"}}
    params: {{seed: "{{seed}}", n: 2}}
  again:
    uses: subsample
    matrix: [data, seed]
    inputs: {{data: pick.data}}
    params: {{seed: "{{seed}}"}}
{extra}"""


def test_stages_expand_per_combination_with_typed_values(tmp_path, src):
    cfg = load_config(_write(tmp_path, _body(src)))
    picks = [n for n in cfg.nodes if n.startswith("pick[")]
    assert picks == [f"pick[data={d},seed={s}]" for s in (0, 1, 2) for d in ("a", "b")]
    node = cfg.nodes["pick[data=b,seed=2]"]
    assert node.stage.params.seed == 2 and isinstance(node.spec.params["seed"], int)  # "{seed}" took the int
    assert node.base == "pick" and node.variant == {"seed": 2, "data": "b"}
    assert node.inputs == {"data": ("b", "data")}  # "{data}.data" -> stage b
    # same axes: each variant of `again` reads the variant of `pick` with the same values
    assert cfg.nodes["again[data=a,seed=1]"].inputs == {"data": ("pick[data=a,seed=1]", "data")}
    assert "pick" not in cfg.nodes and "again" not in cfg.nodes
    order = cfg.order()
    assert order.index("pick[data=a,seed=1]") < order.index("again[data=a,seed=1]")
    assert parse_variant("pick[data=b,seed=2]") == ("pick", {"data": "b", "seed": "2"})
    assert variant_name("x", {"seed": 1, "data": True}) == "x[data=true,seed=1]"


def test_fingerprints_of_expanded_stages_are_ordinary(tmp_path, src):
    # `same` is expanded over seed but does not use it: its three variants are one stage to the cache
    body = _body(src, '  same: {uses: subsample, matrix: [seed], inputs: {data: a.data}, params: {n: 1}}\n'
                      '  plain: {uses: subsample, inputs: {data: a.data}, params: {n: 1}}\n')
    entries = {e.name: e for e in Runner(load_config(_write(tmp_path, body))).plan()}
    same = {entries[f"same[seed={s}]"].fingerprint for s in (0, 1, 2)}
    assert same == {entries["plain"].fingerprint}
    picks = {entries[f"pick[data={d},seed={s}]"].fingerprint for s in (0, 1, 2) for d in "ab"}
    assert len(picks) == 6
    assert entries["pick[data=a,seed=0]"].inputs == {"data": "a.data"}


def test_embedded_placeholder_and_set_override(tmp_path, src):
    body = f"""  prompts: {{matrix: [data], params: {{path: "{tmp_path}/{{data}}.jsonl"}}}}\n"""
    for d in ("a", "b"):
        write_jsonl(tmp_path / f"{d}.jsonl", [{"prompt": "1+1?", "answer": "2"}])
    cfg = load_config(_write(tmp_path, body))
    assert cfg.nodes["prompts[data=b]"].stage.params.path == f"{tmp_path}/b.jsonl"
    # --set changes the matrix before expansion
    cfg = load_config(_write(tmp_path, body), ["matrix.data=[a]"])
    assert list(cfg.nodes) == ["prompts[data=a]"]


def test_variadic_input_takes_every_variant(tmp_path, src):
    body = _body(src, "  table: {uses: compare, inputs: {runs: again.data}, params: {baseline: {data: a}}}\n")
    problems = _problems(_write(tmp_path, body))
    # the wiring expands to all six variants, and each is checked against compare's declared columns
    runs = [p for p in problems if "stages.table.inputs.runs[" in p and "no column 'role'" in p]
    assert len(runs) == 6 and all(p.startswith(f"{tmp_path / 'm.yaml'}: ") for p in runs), problems
    assert any("stages.table.inputs.runs[data=b,seed=2]: again[data=b,seed=2].data: no column 'role'" in p
               for p in runs), problems


def test_variadic_input_from_an_expanded_stage_takes_matching_variants(tmp_path, src):
    cfg = load_config(_write(tmp_path, _body(src, "  cat: {uses: concat, matrix: [seed], inputs: {a: a.data, b: b.data}}\n")))
    # a matched-axes stage (concat is not variadic) expanded over a subset of axes
    assert cfg.nodes["cat[seed=1]"].inputs == {"a": ("a", "data"), "b": ("b", "data")}


def test_one_named_variant_can_be_wired(tmp_path, src):
    cfg = load_config(_write(tmp_path, _body(src, "  one: {uses: subsample, inputs: {data: \"pick[data=b,seed=1].data\"}}\n")))
    assert cfg.nodes["one"].inputs == {"data": ("pick[data=b,seed=1]", "data")}


@pytest.mark.parametrize("extra, field, words", [
    ("  x: {uses: subsample, matrix: [seeds], inputs: {data: a.data}}\n", "stages.x.matrix", "unknown axis 'seeds'"),
    ("  x: {uses: subsample, matrix: [data], inputs: {data: a.data}, params: {seed: \"{seed}\"}}\n",
     "stages.x.params.seed", "not expanded over it"),
    ("  x: {uses: subsample, inputs: {data: pick.data}}\n", "stages.x.inputs.data",
     "stage 'pick' is expanded over matrix axes seed, data, but stage 'x' is not expanded over seed, data"),
    ("  x: {uses: subsample, matrix: [seed], inputs: {data: again.data}}\n", "stages.x[seed=0].inputs.data",
     "not expanded over data"),
    ("  x: {uses: subsample, matrix: [data], inputs: {data: \"{data}.nope\"}}\n", "stages.x[data=a].inputs.data",
     "stage 'a' has no output 'nope'"),
    ("  x: {uses: subsample, matrix: [data], inputs: {data: \"{data}x.data\"}}\n", "stages.x[data=a].inputs.data",
     "no stage named 'ax'"),
    ("  x: {uses: subsample, matrix: [seed, seed], inputs: {data: a.data}}\n", "stages.x.matrix", "listed twice"),
    ("  x: {uses: compare, inputs: {runs: pick.data}, params: {baseline: {data: c}}}\n", "stages.x.params.baseline",
     "data=c matches 0 variants"),
    ("  x: {uses: compare, inputs: {runs: pick.data}, params: {group_by: [size]}}\n", "stages.x.params.group_by",
     "'size' is not an axis"),
    ("  x: {uses: compare, inputs: {runs: pick.data}, params: {group_by: []}}\n", "stages.x.params.group_by",
     "repeat seed="),
    ("  \"pick[data=a,seed=0]\": {uses: subsample, inputs: {data: a.data}}\n", "stages.pick", "also a stage's name"),
])
def test_matrix_errors_name_file_and_field(tmp_path, src, extra, field, words):
    path = _write(tmp_path, _body(src, extra))
    problems = _problems(path)
    assert any(f"{path}: {field}:" in p and words in p for p in problems), problems


@pytest.mark.parametrize("matrix, field, words", [
    ("{seed: [0, [1]], data: [a, b]}", "matrix.seed[1]", "a string, number or boolean"),
    ("{seed: [0, 0], data: [a, b]}", "matrix.seed[1]", "listed twice"),
    ("{seed: [], data: [a, b]}", "matrix.seed", "at least one value"),
    ("{seed: [0, 1, 2], data: [a, 'b c']}", "matrix.data[1]", "letters, digits"),
    ("{seed: 3, data: [a, b]}", "matrix.seed", "valid list"),
])
def test_bad_matrix_values(tmp_path, src, matrix, field, words):
    path = _write(tmp_path, _body(src), matrix=matrix)
    problems = _problems(path)
    assert any(f"{path}: {field}:" in p and words in p for p in problems), problems


def test_matrix_comes_with_include_and_the_including_file_wins(tmp_path, src):
    _write(tmp_path, _body(src), name="base.yaml")
    top = tmp_path / "top.yaml"
    top.write_text(f"name: top\ninclude: [base.yaml]\nstorage: {{root: {tmp_path}/root}}\nmatrix: {{seed: [7]}}\n")
    cfg = load_config(top)
    assert sorted(n for n in cfg.nodes if n.startswith("pick[")) == ["pick[data=a,seed=7]", "pick[data=b,seed=7]"]


def test_plan_shows_the_expanded_dag(tmp_path, src):
    path = _write(tmp_path, _body(src))
    res = CliRunner().invoke(app, ["plan", str(path), "--json"])
    assert res.exit_code == 0, res.output
    import json

    names = [e["name"] for e in json.loads(res.output)]
    assert "again[data=b,seed=2]" in names and len(names) == 3 + 6 + 6


def test_ablation_config_plans(monkeypatch):
    """configs/ablation.yaml: 3 seeds x 3 training sets, one compare over all nine evaluations."""
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "ablation.yaml")
    students = [n for n in cfg.nodes if n.startswith("student[")]
    evals = [n for n in cfg.nodes if n.startswith("evaluate_student[")]
    assert len(students) == 9 and len(evals) == 9
    assert cfg.nodes["student[data=unverified,seed=2]"].inputs["data"] == ("unverified", "data")
    assert cfg.nodes["student[data=answer_only,seed=1]"].inputs["model"] == ("student_init_seed[seed=1]", "model")
    assert sorted(up for up, _ in cfg.nodes["ablation"].inputs.values()) == sorted(evals)
    assert cfg.nodes["unverified"].inputs == {"data": ("decontaminate_unverified", "clean"),
                                              "like": ("decontaminate", "clean")}
    assert cfg.nodes["dedupe_unverified"].stage.params.require_verdict is None
    entries = {e.name: e for e in Runner(cfg).plan()}
    # seed 0's student init is the demo's: the same stage to the cache
    assert entries["student_init_seed[seed=0]"].fingerprint == entries["student_init"].fingerprint


def test_demo_seeds_config_is_the_demo_at_seed_0():
    """configs/demo-seeds.yaml: one chain per seed, and seed 0's chain is the demo's own (the same
    fingerprints, so it comes from cache after `make demo`): a param of the demo changed without
    its twin here fails this."""
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo-seeds.yaml")
    entries = {e.name: e for e in Runner(cfg).plan()}
    twins = {"teacher_init": "teacher_init_seeds", "teacher_sft": "teacher_seeds", "generate": "generate_seeds",
             "verify": "verify_seeds", "dedupe": "dedupe_seeds", "decontaminate": "decontaminate_seeds",
             "student_init": "student_init_seeds", "student_sft": "student_seeds"}
    for demo, seeds in twins.items():
        assert entries[f"{seeds}[seed=0]"].fingerprint == entries[demo].fingerprint, demo
        fps = {entries[f"{seeds}[seed={s}]"].fingerprint for s in (0, 1, 2)}
        assert len(fps) == 3, seeds  # each seed its own chain
    for role in ("teacher_seeds", "student_seeds", "teacher_init_seeds", "student_init_seeds"):
        assert [cfg.nodes[f"{role}[seed={s}]"].stage.params.seed for s in (0, 1, 2)] == [0, 1, 2]
    # evaluate differs from the demo's only by its promotion pointer (none across seeds)
    ev = {s: cfg.nodes[f"evaluate_seeds[seed={s}]"].stage.params for s in (0, 1, 2)}
    assert all(p.promote is None for p in ev.values())
    assert ev[0].model_dump(exclude={"promote"}) == cfg.nodes["evaluate"].stage.params.model_dump(exclude={"promote"})
    for name in ("seeds", "seeds_teacher"):
        assert sorted(up for up, _ in cfg.nodes[name].inputs.values()) == [f"evaluate_seeds[seed={s}]"
                                                                           for s in (0, 1, 2)]
    assert cfg.nodes["seeds"].stage.params.ratio_to == "teacher"


def test_unknown_kind_of_an_expanded_stage_is_reported_once(tmp_path, src):
    path = _write(tmp_path, _body(src, "  x: {uses: nosuchkind, matrix: [seed, data]}\n"))
    problems = [p for p in _problems(path) if "nosuchkind" in p]
    assert len(problems) == 1 and problems[0].startswith(f"{path}: stages.x.uses: unknown stage kind"), problems


def test_plan_text_shows_variant_names_not_markup(tmp_path, src, monkeypatch):
    from pipeline.cli.main import out

    monkeypatch.setattr(out, "width", 250)
    path = _write(tmp_path, _body(src))
    with out.capture() as cap:
        res = CliRunner().invoke(app, ["plan", str(path)])
    assert res.exit_code == 0, res.output
    text = cap.get()
    # rich would read "[data=b,seed=2]" as a style tag and drop it
    assert "pick[data=b,seed=2]" in text and "data<-pick[data=b,seed=2].data" in text, text


def test_config_errors_of_variants_print_their_names(tmp_path, src):
    path = _write(tmp_path, _body(src, "  x: {uses: subsample, matrix: [data], inputs: {data: \"{data}.nope\"}}\n"))
    res = CliRunner().invoke(app, ["plan", str(path)], env={"COLUMNS": "400"})
    assert res.exit_code == 2
    assert "stages.x[data=a].inputs.data: stage 'a' has no output 'nope'" in res.output.replace("\n", ""), res.output
