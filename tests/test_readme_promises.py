"""Promises the README makes that no other test exercised: a fully cached run and a config
error start no Ray (seen from outside, over the CLI process's whole tree), what does and does
not change a fingerprint, `--set` and `--address` through the CLI, relative paths resolved
against the working directory, and the `skipped` status of stages downstream of a failure."""
import json
import os
import subprocess
import sys

from conftest import REPO, ProcessWatch, generate_config, run_stages, write_jsonl
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.core.config import load_config
from pipeline.core.runner import Runner

RAY_PROCESSES = ("raylet", "gcs_server", "default_worker.py", "ray::")


def _cli(args: list[str], cwd, env_extra: dict | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`distill ARGS` in a child process of its own (not this session's Ray); returns the result
    and the command lines of every process of its tree seen while it ran."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watch = ProcessWatch(proc.pid, interval=0.05)
    out, _ = proc.communicate(timeout=300)
    watch.stop()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out), list(watch.seen.values())


def _small_pipeline(tmp_path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text(f"""
name: small
storage: {{root: {tmp_path}/root}}
stages:
  toy_task: {{params: {{seed: 0, train_size: 20, distill_size: 2, eval_size: 2}}}}
  rows:
    uses: dedupe
    inputs: {{samples: toy_task.train}}
    params: {{completion_field: solution, require_verdict: null}}
""")
    return cfg


def test_cached_run_and_config_error_start_no_ray(ray_local, tmp_path):
    cfg = _small_pipeline(tmp_path)
    run_stages(cfg)  # fills the cache (on this session's Ray)

    cached, procs = _cli(["run", str(cfg)], tmp_path)
    assert cached.returncode == 0, cached.stdout
    assert "nothing new: every stage was cached" in cached.stdout
    assert procs and not [c for c in procs if any(r in c for r in RAY_PROCESSES)], procs

    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg.read_text().replace("seed: 0,", "sede: 0,"))
    failed, procs = _cli(["run", str(bad)], tmp_path)
    assert failed.returncode == 2, failed.stdout
    assert "bad.yaml: stages.toy_task.params.sede: unknown key" in failed.stdout
    assert not [c for c in procs if any(r in c for r in RAY_PROCESSES)], procs


def test_control_run_starts_ray(tmp_path):
    """The check above can see a Ray: a run with work to do, in the same kind of child
    process, shows Ray's processes in its tree."""
    done, procs = _cli(["run", str(_small_pipeline(tmp_path))], tmp_path, {"RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stdout
    assert any("raylet" in c for c in procs) and any("ray::" in c for c in procs), procs


def _plan(cfg, *sets: str) -> dict[str, str]:
    args = ["plan", str(cfg), "--json"] + [a for s in sets for a in ("--set", s)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return {e["name"]: e["fingerprint"] for e in json.loads(result.output)}


def test_resources_replicas_and_batch_sizes_leave_fingerprints_unchanged(tiny_model, tmp_path):
    src = write_jsonl(tmp_path / "src.jsonl", [{"prompt": "Compute 1 + 1.", "answer": "2"}])
    cfg = generate_config(tmp_path, "fp", src, tiny_model, "{n: 2, max_tokens: 8, seed: 1}",
                          "{max_model_len: 128, batch_size: 4}")
    base = _plan(cfg)
    gen = "stages.generate.params"
    same = _plan(cfg, f"{gen}.engine.replicas=4", f"{gen}.engine.num_cpus=3", f"{gen}.engine.num_gpus=1",
                 f"{gen}.engine.batch_size=64", f"{gen}.engine.chunks_in_flight=2", f"{gen}.max_error_rate=0.9",
                 f"{gen}.engine.resources.node_type_a100=0.01", f"{gen}.engine.max_num_seqs=3")
    assert same == base
    # what defines the output does change it (so the comparison above can fail), and --set reached it
    assert _plan(cfg, f"{gen}.sampling.temperature=0.5")["generate"] != base["generate"]
    assert _plan(cfg, f"{gen}.engine.max_model_len=96")["generate"] != base["generate"]
    assert _plan(cfg, "stages.prompts.params.limit=1")["prompts"] != base["prompts"]


def test_sft_workers_and_resources_leave_the_fingerprint_unchanged(tmp_path):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"""
name: sftfp
storage: {{root: {tmp_path}/root}}
stages:
  toy_task: {{params: {{train_size: 20, distill_size: 2, eval_size: 2}}}}
  rows: {{uses: dedupe, inputs: {{samples: toy_task.train}}, params: {{completion_field: solution, require_verdict: null}}}}
  init: {{uses: init_model, inputs: {{corpus: rows.sft}}}}
  sft: {{inputs: {{data: rows.sft, model: init.model}}, params: {{batch_size: 8}}}}
""")
    base = _plan(cfg)
    s = "stages.sft.params"
    assert _plan(cfg, f"{s}.num_workers=4", f"{s}.num_cpus=1", f"{s}.num_gpus=1", f"{s}.max_failures=5",
                 f"{s}.checkpoint_every=7", f"{s}.logging_steps=3") == base
    assert _plan(cfg, f"{s}.batch_size=16")["sft"] != base["sft"]  # the global batch defines the model


def test_relative_paths_resolve_against_the_working_directory(tmp_path):
    """A config in conf/ naming data/src.jsonl: found from the working directory holding data/,
    not from the config's folder; from elsewhere, exit 2 naming the field."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    write_jsonl(tmp_path / "data" / "src.jsonl", [{"prompt": "Compute 1 + 1.", "answer": "2"}])
    cfg = tmp_path / "conf" / "rel.yaml"
    cfg.write_text("name: rel\nstorage: {root: store}\nstages:\n  prompts: {params: {path: data/src.jsonl}}\n")
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        loaded = load_config(cfg)
        assert loaded.nodes["prompts"].stage.params.path in ("data/src.jsonl", str(tmp_path / "data" / "src.jsonl"))
        assert CliRunner().invoke(app, ["plan", str(cfg), "--json"]).exit_code == 0
        os.chdir(tmp_path / "elsewhere")
        result = CliRunner().invoke(app, ["plan", str(cfg)])
        assert result.exit_code == 2 and "stages.prompts.params.path" in result.output, result.output
        os.chdir(tmp_path / "conf")  # the config's own folder has no data/ either
        assert CliRunner().invoke(app, ["plan", str(cfg)]).exit_code == 2
    finally:
        os.chdir(cwd)


def test_address_option_joins_that_ray(ray_local, tmp_path):
    """`distill run --address` joins the Ray at that address (this session's) and starts none."""
    import ray

    address = ray.get_runtime_context().gcs_address
    done, procs = _cli(["run", str(_small_pipeline(tmp_path)), "--address", address], tmp_path)
    assert done.returncode == 0, done.stdout
    assert not [c for c in procs if "raylet" in c or "gcs_server" in c], procs
    assert "done" in done.stdout


def test_stages_downstream_of_a_failure_are_skipped(ray_local, tmp_path):
    cfg = tmp_path / "fail.yaml"
    cfg.write_text(f"""
name: failing
storage: {{root: {tmp_path}/root}}
stages:
  toy_task: {{params: {{train_size: 500, distill_size: 1, eval_size: 1, min_steps: 1, max_steps: 1, max_operand: 2}}}}
  rows: {{uses: dedupe, inputs: {{samples: toy_task.train}}, params: {{completion_field: solution, require_verdict: null}}}}
  more: {{uses: dedupe, inputs: {{samples: toy_task.eval}}, params: {{completion_field: solution, require_verdict: null}}}}
""")
    result = Runner(load_config(cfg)).run()
    assert not result.ok
    status = {s["name"]: s for s in result.manifest["stages"]}
    assert status["toy_task"]["status"] == "failed" and "could not draw" in result.stage_errors["toy_task"]
    for name in ("rows", "more"):
        assert status[name]["status"] == "skipped", status[name]
        assert "upstream failure in toy_task" in json.dumps(status[name])
