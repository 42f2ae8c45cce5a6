"""Secrets never leak through a submitted job.

A pipeline runs as a Ray job with recognisable fake AWS keys, a Ray token and an HF token in
both the submitter's and the cluster's environment, storage on moto S3 on 127.0.0.1. Then every
object in the bucket, every file under the local folders (project, home, the head's temp dir
with its session logs and unpacked working dirs), the job info and all CLI output are searched
for them: nothing. A job that deliberately logs a key shows that the search finds it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from ray_head import FAKE_SECRETS as FAKE
from ray_head import cli, client_env

BUCKET = "distill-leakcheck"

CONFIG = """
name: secrets
storage: {{root: s3://{bucket}/distill}}
stages:
  toy_task:
    params: {{seed: 0, train_size: 40, distill_size: 10, eval_size: 10}}
  data:
    uses: dedupe
    inputs: {{samples: toy_task.train}}
    params: {{completion_field: solution, require_verdict: null}}
"""


def find_secrets(secrets: dict[str, str], places: dict[str, bytes]) -> list[str]:
    """'NAME in PLACE' for every secret value found in a place's bytes."""
    return [f"{name} in {place}" for place, data in places.items() for name, value in secrets.items()
            if value.encode() in data]


def files_under(*roots: Path) -> dict[str, bytes]:
    out = {}
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                try:
                    out[str(p)] = p.read_bytes()
                except OSError:
                    continue
    return out


def bucket_objects(s3, bucket: str) -> dict[str, bytes]:
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out[f"s3://{bucket}/{o['Key']}"] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


@pytest.fixture(scope="module")
def cluster(ray_jobs_head):
    """The shared head: the fake keys are in its environment (as a cluster's nodes would have
    them, from an instance role or a mounted secret) and its S3 is moto."""
    return ray_jobs_head


def test_no_secret_reaches_storage_logs_job_info_or_cli(cluster, moto_s3_endpoint, tmp_path):
    import boto3
    from ray.job_submission import JobSubmissionClient

    head = cluster
    s3 = boto3.client("s3", endpoint_url=moto_s3_endpoint, aws_access_key_id=FAKE["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=FAKE["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    proj, home = tmp_path / "project", tmp_path / "home"
    proj.mkdir()
    home.mkdir()
    (proj / "p.yaml").write_text(CONFIG.format(bucket=BUCKET))
    env = client_env(head, home, **FAKE, AWS_ENDPOINT_URL=moto_s3_endpoint, AWS_DEFAULT_REGION="us-east-1",
                     AWS_EC2_METADATA_DISABLED="true")
    secrets = {**FAKE, "RAY_AUTH_TOKEN": head.token}

    outputs = []

    def run(*args):
        r = cli(list(args), env, proj)
        outputs.append(f"$ distill {' '.join(args)}\n{r.stdout}\n{r.stderr}")
        return r

    sub = run("submit", "p.yaml", "--address", head.url, "--run-id", "s1", "--wait", "--json")
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job = json.loads(sub.stdout)["submission_id"]
    run("submit", "p.yaml", "--address", head.url, "--run-id", "s1")  # refused duplicate: an error message
    run("submit", "p.yaml", "--address", head.url, "--set", "stages.toy_task.params.seed=oops")  # a config error
    for args in (["jobs", "ls"], ["jobs", "status", job], ["jobs", "logs", job], ["jobs", "logs", job, "--follow"]):
        for fmt in ([], ["--json"]):
            assert run(*args, "--address", head.url, *fmt).returncode == 0
    ls = run("datasets", "ls", f"s3://{BUCKET}/distill", "--json")
    assert {d["name"] for d in json.loads(ls.stdout)} >= {"data.sft", "toy_task.train"}, ls.stderr
    assert json.loads(run("runs", "show", "s1", "--root", f"s3://{BUCKET}/distill", "--json").stdout)["status"] == "done"

    client = JobSubmissionClient(head.url, headers={"Authorization": f"Bearer {head.token}"})
    info = json.dumps([j.model_dump() for j in client.list_jobs()], default=str)
    assert job in info and '"env_vars"' not in info  # nothing in runtime_env.env_vars

    objects = bucket_objects(s3, BUCKET)
    assert any(k.endswith("/runs/s1/manifest.json") for k in objects) and any(k.endswith(".parquet") for k in objects)
    session_logs = files_under(Path(head.temp_dir))
    assert any("job-driver-" + job in k for k in session_logs), "the job's driver log is where a leak would land"
    places = {**objects, **files_under(tmp_path), **session_logs, "job info": info.encode(),
              "CLI output": "\n".join(outputs).encode()}
    assert find_secrets(secrets, places) == []

    # The search is not blind: a job that logs a key is caught in the session logs and the CLI output.
    leak = client.submit_job(entrypoint="python -c \"import logging, os; "
                                        "logging.warning('debug creds %s', os.environ['AWS_SECRET_ACCESS_KEY'])\"")
    deadline = time.time() + 120
    while client.get_job_status(leak).value not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline
        time.sleep(0.5)
    logs = run("jobs", "logs", leak, "--address", head.url)
    places = {"Ray session logs": b"".join(files_under(Path(head.temp_dir)).values()),
              "CLI output": "\n".join(outputs).encode()}
    # the search finds it where Ray wrote it; `distill jobs logs` shows it redacted (one redaction path)
    assert find_secrets(secrets, places) == ["AWS_SECRET_ACCESS_KEY in Ray session logs"], logs.stdout
    assert "debug creds ***" in logs.stdout


def test_submit_refuses_a_secret_in_the_job_and_never_echoes_it(tmp_path):
    proj, home = tmp_path / "project", tmp_path / "home"
    proj.mkdir()
    home.mkdir()
    (proj / "p.yaml").write_text(CONFIG.format(bucket="b").replace("s3://b/distill", str(tmp_path / "root")))
    env = client_env(None, home, RAY_AUTH_MODE="disabled", **FAKE)
    # a secret in a --set value would reach the entrypoint, which anyone listing jobs reads
    r = cli(["submit", "p.yaml", "--address", "http://127.0.0.1:9", "--set", f"name={FAKE['HF_TOKEN']}"], env, proj)
    assert r.returncode == 1
    assert "refusing to submit: the job's entrypoint would contain the value of HF_TOKEN" in " ".join(r.stderr.split())
    # a config error echoing the bad value shows it redacted
    r2 = cli(["submit", "p.yaml", "--address", "http://127.0.0.1:9", "--set",
              f"stages.toy_task.params.seed={FAKE['AWS_SECRET_ACCESS_KEY']}"], env, proj)
    assert r2.returncode == 2 and "stages.toy_task.params.seed" in r2.stderr and "***" in r2.stderr
    for out in (r, r2):
        assert find_secrets(FAKE, {"out": (out.stdout + out.stderr).encode()}) == []


def test_job_payload_and_secret_sources(tmp_path, monkeypatch):
    from pipeline.ops.jobs import Address, check_no_secrets, prepare, redact, secret_values

    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("ray-token-from-file-0123456789\n")
    (home / ".cache" / "huggingface").mkdir(parents=True)
    (home / ".cache" / "huggingface" / "token").write_text("hf_token_from_file_0123456789")
    monkeypatch.setenv("HOME", str(home))
    for k, v in FAKE.items():
        monkeypatch.setenv(k, v)
    found = secret_values()
    assert found["~/.ray/auth_token"] == "ray-token-from-file-0123456789"
    assert found["~/.cache/huggingface/token"] == "hf_token_from_file_0123456789"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"} <= set(found)
    assert redact(f"x {FAKE['AWS_SECRET_ACCESS_KEY']} y ray-token-from-file-0123456789") == "x *** y ***"
    with pytest.raises(Exception, match="metadata would contain the value of ~/.ray/auth_token"):
        check_no_secrets({"metadata": {"note": "ray-token-from-file-0123456789"}})

    proj = tmp_path / "project"
    proj.mkdir()
    (proj / "p.yaml").write_text(CONFIG.format(bucket="b"))
    (proj / ".env").write_text(f"AWS_SECRET_ACCESS_KEY={FAKE['AWS_SECRET_ACCESS_KEY']}\n")
    (proj / "big.bin").write_bytes(b"\0" * (2 * 2**20))
    monkeypatch.chdir(proj)
    sub = prepare("p.yaml", Address("http://127.0.0.1:9", "--address"), run_id="r", max_file_bytes=2**20)
    assert "env_vars" not in sub.runtime_env
    assert ".env" in sub.runtime_env["excludes"] and ".venv" in sub.runtime_env["excludes"]
    assert "/big.bin" in sub.runtime_env["excludes"] and sub.excluded_large == [("big.bin", 2 * 2**20)]
    assert sub.entrypoint == "python -m pipeline.cli run p.yaml --address auto --run-id r"
    assert sub.submission_id == "distill-secrets-r" and sub.metadata["storage_root"] == "s3://b/distill"


def test_run_config_errors_never_echo_a_secret(tmp_path, monkeypatch):
    """`distill run` (what a job runs) echoes a bad config value, but never a secret's."""
    from typer.testing import CliRunner

    from pipeline.cli.main import app
    from pipeline.store.secrets import secret_values

    for k, v in FAKE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "a-token-file-path"))  # a path, not a secret
    assert "RAY_AUTH_TOKEN_PATH" not in secret_values()
    cfg = tmp_path / "p.yaml"
    cfg.write_text(CONFIG.format(bucket="b").replace("s3://b/distill", str(tmp_path / "root")))
    r = CliRunner().invoke(app, ["run", str(cfg), "--set", f"stages.toy_task.params.seed={FAKE['HF_TOKEN']}"])
    assert r.exit_code == 2 and "stages.toy_task.params.seed" in r.output and "***" in r.output
    assert find_secrets(FAKE, {"out": r.output.encode()}) == []
    plain = CliRunner().invoke(app, ["run", str(cfg), "--set", "stages.toy_task.params.seed=notanumber"])
    assert "notanumber" in plain.output  # what is not a secret is still shown
