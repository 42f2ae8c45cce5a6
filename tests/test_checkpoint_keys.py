"""Generation checkpoints are keyed by what determines a sample (teacher files, chat template,
output-changing sampling settings, GENERATION_FORMAT), not by module sources, error budgets or
resources: a comment edited in the engine module plus a raised max_error_rate reuses every
committed chunk and generates nothing; a new temperature or teacher regenerates."""
import shutil

import pytest
from conftest import generate_config, write_jsonl

import pipeline.core.stage
from pipeline.core.config import load_config
from pipeline.core.runner import Runner
from pipeline.store import layout
from pipeline.store.storage import Storage

# no max_num_seqs (not part of any key, and nothing here depends on it): the same engine as the
# other tiny-model tests', kept across tests (each engine start costs ~30 s)
ENGINE = "{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 2}"
N = 2


def _cfg(tmp_path, src, model, sampling="{n: 2, max_tokens: 12, ignore_eos: true, seed: 7}", engine=ENGINE,
         max_error_rate=0.25):
    path = generate_config(tmp_path, "ckpt", src, model, sampling, engine)
    # max_error_rate sits beside sampling and engine in generate's params
    path.write_text(path.read_text().replace(f"engine: {engine}}}", f"engine: {engine}, max_error_rate: {max_error_rate}}}"))
    return path


def _key(cfg_path, **overrides) -> str:
    sets = [f"stages.generate.params.{k}={v}" for k, v in overrides.items()]
    (gen,) = [e for e in Runner(load_config(cfg_path, sets)).plan() if e.name == "generate"]
    return gen.checkpoint_key


def _parts(st: Storage) -> set[str]:
    return {m.rsplit("/", 2)[-2] for m in st.fs.glob(layout.checkpoint_manifest_glob(st))}


def _edit_comment_in(module_name: str, monkeypatch) -> None:
    """As if a comment had been edited in ``module_name``: the source every code hash reads."""
    real = pipeline.core.stage._source
    monkeypatch.setattr(pipeline.core.stage, "_source",
                        lambda m: real(m) + ("\n# an edited comment\n" if m.__name__ == module_name else ""))


@pytest.mark.engine
def test_engine_comment_edit_and_raised_error_budget_reuse_every_chunk(ray_local, tiny_model, tmp_path, monkeypatch):
    long = "Compute " + " + ".join(["1"] * 300) + "."
    rows = [{"prompt": f"Compute {i} + 3.", "answer": str(i + 3)} for i in range(4)]
    rows += [{"prompt": f"{long} #{i}", "answer": "300"} for i in range(2)]  # too long for the context: errored rows
    src = write_jsonl(tmp_path / "src.jsonl", rows)
    cfg = _cfg(tmp_path, src, tiny_model)
    st = Storage(str(tmp_path / "root"))

    first = Runner(load_config(cfg)).run()
    assert not first.ok and "4/12 samples errored" in first.stage_errors["generate"]
    parts = _parts(st)
    assert parts, "the failed attempt committed its chunks"
    committed = {}
    for m in st.fs.glob(layout.checkpoint_manifest_glob(st)):
        for r in st.read_dataset(m.rsplit("/", 1)[0]).to_pylist():
            committed[(r["prompt_id"], r["sample_index"])] = r["completion"]
    assert len(committed) == len(rows) * N

    # the fix a user makes: raise the error budget; meanwhile the project's engine module changed a comment
    from stages.generate import Generate
    from stages.hard_prompts import HardPrompts

    before = (HardPrompts.code_version(), Generate.code_version(), _key(cfg))
    _edit_comment_in("stages.common.engine", monkeypatch)
    assert HardPrompts.code_version() != before[0]  # the edit is seen by code-hashing stages
    assert Generate.code_version() == before[1]  # generate is keyed by its explicit version
    cfg = _cfg(tmp_path, src, tiny_model, max_error_rate=0.75)
    assert _key(cfg) == before[2]

    second = Runner(load_config(cfg)).run()
    assert second.ok, second.error
    gen = {s["name"]: s for s in second.manifest["stages"]}["generate"]
    assert gen["status"] == "done"
    assert gen["metrics"]["generated_tokens_this_attempt"] == 0
    assert gen["metrics"]["resumed_prompts"] == len(rows)
    assert "engine_startup_seconds" not in gen["metrics"]  # no engine was even asked for
    assert _parts(st) == parts  # no chunk was generated again
    out = st.read_dataset(st.strip(gen["output"]["samples"])).to_pylist()
    assert {(r["prompt_id"], r["sample_index"]): r["completion"] for r in out} == committed
    assert gen["dropped"] == {"errored": {"prompt_too_long": 4}}

    # a new temperature regenerates: other key, nothing committed under it, every prompt generated
    hot = _key(cfg, **{"sampling.temperature": 0.5})
    assert hot != before[2] and st.ls(layout.checkpoint_root(st, "generate", hot)) == []
    third = Runner(load_config(cfg, ["stages.generate.params.sampling.temperature=0.5"])).run()
    assert third.ok, third.error
    gen3 = {s["name"]: s for s in third.manifest["stages"]}["generate"]
    assert gen3["metrics"]["resumed_prompts"] == 0
    assert gen3["metrics"]["generated_tokens_this_attempt"] == 4 * N * 12


def test_checkpoint_key_depends_on_what_determines_a_sample(tiny_model, tmp_path):
    src = write_jsonl(tmp_path / "src.jsonl", [{"prompt": "Compute 1 + 1.", "answer": "2"}])
    cfg = _cfg(tmp_path, src, tiny_model)
    base = _key(cfg)
    # not: error budgets, resources, chunking, adaptive stopping rules
    same = {"max_error_rate": 0.9, "engine.replicas": 3, "engine.batch_size": 64, "engine.num_cpus": 2,
            "engine.kv_cache_gb": 1, "engine.chunks_in_flight": 2, "sampling.target_correct": 3,
            "sampling.give_up_after": 4, "sampling.max_tokens_per_prompt": 100}
    for k, v in same.items():
        assert _key(cfg, **{k: v}) == base, k
    # yes: sampling that changes a sample, the prompt rendering, output-changing engine settings
    other = {"sampling.temperature": 0.5, "sampling.top_p": 0.9, "sampling.max_tokens": 13, "sampling.seed": 8,
             "sampling.n": 3, "sampling.strategy": "adaptive", "chat_template": "'{{ messages }}'",
             "system_prompt": "Be brief.", "engine.max_model_len": 100, "engine.dtype": "float32",
             "engine.options": "{quantization: fp8}"}
    keys = {k: _key(cfg, **{k: v}) for k, v in other.items()}
    assert base not in keys.values() and len(set(keys.values())) == len(other), keys

    # another teacher: the same files, one weight byte changed; or another tokenizer
    teacher = tmp_path / "teacher2"
    shutil.copytree(tiny_model, teacher)
    assert _key(_cfg(tmp_path, src, str(teacher))) == base  # a copy is the same teacher
    weights = teacher / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert _key(_cfg(tmp_path, src, str(teacher))) != base
    shutil.rmtree(teacher)
    shutil.copytree(tiny_model, teacher)
    tok = teacher / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"<|end|>"', '"<|stop|>"', 1))
    assert _key(_cfg(tmp_path, src, str(teacher))) != base
    # the format version, bumped by hand
    import stages.common.engine as engine

    old = engine.GENERATION_FORMAT
    try:
        import stages.generate as gen

        gen.GENERATION_FORMAT = old + "x"
        assert _key(cfg) != base
    finally:
        gen.GENERATION_FORMAT = old


def test_engine_options_key_generate_and_resources_do_not(tiny_model, tmp_path):
    """The generate checkpoint key is derived from the params markers: ``EngineSpec.options``
    (free-form vLLM options such as a quantization method, which change every sample) is in it,
    as a new unmarked field would be; replicas and batch sizes are marked out. The stage key
    follows the same markers."""
    src = write_jsonl(tmp_path / "src.jsonl", [{"prompt": "Compute 1 + 1.", "answer": "2"}])
    cfg = _cfg(tmp_path, src, tiny_model)

    def keys(**overrides):
        sets = [f"stages.generate.params.{k}={v}" for k, v in overrides.items()]
        (gen,) = [e for e in Runner(load_config(cfg, sets)).plan() if e.name == "generate"]
        return gen.checkpoint_key, gen.fingerprint

    base = keys()
    quant = keys(**{"engine.options": "{quantization: fp8}"})
    other = keys(**{"engine.options": "{quantization: awq}"})
    assert quant[0] != base[0] and other[0] not in (base[0], quant[0])
    assert quant[1] != base[1]  # and the stage's own key
    for k, v in {"engine.replicas": 4, "engine.batch_size": 7}.items():
        assert keys(**{k: v}) == base, k
    assert keys(**{"engine.replicas": 4, "engine.options": "{quantization: fp8}"}) == quant

    from pipeline.core.stage import fingerprint_params, sample_params
    from stages.common.engine import STOPPING_ONLY, EngineSpec, SamplingSpec

    # derived, not hand-listed: every engine field not marked NOT_OUTPUT keys a sample
    assert set(sample_params(EngineSpec())) == {"max_model_len", "dtype", "options"}
    assert set(fingerprint_params(SamplingSpec())) - set(sample_params(SamplingSpec())) == STOPPING_ONLY
    assert STOPPING_ONLY == {"target_correct", "max_tokens_per_prompt", "give_up_after"}
