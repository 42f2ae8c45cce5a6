"""Stage contracts: declared columns checked before Ray starts, outputs written through their
declared schema, and one protocol (ctx.drop) for rows a stage does not pass on."""
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pytest
from conftest import write_jsonl
from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.core.config import ConfigError, load_config
from pipeline.core.stage import Artifact, Stage, StageContext, StageError, column_problems, type_matches
from pipeline.store.storage import Storage


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NeedsIntScore(Stage):
    """A reader declaring an int column."""

    kind: ClassVar[str] = "needs_int_score"
    Params = _NoParams
    inputs: ClassVar[dict] = {"rows": "dataset"}
    outputs: ClassVar[dict] = {"out": "dataset"}
    input_columns: ClassVar[dict] = {"rows": {"prompt_id": "string", "score": "int"}}


class Undeclared(Stage):
    """A writer declaring nothing: its output is not checked."""

    kind: ClassVar[str] = "undeclared"
    Params = _NoParams
    inputs: ClassVar[dict] = {"rows": "dataset"}
    outputs: ClassVar[dict] = {"out": "dataset"}


class Writes(Stage):
    kind: ClassVar[str] = "writes"
    Params = _NoParams
    outputs: ClassVar[dict] = {"out": "dataset"}
    output_columns: ClassVar[dict] = {"out": pa.schema([("prompt_id", pa.string()), ("score", pa.int64())])}


def _cfg(tmp_path: Path, stages: str) -> Path:
    src = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "1+1?", "answer": "2"}])
    p = tmp_path / "p.yaml"
    p.write_text(f"name: contracts\nstorage: {{root: {tmp_path}/root}}\nstages:\n"
                 f"  prompts: {{params: {{path: {src}}}}}\n{stages}")
    return p


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if anything starts or joins Ray (or the runner gets as far as asking for it)."""
    import ray

    from pipeline.core.runner import Runner

    calls = []

    def refuse(*a, **k):
        calls.append(a)
        pytest.fail("Ray was started")

    was_up = ray.is_initialized()  # another test of the session may have started one
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(Runner, "_ensure_ray", refuse)
    yield calls
    assert calls == [] and ray.is_initialized() == was_up


def test_plan_and_run_name_stage_input_and_missing_column_before_ray(tmp_path, no_ray):
    # prompts rows have no completion column: dedupe (completion_field: completion) cannot read them
    cfg = _cfg(tmp_path, "  dedupe: {inputs: {samples: prompts.prompts}, params: {require_verdict: null}}\n")
    for cmd in ("plan", "run"):
        result = CliRunner().invoke(app, [cmd, str(cfg)])
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert "p.yaml: stages.dedupe.inputs.samples: prompts.prompts: no column 'completion'" in text
        assert "stage 'dedupe'" in text
        assert "has: prompt_id, prompt, answer, source, metadata" in text
    assert not (tmp_path / "root").exists()  # nothing ran, nothing was written


def test_mistyped_column_and_columns_through_passthrough(tmp_path, no_ray):
    cfg = _cfg(tmp_path, f"""  scores:
    uses: {__name__}:NeedsIntScore
    inputs: {{rows: prompts.prompts}}
""")
    (line,) = _problems(cfg)
    assert "stages.scores.inputs.rows: prompts.prompts: no column 'score' (needs int" in line

    cfg = _cfg(tmp_path, f"""  writer: {{uses: {__name__}:Writes}}
  reader: {{uses: {__name__}:NeedsIntScore, inputs: {{rows: writer.out}}}}
""")
    load_config(cfg)  # int64 is an int

    # decontaminate passes its input's columns on: dedupe behind it still sees prompts' columns
    cfg = _cfg(tmp_path, """  decontaminate:
    inputs: {samples: prompts.prompts, eval: prompts.prompts}
  dedupe: {inputs: {samples: decontaminate.clean}, params: {require_verdict: correct}}
""")
    text = "\n".join(_problems(cfg))
    assert "stages.dedupe.inputs.samples: decontaminate.clean: no column 'completion'" in text
    assert "decontaminate.clean: no column 'verdict'" in text


def test_a_wrong_type_is_named(tmp_path, no_ray):
    class StringScore(Writes):
        output_columns: ClassVar[dict] = {"out": pa.schema([("prompt_id", pa.string()), ("score", pa.string())])}

    import sys

    sys.modules[__name__].StringScore = StringScore  # importable by `uses:`
    cfg = _cfg(tmp_path, f"""  writer: {{uses: {__name__}:StringScore}}
  reader: {{uses: {__name__}:NeedsIntScore, inputs: {{rows: writer.out}}}}
""")
    (line,) = _problems(cfg)
    assert "stages.reader.inputs.rows: writer.out: column 'score' is string, needs int" in line


def test_undeclared_outputs_are_not_checked(tmp_path, no_ray):
    cfg = _cfg(tmp_path, f"""  anything: {{uses: {__name__}:Undeclared, inputs: {{rows: prompts.prompts}}}}
  reader: {{uses: {__name__}:NeedsIntScore, inputs: {{rows: anything.out}}}}
""")
    assert set(load_config(cfg).nodes) == {"prompts", "anything", "reader"}


def test_shipped_wirings_pass_their_contracts():
    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "demo.yaml")
    assert cfg.nodes["dedupe"].stage.needs()["samples"]["verdict"] == "string"


def test_type_families():
    msgs = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    assert type_matches("messages", msgs) and not type_matches("messages", pa.list_(pa.string()))
    assert type_matches("int", pa.int32()) and not type_matches("int", pa.float64())
    assert type_matches("number", pa.float32()) and type_matches("string", pa.large_string())
    assert column_problems({"messages|prompt": "any"}, {"prompt": pa.string()}) == []
    assert column_problems({"messages|prompt": "any"}, {"x": pa.string()}) == [
        "no column 'messages' or 'prompt' (needs any; has: x)"]


def _ctx(tmp_path, output_columns, inputs=None):
    st = Storage(str(tmp_path / "root"))
    return StageContext(name="w", kind="writes", fingerprint="f", run_id="r", storage=st, inputs=inputs or {},
                        output_root=st.path("out"), output_types={"out": "dataset"}, output_columns=output_columns)


def test_outputs_are_written_through_the_declared_schema(tmp_path):
    schema = Writes.output_columns["out"]
    ctx = _ctx(tmp_path, Writes.output_columns)
    # columns in another order and a narrower int type are conformed to the declaration
    ctx.write_dataset("out", [pa.table({"score": pa.array([1], pa.int32()), "prompt_id": ["a"]})])
    m = ctx.storage.dataset_manifest(ctx.written["out"].path)
    assert m["schema"] == {"prompt_id": "string", "score": "int64"}
    with pytest.raises(StageError, match=r"output 'out': declared column\(s\) \['score'\] missing"):
        _ctx(tmp_path / "b", Writes.output_columns).write_dataset("out", [pa.table({"prompt_id": ["a"]})])
    with pytest.raises(StageError, match=r"column\(s\) \['extra'\] are not declared"):
        _ctx(tmp_path / "c", Writes.output_columns).write_dataset(
            "out", [pa.table({"prompt_id": ["a"], "score": [1], "extra": [0]})])
    # a writer used directly is checked at commit
    ctx = _ctx(tmp_path / "d", Writes.output_columns)
    w = ctx.dataset_writer("out")
    w.write(pa.table({"prompt_id": ["a"], "score": ["x"]}))
    with pytest.raises(StageError, match="column 'score' is string, declared int64"):
        ctx.commit_dataset("out", w, schema)
    assert not ctx.storage.exists(f"{ctx.output_path('out')}/_manifest.json")  # nothing published


def test_drop_protocol_one_shape(tmp_path):
    ctx = _ctx(tmp_path, {})
    ctx.drop("quarantined", "bad json")
    ctx.drop_counts("quarantined", ["bad json", "empty prompt"])
    ctx.drop_counts("removed", {"duplicate": 2, "none": 0})
    with pytest.raises(ValueError, match="unknown drop kind 'lost'"):
        ctx.drop("lost", "x")
    ctx.write_dataset("out", [pa.table({"a": [1]})], stats={"input_rows": 6})
    stats = ctx.storage.dataset_manifest(ctx.written["out"].path)["stats"]
    assert stats == {"input_rows": 6, "dropped": {"quarantined": {"bad json": 2, "empty prompt": 1},
                                                  "removed": {"duplicate": 2}}}


def test_every_registered_stage_declares_its_dataset_columns():
    """Every registered stage kind (the ``distill.stages`` entry points, all of them, not a list
    kept here) declares the columns of each dataset it writes (a schema, or a passthrough of an
    input's columns), so the config check before Ray sees every wiring that reads it."""
    from pipeline.core import registry

    kinds = registry.kinds()
    assert len(kinds) >= 14 and {"evaluate", "sft", "hard_prompts", "compare", "concat"} <= set(kinds)
    undeclared = []
    for kind in sorted(kinds):
        cls = registry.load(kind)
        assert cls.kind == kind, f"entry point {kind} loads a stage of kind {cls.kind}"
        for out, typ in cls.outputs.items():
            if typ == "dataset" and out not in cls.output_columns and "produces" not in vars(cls):
                undeclared.append(f"{kind}.{out} (output)")
    assert undeclared == [], f"dataset columns not declared: {undeclared}"


def test_stage_records_written_before_dropped_still_read():
    from pipeline.core.runner import StageRecord

    old = {"name": "x", "kind": "x", "fingerprint": "f", "run_id": "r", "attempt": "a",
           "outputs": {"o": {"type": "dataset", "path": "/p", "uri": "/p"}}, "rows": {"o": 1},
           "metrics": {}, "seconds": 1.0, "created": "t", "future_field": 1}
    rec = StageRecord.from_json(old)  # written before `dropped`; unknown fields ignored
    assert rec.dropped == {} and rec.artifacts()["o"].path == "/p" and rec.output_uris() == {"o": "/p"}


def _problems(cfg) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    return e.value.problems


def test_inputs_mismatch_is_a_clear_runtime_error_too(tmp_path):
    """A stage reading an input declared by an upstream that lied is stopped at its commit."""
    st = Storage(str(tmp_path / "root"))
    src = st.path("in")
    w = st.dataset_writer(src)
    w.write(pa.table({"prompt_id": ["a"]}))
    w.commit()
    ctx = _ctx(tmp_path, {"out": Writes.output_columns["out"]},
               {"rows": Artifact("dataset", src, st.uri(src), "f0")})
    with pytest.raises(StageError, match="declared column"):
        ctx.write_dataset("out", [ctx.read_input("rows")])
