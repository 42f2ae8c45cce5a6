"""In CI (``CI=true``) a test that would skip for a missing capability fails the run, naming the
capability; outside CI it skips. The one skip CI allows is a bubblewrap variant on a machine
whose kernel blocks user namespaces (its reason says so). Checked on a scratch test file run by
pytest with this suite's conftest."""
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import USERNS_BLOCKED

SKIPS = f'''
import pytest

def test_no_chromium():
    pytest.skip("Debian's chromium is not installed")

@pytest.mark.skipif(True, reason="../shared/data not present")
def test_no_shared():
    pass

@pytest.mark.skipif(True, reason="needs ss (iproute2) to list sockets")
def test_no_ss():
    pass

def test_no_sandbox():
    pytest.skip("no sandbox here: unshare: Operation not permitted")

def test_bwrap_userns():
    pytest.skip("bubblewrap variant: {USERNS_BLOCKED} (bwrap: setting up uid map: Permission denied)")

def test_runs():
    assert True
'''


def _run(tmp_path: Path, ci: str | None) -> tuple[int, str]:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_skips.py").write_text(SKIPS)
    import os

    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout + p.stderr


def test_outside_ci_capability_skips_stay_skips(tmp_path):
    rc, out = _run(tmp_path, None)
    assert rc == 0, out
    assert "1 passed, 5 skipped" in out, out


def test_in_ci_a_capability_skip_fails_and_names_the_capability(tmp_path):
    rc, out = _run(tmp_path, "true")
    assert rc == 1, out
    assert "2 failed, 1 passed, 1 skipped, 2 errors" in out, out  # a skip at setup fails as an error
    text = " ".join(out.split())
    for test, capability in (("test_no_chromium", "Chromium"), ("test_no_shared", "../shared"),
                             ("test_no_ss", "`ss` (iproute2)"), ("test_no_sandbox", "sandbox isolation")):
        assert any(f"{head} test_skips.py::{test} - CI=true: a required capability is missing here: {capability}" in text
                   for head in ("FAILED", "ERROR")), test
    assert any(line.startswith("SKIPPED") and f"bubblewrap variant: {USERNS_BLOCKED}" in line
               for line in out.splitlines()), out  # the one skip CI allows


def test_ci_false_is_outside_ci(tmp_path):
    rc, out = _run(tmp_path, "false")
    assert rc == 0 and "1 passed, 5 skipped" in out, out
