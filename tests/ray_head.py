"""A private Ray head for the Jobs tests: `ray start --head` on 127.0.0.1 with token auth on,
its own temp dir and free ports (other Ray instances may run on this machine), stopped by
killing exactly its own processes (never `ray stop`, which stops every Ray here)."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    url: str
    token: str
    temp_dir: str
    env: dict = field(repr=False)  # the head's environment (what its jobs inherit)

    def pids(self) -> set[int]:
        """The head's processes (their command lines name its temp dir) and all descendants."""
        roots = set()
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if self.temp_dir in cmd:
                    roots.add(int(d))
        from conftest import process_tree

        out: set[int] = set()
        for p in roots:
            out |= process_tree(p)
        return out

    def stop(self) -> None:
        from conftest import still_running

        pids = self.pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in pids:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            if not still_running(pids, wait=3):
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(extra_env: dict | None = None, num_cpus: int = 3) -> RayHead:
    """A head whose environment is a copy of this one plus ``extra_env``, with the venv first
    on PATH (so a job's `python` is the one with distill installed)."""
    token = "distill-test-ray-token-" + secrets.token_hex(16)
    temp_dir = tempfile.mkdtemp(prefix="dj", dir="/tmp")  # short: unix socket paths are limited
    ports = {k: free_port() for k in ("gcs", "dash", "agent", "client", "metric")}
    env = {**os.environ, **(extra_env or {}),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep the test head itself on 127.0.0.1
           "DASHBOARD_METRIC_PORT": str(ports["metric"]),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(ports["gcs"]),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dash"]),
           "--dashboard-agent-listen-port", str(ports["agent"]), "--ray-client-server-port", str(ports["client"]),
           "--temp-dir", temp_dir, "--num-cpus", str(num_cpus), "--disable-usage-stats"]
    head = RayHead(f"http://127.0.0.1:{ports['dash']}", token, temp_dir, env)
    proc = subprocess.run(cmd, env=env, cwd=temp_dir, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        head.stop()
        raise RuntimeError(f"ray start failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    _wait_ready(head)
    return head


# Recognisable fake credentials: the cluster's own (as nodes get them from an instance role or a
# mounted secret) and the submitter's; tests/test_secrets.py searches everything for them.
FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEDISTILLLEAK7",
    "AWS_SECRET_ACCESS_KEY": "fakeDistillLeakCheck/Secret+0123456789abcdEF",
    "HF_TOKEN": "hf_FakeDistillLeakCheckToken0123456789",
}


def start_jobs_head(moto_s3_endpoint: str) -> RayHead:
    """The head the Jobs tests share: S3 on moto, the fake secrets in its environment."""
    return start_head({**FAKE_SECRETS, "AWS_ENDPOINT_URL": moto_s3_endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})


def _wait_ready(head: RayHead, timeout: float = 60.0) -> None:
    import requests

    deadline = time.time() + timeout
    while True:
        try:
            r = requests.get(f"{head.url}/api/version", headers={"Authorization": f"Bearer {head.token}"}, timeout=5)
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"Ray head at {head.url} not answering after {timeout}s")
        time.sleep(0.5)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def cli(args: list[str], env: dict, cwd: Path) -> CliResult:
    """``distill ARGS`` run in this process (no interpreter start-up per call) with exactly
    ``env`` as its environment and ``cwd`` as its working directory."""
    import contextlib

    from typer.testing import CliRunner

    from pipeline.cli.main import app

    overrides = {k: None for k in os.environ if k not in env}
    overrides.update(env)
    with contextlib.chdir(cwd):
        r = CliRunner().invoke(app, [str(a) for a in args], env=overrides)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return CliResult(r.exit_code, r.stdout, r.stderr)


def cli_process(args: list[str], env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``distill ARGS`` in a process of its own, for what must not share this one's state
    (Ray caches its auth mode per process)."""
    return subprocess.run([str(BIN / "python"), "-m", "pipeline.cli", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def client_env(head: RayHead | None, home: Path, **extra: str) -> dict:
    """A user's environment: RAY_AUTH_MODE set explicitly, HOME private (no stray
    ~/.ray/auth_token), the head's token unless ``extra`` says otherwise."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "HF_"))}
    env.update({"HOME": str(home), "RAY_AUTH_MODE": "token", "COLUMNS": "250", "NO_COLOR": "1"})
    if head is not None:
        env["RAY_AUTH_TOKEN"] = head.token
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env
