"""One redaction path: every form of secret the ops review found is planted, and none reaches a
CLI output, ``--json``, a history record, a job's output, a shipped package or a storage object.

Forms planted: a password in a Jobs API URL; ``OPENAI_KEY`` (a name the old pattern missed); a
key from an AWS credentials file; base64 and URL-encoded copies of a secret; an ``id_rsa`` and a
key under an innocent name; a scheduled job that prints its token and fails. A local run without
``RAY_AUTH_MODE`` leaves Ray's token file 0600.
"""
from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

from conftest import REPO

URL_PW = "hunter2-url-password-51"
OPENAI = "sk-openai-planted-0123456789abcdef"
CRED_FILE_KEY = "credfile/SecretKey+0123456789ABCDEFghij"
RAY_TOKEN = "ray-token-planted-9f8e7d6c5b4a"
AWS_ID_SHAPE = "AKIAZZZZ1234567890AB"


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        f"[default]\naws_access_key_id = {AWS_ID_SHAPE}\naws_secret_access_key = {CRED_FILE_KEY}\n")
    return home


def _env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_AUTH"))}
    return {**env, "HOME": str(home), "OPENAI_KEY": OPENAI, "RAY_AUTH_TOKEN": RAY_TOKEN,
            "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", **extra}


def _planted() -> list[str]:
    return [URL_PW, OPENAI, CRED_FILE_KEY, RAY_TOKEN, AWS_ID_SHAPE]


def _leaks(text: str) -> list[str]:
    return [s for s in _planted() if s in text]


def test_redact_covers_every_form(tmp_path, monkeypatch):
    from pipeline.store.secrets import redact, secret_values

    home = _home(tmp_path)
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("OPENAI_KEY", OPENAI)
    monkeypatch.setenv("DATABASE_URL", f"postgres://app:{URL_PW}@db:5432/x")
    found = secret_values()
    assert found["OPENAI_KEY"] == OPENAI
    assert found["credentials[default].aws_secret_access_key"] == CRED_FILE_KEY
    assert URL_PW in found.values()
    text = "\n".join([
        f"url http://admin:{URL_PW}@10.0.0.5:8265/api",
        f"env {OPENAI}",
        f"file {CRED_FILE_KEY}",
        f"urlenc {quote(CRED_FILE_KEY, safe='')}",
        f"b64 {base64.b64encode(OPENAI.encode()).decode()}",
        f"b64 inside basic auth {base64.b64encode(('user:' + OPENAI).encode()).decode()}",
        f"b64 at offset 2 {base64.b64encode(('ab' + CRED_FILE_KEY + 'tail').encode()).decode()}",
        f"an unknown key of AWS's shape {AWS_ID_SHAPE.replace('ZZZZ', 'QQQQ')}",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----",
        "plain words stay",
    ])
    out = redact(text)
    assert _leaks(out) == [] and "AKIAQQQQ" not in out and "b3BlbnNzaC1rZXktdjEAAAAA" not in out, out
    assert base64.b64encode(OPENAI.encode()).decode()[4:20] not in out
    assert "http://admin:***@10.0.0.5:8265" in out and "plain words stay" in out


def test_cli_errors_never_show_a_url_password(tmp_path):
    home = _home(tmp_path)
    for args in (["jobs", "ls"], ["jobs", "ls", "--json"], ["jobs", "status", "j1", "--json"]):
        r = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--address",
                            f"http://admin:{URL_PW}@127.0.0.1:9"], capture_output=True, text=True,
                           env=_env(home, RAY_AUTH_MODE="disabled"), cwd=tmp_path, timeout=120)
        assert r.returncode != 0 and "127.0.0.1:9" in r.stdout + r.stderr
        assert _leaks(r.stdout + r.stderr) == [], r.stdout + r.stderr
    # a plain-http Jobs API address that is not loopback is named as a risk
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "jobs", "ls", "--address", "http://192.0.2.1:9"],
                       capture_output=True, text=True, env=_env(home, RAY_AUTH_MODE="disabled"), cwd=tmp_path,
                       timeout=120)
    assert "plain http:// to 192.0.2.1" in " ".join(r.stderr.split())


def test_shipped_working_dir_leaves_keys_out_by_name_and_content(tmp_path, monkeypatch):
    from pipeline.ops.jobs import Address, prepare

    home = _home(tmp_path)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("OPENAI_KEY", OPENAI)
    proj = tmp_path / "project"
    (proj / "conf").mkdir(parents=True)
    (proj / "p.yaml").write_text(f"name: ship\nstorage: {{root: {tmp_path / 'root'}}}\n"
                                 "stages:\n  toy_task: {params: {seed: 0, train_size: 4, distill_size: 2, eval_size: 2}}\n")
    (proj / "id_rsa").write_text("anything")
    (proj / "conf" / "deploy.txt").write_text("-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----\n")
    (proj / "conf" / "settings.ini").write_text(f"[x]\naws_secret_access_key = {CRED_FILE_KEY}\n")
    (proj / "notes.md").write_text(f"the key is {OPENAI}\n")
    (proj / "code.py").write_text("print('shipped')\n")
    monkeypatch.chdir(proj)
    sub = prepare("p.yaml", Address("http://127.0.0.1:9", "--address"), run_id="r")
    assert "id_rsa*" in sub.runtime_env["excludes"]
    assert sub.excluded_credentials == ["conf/deploy.txt", "conf/settings.ini", "notes.md"]
    for p in sub.excluded_credentials:
        assert "/" + p in sub.runtime_env["excludes"]
    assert "code.py" not in json.dumps(sub.runtime_env["excludes"])

    # what Ray would pack: its own packaging of the working dir with these excludes
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    pkg = tmp_path / "pkg.zip"
    create_package(str(proj), pkg, include_gitignore=True, excludes=sub.runtime_env["excludes"])
    with zipfile.ZipFile(pkg) as z:
        names = set(z.namelist())
        body = b"".join(z.read(n) for n in names if not n.endswith("/"))
    assert any(n.endswith("code.py") for n in names)
    assert not any(n.endswith(("id_rsa", "deploy.txt", "settings.ini", "notes.md")) for n in names), names
    assert _leaks(body.decode("utf-8", "replace")) == [] and b"PRIVATE KEY" not in body


LEAKY = '''
import os
from typing import ClassVar
import pyarrow as pa
from pydantic import BaseModel
from pipeline.core.stage import Stage

class P(BaseModel):
    pass

class Leaky(Stage):
    kind: ClassVar[str] = "leaky"
    Params = P
    outputs: ClassVar[dict] = {"x": "dataset"}
    output_columns: ClassVar[dict] = {"x": pa.schema([("a", pa.int64())])}

    def run(self, ctx):
        import base64
        tok = os.environ["RAY_AUTH_TOKEN"]
        print("my token is", tok, "and", os.environ["OPENAI_KEY"], flush=True)
        raise RuntimeError("failing with " + tok + " b64 " + base64.b64encode(tok.encode()).decode())
'''


def test_a_job_that_prints_its_token_and_fails_leaks_nowhere(tmp_path):
    """A scheduled local job prints its token and fails: the history (storage objects), the
    CLI's text and --json show its failure redacted; Ray's token file is 0600."""
    home = _home(tmp_path)
    proj = tmp_path / "project"
    proj.mkdir()
    root = tmp_path / "root"
    (proj / "leaky_stage.py").write_text(LEAKY)
    (proj / "p.yaml").write_text(f"name: leaky\nstorage: {{root: {root}}}\nray: {{num_cpus: 1}}\n"
                                 "stages:\n  leak: {uses: 'leaky_stage:Leaky'}\n")
    env = _env(home, PYTHONPATH=f"{proj}{os.pathsep}{REPO}")  # RAY_AUTH_MODE unset: Ray writes a token file

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                              env=env, cwd=proj, timeout=300)

    outputs = []
    r = cli("schedule", "add", "leaky", "--cron", "0 3 * * *", "--config", "p.yaml")
    assert r.returncode == 0, r.stderr
    for args in (["schedule", "run-now", "leaky", "--root", str(root)],
                 ["schedule", "history", "leaky", "--root", str(root), "--json"],
                 ["schedule", "history", "leaky", "--root", str(root)],
                 ["schedule", "ls", "--root", str(root), "--json"]):
        r = cli(*args)
        outputs.append(r.stdout + r.stderr)
    assert "***" in outputs[0] and "failing with" in outputs[0], outputs[0]
    (end,) = [e for e in json.loads(outputs[1]) if e["event"] == "end"]
    assert end["status"] == "failed" and "failing with ***" in end["error_tail"], end["error_tail"]
    stored = "".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file())
    assert "failing with" in stored  # the failure is recorded...
    assert _leaks("\n".join(outputs)) == [] and _leaks(stored) == []  # ...without the secrets


def test_a_local_run_leaves_rays_token_file_private(tmp_path):
    """Without RAY_AUTH_MODE a new local Ray turns token auth on and writes ~/.ray/auth_token:
    0600, not the umask's 0644."""
    home = tmp_path / "home"
    home.mkdir()
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"name: tok\nstorage: {{root: {tmp_path / 'root'}}}\nray: {{num_cpus: 1}}\nstages:\n"
                   "  toy_task: {params: {seed: 0, train_size: 4, distill_size: 2, eval_size: 2}}\n")
    env = {k: v for k, v in _env(home).items() if not k.startswith("RAY_AUTH")}
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(cfg)], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    token = home / ".ray" / "auth_token"
    assert token.exists(), "a new local Ray without RAY_AUTH_MODE writes its token file"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
