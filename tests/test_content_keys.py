"""Cache keys follow content (early cutoff): a stage is keyed by its own definition and the
content digests of its inputs, read from their manifests. A comment edited in a module verify
imports re-runs verify, which writes the same rows, and leaves everything downstream cached; a
real change of verify's behaviour re-runs everything downstream, and ``plan`` names the cause."""
from __future__ import annotations

import json
import uuid
from typing import ClassVar

import pyarrow as pa
import pytest
from conftest import write_jsonl
from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

import pipeline.core.stage
from pipeline.cli.main import app
from pipeline.core.config import load_config
from pipeline.core.ids import dataset_digest, row_hash_sum
from pipeline.core.runner import Runner
from pipeline.core.stage import Stage, StageContext
from pipeline.store import layout
from pipeline.store.storage import Storage

SAMPLES = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()), ("answer", pa.string()),
                     ("completion", pa.string()), ("source", pa.string())])


class _RowsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    random_rows: bool = False


class SamplesDouble(Stage):
    """A test double of a generation stage: the rows of a JSONL file as ``samples``; with
    ``random_rows`` it adds a row that differs on every run and says it is not deterministic."""

    kind: ClassVar[str] = "samples_double"
    Params = _RowsParams
    outputs: ClassVar[dict] = {"samples": "dataset"}
    output_columns: ClassVar[dict] = {"samples": SAMPLES}

    def external_fingerprint(self) -> dict:
        with open(self.params.path) as f:
            return {"rows": f.read()}

    def deterministic(self) -> bool:
        return not self.params.random_rows

    def run(self, ctx: StageContext) -> None:
        with open(self.params.path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if self.params.random_rows:
            rows.append({"prompt_id": uuid.uuid4().hex, "prompt": "?", "answer": "0", "completion": "x",
                         "source": "random"})
        ctx.write_dataset("samples", [pa.Table.from_pylist(rows, schema=SAMPLES)])


def _rows() -> list[dict]:
    rows = []
    for i in range(24):
        a, b = i, 2 * i + 1
        good = f"<think>\n{a} + {b} = {a + b}\n</think>\nThe answer is \\boxed{{{a + b}}}."
        rows.append({"prompt_id": f"p{i:02d}", "prompt": f"What is {a} plus {b}, prompt number {i}?",
                     "answer": str(a + b), "source": "toy",
                     # a third without <think>: their verdict follows format.require_think
                     "completion": good if i % 3 else f"The answer is \\boxed{{{a + b}}}.",
                     })
        rows.append({**rows[-1], "prompt_id": f"q{i:02d}", "prompt": f"What is {a} plus {b} again ({i})?",
                     "completion": f"<think>\nguess\n</think>\nThe answer is \\boxed{{{a + b + 1}}}."})
    return rows


def _config(tmp_path, random_rows: bool = False):
    src = write_jsonl(tmp_path / "samples.jsonl", _rows())
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "What is 100 plus 200 in the held-out set?",
                                                   "answer": "300"}])
    cfg = tmp_path / "content.yaml"
    cfg.write_text(f"""
name: content
storage: {{root: {tmp_path}/root}}
stages:
  samples: {{uses: "test_content_keys:SamplesDouble", params: {{path: {src}, random_rows: {str(random_rows).lower()}}}}}
  heldout: {{uses: prompts, params: {{path: {evals}}}}}
  verify: {{inputs: {{samples: samples.samples}}, params: {{actors: 1, workers: 1}}}}
  dedupe: {{inputs: {{samples: verify.verified}}, params: {{max_per_prompt: 1}}}}
  decontaminate: {{inputs: {{samples: dedupe.sft, eval: heldout.prompts}}, params: {{ngram: 4}}}}
  answer_only: {{inputs: {{data: decontaminate.clean}}}}
""")
    return cfg


def _run(cfg, sets=()):
    result = Runner(load_config(cfg, list(sets))).run()
    assert result.ok, result.error
    return {s["name"]: s for s in result.manifest["stages"]}


def _edit_comments_in(names: set[str], monkeypatch) -> None:
    """As if a comment line had been added to each module in ``names``: the source code hashes read."""
    real = pipeline.core.stage._source
    monkeypatch.setattr(pipeline.core.stage, "_source",
                        lambda m: real(m) + ("\n# an added comment\n" if m.__name__ in names else ""))


def _shard_bytes(st: Storage, uri: str) -> list[bytes]:
    path = st.strip(uri)
    return [st.fs.cat_file(f"{path}/{s['path']}") for s in st.dataset_manifest(path)["shards"]]


DOWNSTREAM = ("dedupe", "decontaminate", "answer_only")


def test_comment_edit_reruns_verify_only(ray_local, tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    first = _run(cfg)
    assert {s["status"] for s in first.values()} == {"done"}
    assert first["dedupe"]["rows"]["sft"] > 0 and first["answer_only"]["rows"]["data"] > 0
    st = Storage(str(tmp_path / "root"))

    from stages.verify import Verify

    before = Verify.code_version()
    _edit_comments_in({"stages.common.sandbox", "stages.common.checkers"}, monkeypatch)
    assert Verify.code_version() != before  # verify imports both: its code hash sees the edit

    plan = {e.name: e for e in Runner(load_config(cfg)).plan(explain=True)}
    assert not plan["verify"].cached and plan["verify"].reason.startswith("code: version 1:")
    for name in DOWNSTREAM:  # not known before verify has run: provisional, and plan says on what
        assert plan[name].provisional and not plan[name].cached
    assert "cached if verify writes the same rows" in plan["dedupe"].reason

    second = _run(cfg)
    assert second["samples"]["status"] == second["heldout"]["status"] == "cached"
    assert second["verify"]["status"] == "done" and second["verify"]["reason"].startswith("code:")
    assert second["verify"]["fingerprint"] != first["verify"]["fingerprint"]
    for name in DOWNSTREAM:  # early cutoff: verify wrote the same rows
        assert second[name]["status"] == "cached", (name, second[name].get("reason"))
        assert second[name]["fingerprint"] == first[name]["fingerprint"]
        assert second[name]["output"] == first[name]["output"]
    old, new = first["verify"]["output"]["verified"], second["verify"]["output"]["verified"]
    assert old != new  # a new attempt wrote it ...
    assert _shard_bytes(st, new) == _shard_bytes(st, old)  # ... byte for byte the same
    assert dataset_digest(st.dataset_manifest(st.strip(new))) == dataset_digest(st.dataset_manifest(st.strip(old)))

    # and now nothing changes at all: every stage is cached, its key known at plan time
    assert all(e.cached and not e.provisional for e in Runner(load_config(cfg)).plan())


def test_real_change_cascades_and_plan_names_the_cause(ray_local, tmp_path):
    cfg = _config(tmp_path)
    first = _run(cfg)
    change = ["stages.verify.params.format.require_think=false"]  # rows without <think> become correct

    out = CliRunner().invoke(app, ["plan", str(cfg), "--json", "--set", change[0]])
    assert out.exit_code == 0, out.output
    plan = {e["name"]: e for e in json.loads(out.output)}
    assert plan["samples"]["action"] == plan["heldout"]["action"] == "cached"
    assert plan["verify"]["action"] == "run" and plan["verify"]["reason"] == "param: format.require_think"
    for name in DOWNSTREAM:
        assert plan[name]["action"] == "run" and plan[name]["provisional"]
        assert plan[name]["reason"].startswith("input digest: ")
    text = CliRunner().invoke(app, ["plan", str(cfg), "--set", change[0]])
    assert text.exit_code == 0 and "param: format.require_think" in text.output

    second = _run(cfg, change)
    for name in ("verify", *DOWNSTREAM):
        assert second[name]["status"] == "done", name
        assert second[name]["fingerprint"] != first[name]["fingerprint"]
    assert second["verify"]["reason"] == "param: format.require_think"
    assert second["dedupe"]["reason"] == "input digest: samples <- verify.verified"
    assert second["decontaminate"]["reason"] == "input digest: samples <- dedupe.sft"
    st = Storage(str(tmp_path / "root"))
    digest = lambda r, out: dataset_digest(st.dataset_manifest(st.strip(r["output"][out])))  # noqa: E731
    assert digest(second["dedupe"], "sft") != digest(first["dedupe"], "sft")  # the change reached the data

    # back to the first setting: every stage's first version is still committed, so all are cached
    third = _run(cfg)
    assert {s["status"] for s in third.values()} == {"cached"}
    assert {n: s["fingerprint"] for n, s in third.items()} == {n: s["fingerprint"] for n, s in first.items()}


def test_a_stage_that_is_not_deterministic_keys_downstream_by_its_fingerprint(ray_local, tmp_path):
    cfg = _config(tmp_path, random_rows=True)
    plan = {e.name: e for e in Runner(load_config(cfg)).plan()}
    assert not plan["verify"].provisional  # keyed by the fingerprint, known before samples ran
    assert plan["verify"].identity["inputs"] == {"samples": "fp:" + plan["samples"].fingerprint}
    first = _run(cfg)
    st = Storage(str(tmp_path / "root"))
    record = st.read_json(layout.stage_record(st, "samples_double", first["samples"]["fingerprint"]))
    assert record["deterministic"] is False
    assert first["verify"]["fingerprint"] == plan["verify"].fingerprint


def test_row_digest_ignores_shards_and_order_but_not_content():
    msgs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(10)]
    t = pa.table({"a": list(range(10)), "b": [f"r{i}" for i in range(10)], "m": msgs,
                  "x": [None if i % 4 == 0 else i / 3 for i in range(10)]})
    whole = int(row_hash_sum(t), 16)
    parts = sum(int(row_hash_sum(t.slice(i, 3)), 16) for i in range(0, 10, 3)) % (1 << 64)
    assert parts == whole
    assert row_hash_sum(t.take(list(reversed(range(10))))) == row_hash_sum(t)
    changed = t.set_column(1, "b", pa.array([f"r{i}" for i in range(9)] + ["R9"]))
    assert row_hash_sum(changed) != row_hash_sum(t)
    swapped = [list(reversed(m)) if i == 3 else m for i, m in enumerate(msgs)]  # the turns of one row swapped
    assert row_hash_sum(t.set_column(2, "m", pa.array(swapped, t.schema.field("m").type))) != row_hash_sum(t)
    moved = t.set_column(1, "b", pa.array(["r1", "r0"] + [f"r{i}" for i in range(2, 10)]))  # values moved between rows
    assert row_hash_sum(moved) != row_hash_sum(t)
    nulled = t.set_column(3, "x", pa.array([None] * 10, pa.float64()))
    assert row_hash_sum(nulled) != row_hash_sum(t)
    doubled = pa.concat_tables([t, t.slice(0, 1)])  # a duplicated row counts
    assert row_hash_sum(doubled) != row_hash_sum(t)


@pytest.mark.parametrize("rows_per_shard", [3, 1000])
def test_dataset_digest_from_the_manifest_is_the_same_for_any_shard_cut(tmp_path, rows_per_shard):
    st = Storage(str(tmp_path))
    t = pa.table({"a": list(range(10)), "b": [f"r{i}" for i in range(10)]})
    w = st.dataset_writer(st.path("one"), rows_per_shard=1000)
    w.write(t)
    one = w.commit()
    w = st.dataset_writer(st.path("other"), rows_per_shard=rows_per_shard)
    for i in reversed(range(0, 10, 2)):
        w.write(t.slice(i, 2))
    other = w.commit()
    assert all(s["content"] for s in other["shards"])
    assert dataset_digest(one) == dataset_digest(other)
    w = st.dataset_writer(st.path("third"))
    w.write(t.slice(0, 9))
    assert dataset_digest(w.commit()) != dataset_digest(one)


def test_plan_says_a_store_from_before_content_keys_reruns_once(tmp_path):
    cfg = _config(tmp_path)
    runner = Runner(load_config(cfg))
    entry = {e.name: e for e in runner.plan()}["samples"]
    st = runner.storage
    # what a store written before this change holds: a record without key parts, at an old fingerprint
    old_fp = "0123456789abcdef0123"
    st.write_json(layout.stage_record(st, entry.kind, old_fp),
                  {"name": "samples", "kind": entry.kind, "fingerprint": old_fp, "run_id": "r0", "attempt": "a",
                   "outputs": {}})
    st.write_json(layout.latest_pointer(st, "content", "samples", "samples"),
                  {"uri": "x", "fingerprint": old_fp, "run_id": "r0", "produced_by_run": "r0"})
    (entry,) = [e for e in runner.plan(explain=True) if e.name == "samples"]
    assert entry.reason.startswith("key format: 'samples' was committed (0123456789abcdef0123) before cache keys")
    assert "runs once" in entry.reason
