"""Three nightly runs of one schedule over a prompt file (prompts -> generate on vLLM): the first
generates everything; the second, over the unchanged file, generates nothing, starts no engine and
says so; the third generates exactly the added prompts' samples, publishes a version whose
manifest links the previous one, and ``distill datasets diff`` shows the added prompts."""
import json

import pytest
from conftest import generate_config, write_jsonl
from typer.testing import CliRunner

import stages.generate as generate_module
from pipeline.cli.main import app
from pipeline.core.ids import prompt_id
from pipeline.ops.schedule import Schedule, add_schedule, execute_in_process, run_slot
from pipeline.store.storage import Storage

N = 2


def _checkpoint_rows(st: Storage) -> list[dict]:
    rows = []
    for m in st.fs.glob(st.path("cache/generate/*/checkpoints/*/_manifest.json")):
        rows += st.read_dataset(m.rsplit("/", 1)[0], columns=["prompt_id", "sample_index"]).to_pylist()
    return rows


@pytest.mark.engine
def test_three_nightly_runs(ray_local, tiny_model, tmp_path, monkeypatch):
    rows = [{"prompt": f"Compute {i} + 4.", "answer": str(i + 4)} for i in range(6)]
    added = [{"prompt": f"Compute {i} - 2.", "answer": str(i - 2)} for i in range(10, 13)]
    src = write_jsonl(tmp_path / "src.jsonl", rows)
    cfg = generate_config(tmp_path, "nightly", src, tiny_model, f"{{n: {N}, max_tokens: 12, ignore_eos: true, seed: 4}}",
                          "{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 4}")
    st = Storage(str(tmp_path / "root"))
    sched = add_schedule(st, Schedule("nightly", "0 3 * * *", str(cfg)))

    engine_starts = []
    real_open = generate_module.open_engines

    def counting_open_engines(*a, **kw):  # a spy: the real engines, counted
        engine_starts.append(1)
        return real_open(*a, **kw)

    monkeypatch.setattr(generate_module, "open_engines", counting_open_engines)

    def nightly() -> dict:
        event = run_slot(st, sched, None, "run-now", execute=execute_in_process)
        assert event["event"] == "end" and event["status"] == "done", event
        return event

    first = nightly()
    assert first["ran"] == ["prompts", "generate"] and len(engine_starts) == 1
    assert len(_checkpoint_rows(st)) == 6 * N

    second = nightly()  # the source did not change
    assert second["ran"] == [] and second["engines_started"] == 0 and len(engine_starts) == 1
    assert second["summary"].startswith("nothing new")
    assert len(_checkpoint_rows(st)) == 6 * N  # zero samples generated
    assert second["datasets"] == first["datasets"]
    res = CliRunner().invoke(app, ["run", str(cfg)])  # by hand, `distill run` says so too
    assert res.exit_code == 0 and "nothing new" in res.stdout, res.output
    assert len(engine_starts) == 1

    before = {(r["prompt_id"], r["sample_index"]) for r in _checkpoint_rows(st)}
    write_jsonl(src, rows + added)
    third = nightly()
    assert third["ran"] == ["prompts", "generate"] and len(engine_starts) == 2
    new = [(r["prompt_id"], r["sample_index"]) for r in _checkpoint_rows(st)
           if (r["prompt_id"], r["sample_index"]) not in before]
    added_ids = sorted(prompt_id(r["prompt"]) for r in added)
    assert len(new) == len(set(new)) == len(added) * N  # exactly the added prompts' samples
    assert sorted({pid for pid, _ in new}) == added_ids

    old_uri, new_uri = first["datasets"]["generate.samples"], third["datasets"]["generate.samples"]
    lineage = st.read_json(st.strip(new_uri) + "/_manifest.json")["lineage"]
    assert lineage["previous"]["uri"] == old_uri  # the new version links the one it replaces
    assert "previous" not in st.read_json(st.strip(old_uri) + "/_manifest.json")["lineage"]

    res = CliRunner().invoke(app, ["datasets", "diff", old_uri, new_uri, "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["prompts"]["added"] == added_ids and d["prompts"]["removed"] == []
    assert d["rows"] == {"a": 6 * N, "b": 9 * N, "delta": 3 * N}
    res = CliRunner().invoke(app, ["datasets", "diff", old_uri, new_uri])
    assert f"{len(added)} added, 0 removed" in res.stdout
