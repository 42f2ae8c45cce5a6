"""kill -9 of the driver mid-generation, then a re-run: every key exactly once, and no
committed sample is generated again."""
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, ProcessWatch, generate_config, output_rows, run_stages, write_jsonl

from pipeline.core.config import load_config
from pipeline.core.runner import Runner
from pipeline.store.storage import Storage

N_PROMPTS, N = 24, 2


@pytest.mark.engine
def test_driver_kill_and_resume(ray_local, tiny_model, tmp_path):
    src = write_jsonl(tmp_path / "src.jsonl", [{"prompt": f"Compute {i} + {i}.", "answer": str(2 * i)}
                                               for i in range(N_PROMPTS)])
    root = tmp_path / "root"
    cfg = generate_config(tmp_path, "resume", src, tiny_model,
                          f"{{n: {N}, max_tokens: 100, ignore_eos: true, seed: 3}}",
                          # no max_num_seqs here (the killed run sets its own below): the rerun in this
                          # process then uses the tiny model's engine kept from earlier tests (~30 s a start)
                          "{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 2}",
                          extra="ray: {num_cpus: 2}")
    env = {**os.environ, "DISTILL_KEEP_ENGINES": "0", "PYTHONPATH": str(REPO)}
    # one sequence at a time in the run to be killed, at the lowest CPU priority (neither is part
    # of any key), so it is still generating when the test sees its third checkpoint, even on a
    # loaded machine where the test's own polling competes with it for the CPU
    slow = ["--set", "stages.generate.params.engine.max_num_seqs=1", "--set", "stages.generate.params.engine.nice=19"]
    log = open(tmp_path / "killed-run.log", "wb")  # its output, for the message if it ends on its own
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(cfg), *slow], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    watch = ProcessWatch(proc.pid, interval=1.0)  # the driver's whole process tree: Ray, its workers, the engines
    st = Storage(str(root))
    parts: list[str] = []
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            parts = [p for p in st.fs.glob(st.path("cache/generate/*/checkpoints/*/_manifest.json"))]
            if len(parts) >= 3:
                break
            time.sleep(0.1)
        log.flush()
        assert proc.poll() is None, ("the first run finished before it could be killed; its output ends:\n"
                                     + (tmp_path / "killed-run.log").read_text(errors="replace")[-3000:])
        assert len(parts) >= 3
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(30)
        log.close()
    left = watch.survivors(wait=90)  # stops the watch
    assert any("EngineActor" in c for c in watch.seen.values()), f"no engine actor seen: {list(watch.seen.values())}"
    assert left == []  # nothing of the killed run survives, in whatever process group it runs

    before = {}
    for m in st.fs.glob(st.path("cache/generate/*/checkpoints/*/_manifest.json")):
        for r in st.read_dataset(m.rsplit("/", 1)[0]).to_pylist():
            before[(r["prompt_id"], r["sample_index"])] = r["completion"]
    assert 0 < len(before) < N_PROMPTS * N

    result = Runner(load_config(cfg)).run()
    assert result.ok, result.error
    gen = {s["name"]: s for s in result.manifest["stages"]}["generate"]
    rows = st.read_dataset(st.strip(gen["output"]["samples"])).to_pylist()
    keys = [(r["prompt_id"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == N_PROMPTS * N
    # committed samples were kept as they were, not generated again
    assert all({(r["prompt_id"], r["sample_index"]): r["completion"] for r in rows}[k] == v for k, v in before.items())
    assert gen["metrics"]["resumed_prompts"] * N == len(before)
    assert gen["metrics"]["generated_tokens_this_attempt"] == (N_PROMPTS * N - len(before)) * 100


@pytest.mark.engine
def test_incremental_rerun_generates_only_new_prompts(ray_local, tiny_model, tmp_path):
    rows = [{"prompt": f"Compute {i} - 1.", "answer": str(i - 1)} for i in range(2, 8)]
    src = write_jsonl(tmp_path / "src.jsonl", rows)
    cfg = generate_config(tmp_path, "incremental", src, tiny_model,
                          f"{{n: {N}, max_tokens: 20, ignore_eos: true, seed: 5}}",
                          "{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 4}")

    def run():
        result = Runner(load_config(cfg)).run()
        assert result.ok, result.error
        gen = {s["name"]: s for s in result.manifest["stages"]}["generate"]
        st = Storage(str(tmp_path / "root"))
        out = st.read_dataset(st.strip(gen["output"]["samples"])).to_pylist()
        return gen, {(r["prompt_id"], r["sample_index"]): r["completion"] for r in out}, len(out)

    first, first_rows, _ = run()
    assert first["metrics"]["generated_tokens_this_attempt"] == 6 * N * 20

    write_jsonl(src, rows + [{"prompt": f"Compute {i} + 10.", "answer": str(i + 10)} for i in range(3)])
    second, second_rows, count = run()
    assert second["status"] == "done" and second["fingerprint"] != first["fingerprint"]
    assert second["metrics"]["resumed_prompts"] == 6
    assert second["metrics"]["generated_tokens_this_attempt"] == 3 * N * 20  # only the new prompts
    assert count == len(second_rows) == 9 * N
    assert all(second_rows[k] == v for k, v in first_rows.items())

    # dropping prompts from the source drops their rows from the output, and generates nothing
    write_jsonl(src, rows[:4])
    third, third_rows, count = run()
    assert third["metrics"]["generated_tokens_this_attempt"] == 0 and count == 4 * N


@pytest.mark.engine
def test_adaptive_sampling_runs_unsolved_prompts_to_max_samples(ray_local, tiny_model, tmp_path):
    """A random tiny model never verifies, so every prompt runs to max_samples and is recorded
    as exhausted unsolved with a pass-rate estimate of 0; rounds continue sample indices without
    gaps. (Stopping at target_correct, on a model that solves prompts: test_adaptive_solver.py.)"""
    src = write_jsonl(tmp_path / "src.jsonl", [{"prompt": f"Compute {i} + 2.", "answer": str(i + 2)} for i in range(5)])
    cfg = generate_config(tmp_path, "adaptive", src, tiny_model,
                          "{strategy: adaptive, n: 2, max_samples: 5, target_correct: 1, max_tokens: 8, seed: 2}",
                          "{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 4}")
    stages, st = run_stages(cfg)
    gen = stages["generate"]
    rows, stats = output_rows(st, gen, "samples"), output_rows(st, gen, "prompt_stats")
    by_prompt: dict = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r["sample_index"])
    assert len(by_prompt) == 5 and all(sorted(v) == [0, 1, 2, 3, 4] for v in by_prompt.values())
    assert all(s["samples"] == 5 and s["correct"] == 0 and s["exhausted_unsolved"] for s in stats)
    assert all(s["est_pass_rate"] == 0.0 for s in stats)
    assert gen["metrics"]["prompts_exhausted_unsolved"] == 5 and gen["metrics"]["verified_samples"] == 0
    # different rounds of a prompt draw different samples (their own seeds)
    texts = {}
    for r in rows:
        texts.setdefault(r["prompt_id"], set()).add(r["completion"])
    assert all(len(t) > 1 for t in texts.values())


@pytest.mark.engine
def test_adaptive_gives_up_on_unsolved_prompts(ray_local, tiny_model, tmp_path):
    """give_up_after: a prompt with no verified sample after that many samples stops early
    (here after the round that reaches 3 samples: 4), long before max_samples."""
    src = write_jsonl(tmp_path / "src.jsonl", [{"prompt": f"Compute {i} + 5.", "answer": str(i + 5)} for i in range(4)])
    cfg = generate_config(tmp_path, "giveup", src, tiny_model,
                          "{strategy: adaptive, n: 2, max_samples: 12, give_up_after: 3, target_correct: 1, "
                          "max_tokens: 8, seed: 2}",
                          "{max_model_len: 128, kv_cache_gb: 0.25, batch_size: 4}")
    stages, st = run_stages(cfg)
    gen = stages["generate"]
    stats = output_rows(st, gen, "prompt_stats")
    assert len(stats) == 4 and all(s["samples"] == 4 and s["exhausted_unsolved"] for s in stats)
    assert gen["metrics"]["samples"] == 16
