"""README promises of schedules through the CLI: a schedule added with ``--address`` runs each
slot as a Ray job on that cluster (``distill submit --wait``), and ``schedule run-now --due``
(what a Kubernetes CronJob calls) runs the latest slot once: a second call for the same slot is
a recorded ``slot_taken`` skip. Against the session's private Ray head (token auth, 127.0.0.1)."""
import json

from ray_head import cli_process, client_env

from pipeline.ops.schedule import read_history, runs_of
from pipeline.store.storage import Storage


def _event(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def test_a_schedule_with_address_runs_its_due_slot_as_a_ray_job_once(ray_jobs_head, tmp_path):
    head = ray_jobs_head
    wd, root = tmp_path / "wd", tmp_path / "root"
    wd.mkdir()
    cfg = wd / "nightly.yaml"
    cfg.write_text(f"""
name: nightly
storage: {{root: {root}}}
stages:
  toy_task: {{params: {{seed: 0, train_size: 20, distill_size: 4, eval_size: 4}}}}
""")
    env = client_env(head, tmp_path / "home")
    # daily at midnight UTC, with two days of grace: the latest slot is due now, once
    add = cli_process(["schedule", "add", "nightly", "--cron", "0 0 * * *", "--misfire-grace", "172800",
                       "--config", cfg, "--address", head.url, "--workdir", wd], env, wd)
    assert add.returncode == 0 and f"on {head.url}" in add.stdout, add.stdout + add.stderr
    first = cli_process(["schedule", "run-now", "nightly", "--due", "--root", root, "--json"], env, wd, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    ended = _event(first.stdout)
    assert (ended["event"], ended["status"]) == ("end", "done"), ended
    second = cli_process(["schedule", "run-now", "nightly", "--due", "--root", root, "--json"], env, wd)
    assert second.returncode == 0, second.stdout + second.stderr
    skipped = _event(second.stdout)
    assert (skipped["event"], skipped["reason"]) == ("skip", "slot_taken"), skipped

    history = read_history(Storage(str(root)), "nightly")
    (start,) = [e for e in history if e["event"] == "start"]
    assert start["mode"] == "ray-job" and start["trigger"] == "cronjob"
    (run,) = runs_of(history)
    assert run["status"] == "done" and run["run_id"] == ended["run_id"]
    # the run was a job on the head, under distill's submission id, and it wrote the run manifest
    jobs = cli_process(["jobs", "ls", "--address", head.url, "--json"], env, wd)
    assert jobs.returncode == 0, jobs.stderr
    listed = {j["submission_id"]: j for j in json.loads(jobs.stdout[jobs.stdout.index("["):])}
    job = listed[f"distill-nightly-{ended['run_id']}"]
    assert job["status"] == "SUCCEEDED"
    assert (root / "runs" / ended["run_id"] / "manifest.json").exists()
