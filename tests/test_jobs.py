"""`distill submit` and `distill jobs` against a real local Ray head (token auth on, 127.0.0.1,
stopped at the end): submit --wait, datasets visible, logs and --follow, stop, a refused
duplicate and --rerun, 401/403 with a message that says how to give a token, and the address
taken only from --address or the config."""
from __future__ import annotations

import json
import time

import pytest
from ray_head import cli, cli_process, client_env

TOY = """
name: jobs
storage: {{root: {root}}}
{ray}
stages:
  toy_task:
    params: {{seed: 0, train_size: 60, distill_size: 10, eval_size: 10}}
  data:
    uses: dedupe
    inputs: {{samples: toy_task.train}}
    params: {{completion_field: solution, require_verdict: null}}
"""


@pytest.fixture(scope="module")
def head(ray_jobs_head):
    return ray_jobs_head


@pytest.fixture(scope="module")
def project(tmp_path_factory, head):
    """A user's project folder holding the config; storage on an absolute local path (the
    cluster's nodes share this machine's filesystem)."""
    base = tmp_path_factory.mktemp("jobs")
    proj = base / "project"
    proj.mkdir()
    root = base / "store"
    (proj / "toy.yaml").write_text(TOY.format(root=root, ray=""))
    (proj / "addr.yaml").write_text(TOY.format(root=root, ray=f"ray: {{address: '{head.url}'}}"))
    home = base / "home"
    home.mkdir()
    return proj, root, home


def _json_out(p):
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout)


def test_submit_wait_succeeds_and_datasets_are_visible(head, project):
    proj, root, home = project
    # RAY_ADDRESS points elsewhere: the SDK would follow it; distill must not.
    env = client_env(head, home, RAY_ADDRESS="http://127.0.0.1:9")
    p = cli(["submit", "toy.yaml", "--address", head.url, "--run-id", "first", "--wait"], env, proj)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "submitted job distill-jobs-first" in p.stdout
    assert f"dashboard: {head.url}/#/jobs/distill-jobs-first" in p.stdout
    assert "job distill-jobs-first SUCCEEDED" in p.stdout
    assert f"using Ray Jobs API {head.url} (from --address; ignored RAY_ADDRESS=http://127.0.0.1:9" in p.stderr

    found = _json_out(cli(["datasets", "ls", str(root), "--json"], env, proj))
    by_name = {d["name"]: d for d in found}
    assert by_name["data.sft"]["rows"] == 60 and by_name["data.sft"]["run"] == "first"
    manifest = _json_out(cli(["runs", "show", "first", "--root", str(root), "--json"], env, proj))
    assert manifest["status"] == "done" and [s["status"] for s in manifest["stages"]] == ["done", "done"]

    status = _json_out(cli(["jobs", "status", "distill-jobs-first", "--address", head.url, "--json"], env, proj))
    assert status["status"] == "SUCCEEDED" and status["run_id"] == "first"
    assert status["run_manifest"] == f"{root}/runs/first/manifest.json"
    logs = cli(["jobs", "logs", "distill-jobs-first", "--address", head.url], env, proj)
    assert logs.returncode == 0 and "done   data" in logs.stdout and "run manifest:" in logs.stdout


def test_duplicate_is_refused_and_rerun_is_followed_while_running(head, project):
    proj, root, home = project
    env = client_env(head, home)
    dup = cli(["submit", "toy.yaml", "--address", head.url, "--run-id", "first"], env, proj)
    assert dup.returncode == 1
    assert "job distill-jobs-first already exists (SUCCEEDED)" in dup.stderr and "--rerun" in dup.stderr

    sub = _json_out(cli(["submit", "toy.yaml", "--address", head.url, "--run-id", "first", "--rerun", "--json",
                         "--set", "stages.toy_task.params.seed=1"], env, proj))  # new data: stages run, not cached
    assert sub["submission_id"] == "distill-jobs-first-r2" and sub["run_id"] == "first-r2"
    assert sub["replaces"]["submission_id"] == "distill-jobs-first"
    st = _json_out(cli(["jobs", "status", "distill-jobs-first-r2", "--address", head.url, "--json"], env, proj))
    assert st["status"] in ("PENDING", "RUNNING")  # --follow below starts on a live job
    follow = cli(["jobs", "logs", "distill-jobs-first-r2", "--address", head.url, "--follow"], env, proj)
    assert follow.returncode == 0, follow.stderr
    assert "Running entrypoint for job distill-jobs-first-r2" in follow.stdout
    assert "done   data" in follow.stdout and "run manifest:" in follow.stdout  # written after it started
    assert "job distill-jobs-first-r2 SUCCEEDED" in follow.stderr


def test_ls_lists_only_distill_jobs(head, project):
    from ray.job_submission import JobSubmissionClient

    proj, _, home = project
    plain = JobSubmissionClient(head.url, headers={"Authorization": f"Bearer {head.token}"})
    other = plain.submit_job(entrypoint="echo not distill")
    jobs = _json_out(cli(["jobs", "ls", "--address", head.url, "--json"], client_env(head, home), proj))
    ids = [j["submission_id"] for j in jobs]
    assert "distill-jobs-first" in ids and other not in ids
    assert all(j["metadata"]["distill"] for j in jobs)


def test_stop_a_running_job(head, project):
    proj, root, home = project
    env = client_env(head, home)
    sub = _json_out(cli(["submit", "toy.yaml", "--address", head.url, "--run-id", "long", "--json",
                         "--set", "stages.toy_task.params.train_size=3000000"], env, proj))
    job = sub["submission_id"]
    deadline = time.time() + 300
    while _json_out(cli(["jobs", "status", job, "--address", head.url, "--json"], env, proj))["status"] != "RUNNING":
        assert time.time() < deadline, "hang guard (not a timing): the job never reached RUNNING in 300 s"
        time.sleep(0.5)
    stop = cli(["jobs", "stop", job, "--address", head.url], env, proj)
    assert stop.returncode == 0 and f"stopped job {job} (STOPPED)" in stop.stdout, stop.stdout + stop.stderr
    again = cli(["jobs", "stop", job, "--address", head.url], env, proj)
    assert f"job {job} was not running (STOPPED)" in again.stdout
    assert not (root / "runs" / "long" / "manifest.json").exists()


@pytest.mark.parametrize("case", ["no-token", "wrong-token", "mode-token-but-none", "token-file", "home-token-file",
                                  "stray-token-without-token-mode"])
def test_token_auth(head, project, case, tmp_path):
    proj, _, home = project
    if case == "home-token-file":  # no RAY_AUTH_TOKEN: ~/.ray/auth_token of a HOME of its own
        (tmp_path / "h" / ".ray").mkdir(parents=True)
        (tmp_path / "h" / ".ray" / "auth_token").write_text(head.token + "\n")
        p = cli(["jobs", "ls", "--address", head.url, "--json"], client_env(None, tmp_path / "h"), proj)
        assert p.returncode == 0, p.stderr
        return
    if case == "stray-token-without-token-mode":  # the right token in RAY_AUTH_TOKEN is not sent
        env = client_env(None, home, RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN=head.token)
        p = cli_process(["jobs", "ls", "--address", head.url], env, proj)
        assert p.returncode == 1 and "requires a token (HTTP 401) and none was sent (RAY_AUTH_MODE=disabled)" in \
            " ".join(p.stderr.split()), p.stderr
        return
    if case == "no-token":  # a client that sends no token: HTTP 401
        env = client_env(None, home, RAY_AUTH_MODE="disabled")
    elif case == "wrong-token":
        env = client_env(head, home, RAY_AUTH_TOKEN="not-the-token-0123456789")
    elif case == "mode-token-but-none":
        env = client_env(None, home)
    else:
        (tmp_path / "tok").write_text(head.token + "\n")
        env = client_env(None, home, RAY_AUTH_TOKEN_PATH=str(tmp_path / "tok"))
    if case == "token-file":
        p = cli(["jobs", "ls", "--address", head.url, "--json"], env, proj)
        assert p.returncode == 0, p.stderr
        return
    for args in (["jobs", "ls"], ["submit", "toy.yaml", "--run-id", f"auth-{case}"]):
        # a fresh process: Ray caches the auth mode of the first client in a process
        p = (cli_process if case == "no-token" else cli)([*args, "--address", head.url], env, proj)
        assert p.returncode == 1, p.stdout + p.stderr
        err = " ".join(p.stderr.split())
        expected = {"no-token": "requires a token (HTTP 401)", "wrong-token": "refused the token from RAY_AUTH_TOKEN (HTTP 403",
                    "mode-token-but-none": "RAY_AUTH_MODE=token but no token found"}[case]
        assert expected in err
        assert "RAY_AUTH_TOKEN=<token>" in err and "RAY_AUTH_TOKEN_PATH" in err and "~/.ray/auth_token" in err
        assert "Traceback" not in p.stderr


def test_address_only_from_flag_or_config(head, project):
    proj, _, home = project
    env = client_env(head, home, RAY_ADDRESS=head.url, RAY_API_SERVER_ADDRESS=head.url)
    none = cli(["jobs", "ls"], env, proj)
    assert none.returncode == 2 and "no cluster address" in none.stderr and "RAY_ADDRESS is not used" in none.stderr
    via_cfg = cli(["jobs", "ls", "--config", "addr.yaml"], env, proj)
    assert via_cfg.returncode == 0, via_cfg.stderr
    assert f"using Ray Jobs API {head.url} (from addr.yaml: ray.address;" in via_cfg.stderr
    bad = cli(["jobs", "ls", "--address", "ray://127.0.0.1:10001"], env, proj)
    assert bad.returncode == 2 and "not a Jobs API URL" in bad.stderr
    for cmd in ("status", "logs", "stop"):
        missing = cli(["jobs", cmd, "distill-jobs-nope", "--address", head.url], env, proj)
        assert missing.returncode == 1 and f"no job 'distill-jobs-nope' on {head.url}" in missing.stderr


def test_submit_refuses_configs_that_cannot_work_on_a_cluster(head, project, tmp_path):
    proj, root, home = project
    env = client_env(head, home)
    rel = cli(["submit", "toy.yaml", "--address", head.url, "--set", "storage.root=.distill"], env, proj)
    assert rel.returncode == 2 and "toy.yaml: storage.root: '.distill' is a relative local path" in rel.stderr
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text((proj / "toy.yaml").read_text())
    far = cli(["submit", str(outside), "--address", head.url], env, proj)
    assert far.returncode == 2 and "outside the working directory" in far.stderr
    typo = cli(["submit", "toy.yaml", "--address", head.url, "--set", "stages.data.params.max_per_prompt=x"], env, proj)
    assert typo.returncode == 2 and "stages.data.params.max_per_prompt" in typo.stderr


def test_shipped_smoke_config_builds_a_job(monkeypatch):
    """configs/smoke.yaml (the README's example) as a job from the project root: no cluster needed."""
    from conftest import REPO

    from pipeline.ops.jobs import Address, ConfigProblem, prepare

    monkeypatch.chdir(REPO)
    addr = Address("http://127.0.0.1:9", "--address")
    with pytest.raises(ConfigProblem, match=r"configs/smoke.yaml: storage.root: '.distill' is a relative local path"):
        prepare("configs/smoke.yaml", addr, run_id="r")
    sub = prepare("configs/smoke.yaml", addr, ["storage.root=/tmp/distill-cluster"], run_id="r")
    assert sub.entrypoint == ("python -m pipeline.cli run configs/smoke.yaml --address auto --run-id r "
                              "--set storage.root=/tmp/distill-cluster")
    assert sub.submission_id == "distill-smoke-r" and sub.runtime_env["working_dir"] == str(REPO)
    assert {".venv", ".distill", ".git"} <= set(sub.runtime_env["excludes"]) and "env_vars" not in sub.runtime_env
