"""Hub models pinned by revision, resolved through a locally laid-out Hugging Face cache with
HF_HUB_OFFLINE=1 (no network): a cache hit, an offline miss, a pinned revision, a moved branch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core import resources
from pipeline.core.config import ConfigError, load_config
from pipeline.core.runner import Runner
from pipeline.sizing import hub
from tests.hub_cache import CONFIGS, fake_sha, lay_out

REPO = "Qwen/Qwen2.5-0.5B-Instruct"
CFG = CONFIGS[REPO]


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_tokenvalue_never_printed_123")
    return home


def _config(tmp_path: Path, model) -> Path:
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    model_yaml = json.dumps(model)  # a string or a {repo, revision} mapping, as YAML flow
    path = tmp_path / "hub.yaml"
    path.write_text(f"""
name: hub-test
storage: {{root: {tmp_path / 'root'}}}
stages:
  prompts: {{params: {{path: {src}}}}}
  generate:
    inputs: {{prompts: prompts.prompts}}
    params: {{model: {model_yaml}, sampling: {{max_tokens: 8}}}}
""")
    return path


def _generate_fp(cfg) -> str:
    return {e.name: e.fingerprint for e in Runner(cfg).plan()}["generate"]


def test_cache_hit_pins_the_branch_to_its_sha(tmp_path, hf_home):
    sha = lay_out(hf_home / "hub", REPO, {"config.json": CFG, "tokenizer_config.json": "{}"})
    cfg = load_config(_config(tmp_path, f"hf://{REPO}"))
    assert cfg.nodes["generate"].stage.params.model == f"hf://{REPO}@{sha}"
    assert resources.model_fingerprint(f"hf://{REPO}") == f"hf:{REPO}@{sha}"
    # the run manifest's record of it: asked for main, got the sha
    assert hub.run_models(cfg) == {"models": {"generate": {"model": {
        "uri": f"hf://{REPO}@{sha}", "repo": REPO, "revision": "main", "sha": sha}}}}
    # engines and trainers load the snapshot itself
    local = resources.localize_model(cfg.nodes["generate"].stage.params.model)
    assert Path(local) == hf_home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / sha
    assert json.loads((Path(local) / "config.json").read_text()) == CFG
    assert hub.config(f"hf://{REPO}") == CFG


def test_offline_miss_names_the_model_and_what_to_run(tmp_path, hf_home):
    with pytest.raises(ConfigError) as e:
        load_config(_config(tmp_path, "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-7B@main"))
    msg = str(e.value)
    assert "stages.generate.params.model" in msg and "hub.yaml" in msg
    assert "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "hf download deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --revision main" in msg
    assert "hf_tokenvalue_never_printed_123" not in msg


def test_a_pinned_revision_ignores_the_branch(tmp_path, hf_home):
    old = lay_out(hf_home / "hub", REPO, {"config.json": CFG}, sha=fake_sha("old"), branch=None)
    new = lay_out(hf_home / "hub", REPO, {"config.json": {**CFG, "rope_theta": 1.0}}, sha=fake_sha("new"))
    as_mapping = load_config(_config(tmp_path, {"repo": REPO, "revision": old}))
    as_uri = load_config(_config(tmp_path, f"hf://{REPO}@{old}"))
    assert as_mapping.nodes["generate"].stage.params.model == f"hf://{REPO}@{old}"
    assert _generate_fp(as_mapping) == _generate_fp(as_uri)
    unpinned = load_config(_config(tmp_path, {"repo": REPO}))  # no revision: main
    assert unpinned.nodes["generate"].stage.params.model == f"hf://{REPO}@{new}"
    assert _generate_fp(unpinned) != _generate_fp(as_uri)
    # a sha that is not in the cache is a miss, not the branch's snapshot
    with pytest.raises(ConfigError, match="not in the Hugging Face cache"):
        load_config(_config(tmp_path, f"hf://{REPO}@{fake_sha('absent')}"))


def test_a_moved_branch_changes_the_fingerprint(tmp_path, hf_home):
    first = lay_out(hf_home / "hub", REPO, {"config.json": CFG}, sha=fake_sha("v1"))
    before = load_config(_config(tmp_path, f"hf://{REPO}"))
    fp_before = _generate_fp(before)
    second = lay_out(hf_home / "hub", REPO, {"config.json": CFG}, sha=fake_sha("v2"))  # main moves
    after = load_config(_config(tmp_path, f"hf://{REPO}@main"))
    assert after.nodes["generate"].stage.params.model == f"hf://{REPO}@{second}" != f"hf://{REPO}@{first}"
    assert _generate_fp(after) != fp_before
    # the config loaded before the move still runs the snapshot it planned
    assert before.nodes["generate"].stage.params.model == f"hf://{REPO}@{first}"
    assert Path(resources.localize_model(before.nodes["generate"].stage.params.model)).name == first


@pytest.mark.parametrize("ref, problem", [
    ("hf://no-org", "must be ORG/NAME"),
    ("hf://Qwen/Qwen2.5-0.5B-Instruct@", "empty or blank revision"),
])
def test_a_malformed_reference_names_the_field(tmp_path, hf_home, ref, problem):
    with pytest.raises(ConfigError) as e:
        load_config(_config(tmp_path, ref))
    assert "stages.generate.params.model" in str(e.value) and problem in str(e.value)


def test_normalize_params_only_touches_model_mappings():
    raw = {"model": {"repo": "a/b", "revision": "v1"}, "engine": {"repo": "x"}, "teacher": {"repo": "c/d"}}
    assert hub.normalize_params(raw) == {"model": "hf://a/b@v1", "engine": {"repo": "x"}, "teacher": "hf://c/d"}


def test_a_trainer_loads_the_pinned_snapshot(tmp_path, hf_home, tiny_model):
    """What sft and the engines do with a hub reference: localize it, then load it like a folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sha = fake_sha("tiny")
    snap = hf_home / "hub" / "models--local--tiny" / "snapshots" / sha
    snap.mkdir(parents=True)
    for p in Path(tiny_model).iterdir():
        (snap / p.name).write_bytes(p.read_bytes())
    (hf_home / "hub" / "models--local--tiny" / "refs").mkdir()
    (hf_home / "hub" / "models--local--tiny" / "refs" / "main").write_text(sha)
    pinned = hub.pin("hf://local/tiny")
    local = resources.localize_model(pinned)
    model = AutoModelForCausalLM.from_pretrained(local)
    tok = AutoTokenizer.from_pretrained(local)
    assert model.config.num_hidden_layers == 2 and len(tok) == model.config.vocab_size
    assert Path(local).name == sha
