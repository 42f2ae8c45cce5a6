"""A local `distill run` (no --address, or ``ray.address: local``) starts a Ray whose every
listening socket is on the loopback interface: GCS, raylet, object manager, workers, agents.
Sockets are listed with `ss` while the run is going, for the run's whole process tree. In CI
(``CI=true``) a missing `ss` fails the test instead of skipping it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import process_tree
from ray_head import client_env

LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|\[::1\]|\[::ffff:127\.\d+\.\d+\.\d+\]):\d+$")


def listening(pids: set[int]) -> list[tuple[str, str]]:
    """(local address, process name) of each TCP/UDP socket listening in one of ``pids``."""
    out = subprocess.run(["ss", "-ltunpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            found.append((line.split()[4], ",".join(re.findall(r'\("([^"]+)"', line))))
    return found


@pytest.mark.parametrize("address", [None, "local"])
def test_local_run_listens_on_loopback_only(tmp_path, address):
    if shutil.which("ss") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs ss (iproute2) to list sockets: install it in .ci/run")
        pytest.skip("needs ss (iproute2) to list sockets")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"""
name: bind
storage: {{root: {tmp_path}/root}}
ray: {{num_cpus: 2{', address: ' + address if address else ''}}}
stages:
  toy_task: {{params: {{seed: 0, train_size: 2000, distill_size: 10, eval_size: 10}}}}
  data:
    uses: dedupe
    inputs: {{samples: toy_task.train}}
    params: {{completion_field: solution, require_verdict: null}}
""")
    home = tmp_path / "home"
    home.mkdir()
    env = client_env(None, home, RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(cfg)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: set[tuple[str, str]] = set()
    try:
        while proc.poll() is None:
            seen |= set(listening(process_tree(proc.pid)))
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read()
    assert proc.returncode == 0, output
    names = {n for _, n in seen}
    assert {"gcs_server", "raylet"} <= names, f"the run's Ray was never seen listening: {sorted(seen)}"
    exposed = sorted((a, n) for a, n in seen if not LOOPBACK.match(a))
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert (Path(tmp_path) / "root" / "runs").is_dir()
